"""The bundled demo set: deterministic, complete, consistent answers, and loadable as a source."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from PIL import Image

from pipeline.data.demo import content_hash, describe, ensure_demo, generate_demo, is_complete, main
from pipeline.data.sources import load_rows


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


def test_rows_reference_existing_images_and_mix_every_task(demo_dir: Path) -> None:
    rows, problems = load_rows({"name": "demo", "path": str(demo_dir), "num_rows": 240})
    assert problems == [] and len(rows) == 240
    assert all(Path(r.images[0]).is_file() for r in rows if r.images)
    queries = [r.query for r in rows]
    assert queries.count("Describe the image.") == 60
    assert sum(q.startswith("How many") for q in queries) >= 60
    assert sum(q == "What is the result?" for q in queries) >= 60
    assert 10 <= sum(not r.images for r in rows) <= 30  # text-only rows
    multi = [r for r in rows if r.history]
    assert len(multi) == 40 and all(1 <= len(r.history) <= 2 for r in multi)
    sizes = {Image.open(r.images[0]).size for r in rows if r.images}
    assert any(w * h > 448 * 448 for w, h in sizes)  # some images are large enough to be sliced
    assert any(w < h for w, h in sizes) and any(w > h for w, h in sizes)


def test_answers_are_consistent_and_correct(demo_dir: Path) -> None:
    rows, _ = load_rows({"name": "demo", "path": str(demo_dir), "num_rows": 240, "check_images": False})
    for row in rows:
        for query, response in [*row.history, (row.query, row.response)]:
            if query.startswith("What is") and "=" in response:
                left, right = response.split(" = ")
                a, op, b = left.split(" ")
                assert int(right) == (int(a) + int(b) if op == "+" else int(a) - int(b)) >= 0
            elif query.startswith("How many"):
                assert re.fullmatch(r"How many (circles|squares|triangles)\?", query) and response.isdigit()
            elif query == "Describe the image.":
                assert re.fullmatch(r"[A-Z][a-z ,]+ on a white background\.", response)


def test_describe_wording() -> None:
    groups = {("square", "blue"): 2, ("circle", "red"): 1}
    assert describe(groups) == "A red circle and two blue squares on a white background."
    groups = {("triangle", "orange"): 1, ("circle", "green"): 2, ("square", "red"): 1}
    assert describe(groups) == "Two green circles, a red square and an orange triangle on a white background."


def test_command_line_writes_the_set(tmp_path: Path, capsys) -> None:
    main(["--out", str(tmp_path / "cli"), "--n", "12"])
    assert "12 rows" in capsys.readouterr().out
    lines = (tmp_path / "cli" / "train.jsonl").read_text().splitlines()
    assert len(lines) == 12 and json.loads(lines[0])["images"] == ["images/00000.png"]
