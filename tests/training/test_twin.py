"""The tiny twin's cache (one build for many processes, complete or rebuilt, only at its own place) and its
pre-training (its answers come from the image)."""

from __future__ import annotations

import ast
import json
import multiprocessing
import os
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from pipeline.apps.generation import generate_for_rows, generation_settings, load_inference_bundle
from pipeline.config import PROJECT_ROOT, ConfigError, default_twin_path, validate
from pipeline.data.demo import generate_pretrain
from pipeline.data.rows import Row
from pipeline.families.minicpm_v2.bundle import load_bundle
from pipeline.training import twin
from pipeline.training.twin import (
    MANIFEST,
    build_pretrained_twin,
    ensure_tiny_twin,
    model_folder,
    twin_problem,
)
from pipeline.utils.io import append_jsonl
from pipeline.utils.metrics import exact_match


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith((".build-", ".old-")))


def _first_run(folder: str) -> None:
    ensure_tiny_twin(folder, steps=0)


def test_two_first_runs_at_once_build_one_complete_twin(tmp_path, monkeypatch):
    folder = tmp_path / "cache" / "minicpm_v2_tiny"
    builds = tmp_path / "builds.log"
    real_build = twin.build_pretrained_twin

    def slow_build(target, steps):
        append_jsonl(builds, {"pid": os.getpid()})
        time.sleep(1.0)  # both processes are surely inside ensure_tiny_twin at the same time
        return real_build(target, steps)

    monkeypatch.setattr(twin, "build_pretrained_twin", slow_build)
    # forked processes: two first runs on a fresh machine, without paying for the imports twice
    context = multiprocessing.get_context("fork")
    procs = [context.Process(target=_first_run, args=(str(folder),)) for _ in range(2)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=240)
        assert proc.exitcode == 0
    assert len(builds.read_text().splitlines()) == 1  # the second waited for the first, then reused it
    assert twin_problem(folder, steps=0) is None
    assert _leftovers(folder.parent) == []
    load_bundle(str(folder))  # every file is there


def test_the_command_line_builds_a_twin_elsewhere(tmp_path, capsys):
    folder = tmp_path / "elsewhere"
    twin.main(["--out", str(folder), "--steps", "0"])
    assert capsys.readouterr().out.strip() == str(folder) and twin_problem(folder, steps=0) is None


def test_a_broken_or_outdated_cache_is_rebuilt(tmp_path):
    folder = build_pretrained_twin(tmp_path / "minicpm_v2_tiny", steps=0)
    (folder / "tokenizer.model").unlink()
    assert "tokenizer.model" in twin_problem(folder, steps=0)
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    assert ensure_tiny_twin(folder, steps=0) == folder
    assert torch.equal(torch.rand(3), expected)  # building left the caller's random stream alone
    assert twin_problem(folder, steps=0) is None and (folder / "tokenizer.model").is_file()

    manifest = json.loads((folder / MANIFEST).read_text())
    (folder / MANIFEST).write_text(json.dumps({**manifest, "recipe_version": -1}))
    assert "another recipe" in twin_problem(folder, steps=0)
    ensure_tiny_twin(folder, steps=0)
    assert twin_problem(folder, steps=0) is None and _leftovers(tmp_path) == []

    shard = next(folder.glob("model-*.safetensors"))
    shard.unlink()
    assert shard.name in twin_problem(folder, steps=0)  # every shard of the index is checked


def test_the_default_path_is_absolute_wherever_the_run_starts(compose, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PIPELINE_CACHE", raising=False)
    assert compose().model.path == str(PROJECT_ROOT / ".cache" / "minicpm_v2_tiny")
    monkeypatch.setenv("PIPELINE_CACHE", "relative/cache")
    assert compose().model.path == str(tmp_path / "relative" / "cache" / "minicpm_v2_tiny")
    assert Path(compose().model.path) == default_twin_path()


def test_a_mistyped_model_path_is_an_error_not_a_new_twin(compose, tmp_path):
    typo = tmp_path / "minicpm_v2_tny"
    cfg = compose([f"model.path={typo}"])
    with pytest.raises(
        ConfigError, match=r"model.path=.*minicpm_v2_tny does not exist; the tiny twin is built only"
    ):
        validate(cfg)
    assert model_folder(str(typo), build_if_missing=True) == str(typo)  # nothing is built there
    assert not typo.exists()
    validate(compose([f"model.path={typo}", "stages=[]"]))  # no stage loads the model


@pytest.fixture(scope="module")
def colour_rows(tmp_path_factory) -> list[Row]:
    """Held-out image questions of the pre-training's kind (a seed the pre-training never used)."""
    folder = tmp_path_factory.mktemp("held-out")
    rows, images = generate_pretrain(36, seed=4321)
    picked = []
    for number, row in enumerate(rows):
        if not row.get("images"):
            continue
        path = folder / Path(row["images"][0]).name
        images[row["images"][0]].save(path)
        picked.append(Row(row["query"], row["response"], [], [str(path)], None, f"held-out:{number}"))
    return picked


def _score(bundle, rows: list[Row]) -> float:
    answers = generate_for_rows(bundle, rows, generation_settings({"max_new_tokens": 6}), batch_size=8)
    return exact_match(answers, [row.response for row in rows])


def test_prefetched_batches_give_the_same_answers_and_name_a_bad_row(pretrained_twin, colour_rows, tmp_path):
    """Images loaded and encoded on threads ahead of generation (the GPU default): the same answers as one
    batch after the other; a row whose image fails in a later batch is named."""
    from pipeline.data.images import ImageLoadError

    bundle = load_inference_bundle(str(pretrained_twin), device="cpu", dtype="float32")
    settings = generation_settings({"max_new_tokens": 6})
    rows = colour_rows[:14]
    plain = generate_for_rows(bundle, rows, settings, batch_size=3, prefetch=False)
    assert generate_for_rows(bundle, rows, settings, batch_size=3, prefetch=True) == plain
    broken = tmp_path / "cut.png"
    broken.write_bytes(Path(rows[0].images[0]).read_bytes()[:200])
    bad = Row(rows[-1].query, rows[-1].response, [], [str(broken)], None, "rows.jsonl:14")
    with pytest.raises(ImageLoadError, match="rows.jsonl:14: .*cut.png"):
        generate_for_rows(bundle, [*rows[:-1], bad], settings, batch_size=3, prefetch=True)


def test_the_pretrained_twin_answers_from_the_image(pretrained_twin, colour_rows, tmp_path):
    bundle = load_inference_bundle(str(pretrained_twin), device="cpu", dtype="float32")
    right = _score(bundle, colour_rows)
    # each question gets the next row's image: its answer should follow that image, not the question
    paths = [row.images[0] for row in colour_rows]
    swapped = [
        Row(r.query, r.response, [], [p], None, r.origin)
        for r, p in zip(colour_rows, paths[1:] + paths[:1], strict=True)
    ]
    black = tmp_path / "black.png"
    Image.new("RGB", (112, 112), "black").save(black)
    zeroed = [Row(r.query, r.response, [], [str(black)], None, r.origin) for r in colour_rows]
    assert right >= 0.5, right  # the metric has room to fall
    assert _score(bundle, swapped) < 0.5 * right
    assert _score(bundle, zeroed) < 0.5 * right


def test_the_model_code_imports_no_data_code():
    """Layers point down: the twin's pre-training (pipeline/training/twin.py) uses both; pipeline/models uses neither."""
    for path in sorted((PROJECT_ROOT / "pipeline" / "models").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                names = [("." * node.level) + (node.module or "")]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            for name in names:
                assert not name.startswith(("pipeline.data", "..data", "pipeline.training.twin", "..twin")), (
                    path,
                    name,
                )
