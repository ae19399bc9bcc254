"""The bundled demo set: deterministic, complete, consistent answers, and loadable as a source."""

from __future__ import annotations

import json
import os
import stat
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from pipeline.data.demo import (
    COLORS,
    DESCRIBE,
    content_hash,
    ensure_demo,
    generate_demo,
    generate_pretrain,
    is_complete,
    main,
)
from pipeline.data.sources import load_rows

NAME_OF = {rgb: name for name, rgb in COLORS.items()}


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    return ensure_demo(tmp_path_factory.mktemp("demo") / "demo", n=240)


def test_generation_is_deterministic() -> None:
    first = content_hash(*generate_demo(36))
    assert content_hash(*generate_demo(36)) == first
    assert content_hash(*generate_demo(36, seed=1)) != first


def test_written_set_matches_its_manifest_and_is_not_rewritten(demo_dir: Path, tmp_path: Path) -> None:
    manifest = json.loads((demo_dir / "manifest.json").read_text())
    assert manifest["content_hash"] == content_hash(*generate_demo(240))
    stamps = {p: p.stat().st_mtime_ns for p in demo_dir.rglob("*") if p.is_file()}
    assert ensure_demo(demo_dir, n=240) == demo_dir
    assert {p: p.stat().st_mtime_ns for p in demo_dir.rglob("*") if p.is_file()} == stamps
    assert not is_complete(demo_dir, n=12)  # another size is another set


def test_a_damaged_set_is_regenerated(tmp_path: Path) -> None:
    folder = ensure_demo(tmp_path / "d", n=12)
    image = folder / "images" / "00000.png"
    image.write_bytes(b"broken")
    assert not is_complete(folder, n=12)
    ensure_demo(folder, n=12)
    assert is_complete(folder, n=12)
    assert Image.open(image).size[0] > 0


def test_rows_reference_existing_images_and_mix_both_kinds_of_image(demo_dir: Path) -> None:
    rows, problems = load_rows({"name": "demo", "path": str(demo_dir), "num_rows": 240})
    assert problems == [] and len(rows) == 240
    assert all(len(r.images) == 1 and Path(r.images[0]).is_file() for r in rows)
    assert {r.query for r in rows} == {DESCRIBE}
    colors = Counter(r.response for r in rows)
    assert set(colors) == {f"The colour is {c}." for c in COLORS} and min(colors.values()) >= 20
    sizes = Counter(Image.open(r.images[0]).size for r in rows)
    assert any(w * h > 112 * 112 for w, h in sizes)  # larger than the twin's scale: the slicing code runs
    assert any(w < h for w, h in sizes) and any(w > h for w, h in sizes)


def test_each_answer_names_the_colour_drawn_in_its_image(demo_dir: Path) -> None:
    rows, _ = load_rows({"name": "demo", "path": str(demo_dir), "num_rows": 240, "check_images": False})
    for row in rows[:40]:
        colors = Image.open(row.images[0]).convert("RGB").getcolors(1 << 16)
        drawn = max((count, rgb) for count, rgb in colors if rgb != (255, 255, 255))[1]
        assert row.response == f"The colour is {NAME_OF[drawn]}.", row.origin


def test_pretraining_asks_other_questions_about_the_same_kind_of_image() -> None:
    pre, pre_images = generate_pretrain(60, seed=5)
    demo, _ = generate_demo(60)
    assert not {r["query"] for r in pre} & {r["query"] for r in demo}
    with_image = [r for r in pre if r.get("images")]
    assert with_image and all(r["response"] in COLORS for r in with_image)  # one word: the colour
    # text-only rows speak the demo's sentence, never about an image
    text_only = [r for r in pre if not r.get("images")]
    assert text_only and all(r["response"].startswith("The colour is ") for r in text_only)
    assert content_hash(pre, pre_images) != content_hash(*generate_demo(60))


def test_command_line_writes_the_set(tmp_path: Path, capsys) -> None:
    main(["--out", str(tmp_path / "cli"), "--n", "12"])
    assert "12 rows" in capsys.readouterr().out
    lines = (tmp_path / "cli" / "train.jsonl").read_text().splitlines()
    assert len(lines) == 12 and json.loads(lines[0])["images"] == ["images/00000.png"]


def test_written_files_follow_the_umask(tmp_path: Path) -> None:
    previous = os.umask(0o027)
    try:
        folder = ensure_demo(tmp_path / "demo", n=12)
    finally:
        os.umask(previous)
    modes = {stat.S_IMODE(p.stat().st_mode) for p in folder.rglob("*") if p.is_file()}
    assert modes == {0o640}  # 0666 less the umask, as a plain open() gives; not mkstemp's 0600
