"""The tiny twins' cache (one build for many processes, complete or rebuilt, only at its own place) and their
pre-training, one recipe for every family (their answers come from the image)."""

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
from pipeline.config import PROJECT_ROOT, ConfigError, default_twin_path, twin_name, validate
from pipeline.data.demo import generate_pretrain
from pipeline.data.rows import Row
from pipeline.families import FAMILIES, get_family
from pipeline.families.base import messages_from_row
from pipeline.families.minicpm_v2.bundle import load_bundle
from pipeline.training import twin
from pipeline.training.twin import (
    MANIFEST,
    build_pretrained_twin,
    ensure_tiny_twin,
    ensure_twin,
    twin_folder,
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
    real_build = twin.build_twin

    def slow_build(family, target, steps):
        append_jsonl(builds, {"pid": os.getpid()})
        time.sleep(1.0)  # both processes are surely inside ensure_tiny_twin at the same time
        return real_build(family, target, steps)

    monkeypatch.setattr(twin, "build_twin", slow_build)
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
    assert twin_folder("minicpm_v2", str(typo), build_if_missing=True) == typo  # nothing is built there
    assert not typo.exists()
    validate(compose([f"model.path={typo}", "stages=[]"]))  # no stage loads the model


TWIN_CONFIGS = sorted(p.stem for p in (PROJECT_ROOT / "conf" / "model").glob("*_tiny.yaml"))


@pytest.mark.parametrize("model", TWIN_CONFIGS)
def test_every_twin_config_is_its_family_s_cache_place_wherever_the_run_starts(
    compose, monkeypatch, tmp_path, model
):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PIPELINE_CACHE", raising=False)
    cfg = compose([f"model={model}"])
    assert model == twin_name(cfg.model.family) and cfg.model.build_if_missing
    assert cfg.model.path == str(PROJECT_ROOT / ".cache" / model)
    monkeypatch.setenv("PIPELINE_CACHE", "relative/cache")
    cfg = compose([f"model={model}"])
    assert cfg.model.path == str(tmp_path / "relative" / "cache" / model)
    assert Path(cfg.model.path) == twin.twin_cache_path(cfg.model.family)


def test_a_missing_path_of_any_family_is_an_error_naming_the_command(compose, tmp_path):
    typo = tmp_path / "qwen2_5_vl_tny"
    cfg = compose(["model=qwen2_5_vl_tiny", f"model.path={typo}"])
    with pytest.raises(ConfigError, match=r"tny does not exist; the tiny twin is built only at its own place .*"
                       r"qwen2_5_vl_tiny .*python -m pipeline.training.twin --family qwen2_5_vl --out "):  # fmt: skip
        validate(cfg)
    assert twin_folder("qwen2_5_vl", typo, build_if_missing=True) == typo  # nothing is built there
    assert not typo.exists()
    validate(compose(["model=qwen2_5_vl_tiny", f"model.path={typo}", "stages=[]"]))


def test_the_command_line_builds_any_family_s_twin(tmp_path, capsys):
    folder = tmp_path / "qwen"
    twin.main(["--family", "qwen2_5_vl", "--out", str(folder), "--steps", "0"])
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(folder)  # after any import's chatter
    assert twin_problem(folder, steps=0, family="qwen2_5_vl") is None
    assert "another recipe" in twin_problem(folder, steps=0)  # not MiniCPM-V-2's twin
    model, _ = get_family("qwen2_5_vl").load(folder)
    assert model.config.model_type == "qwen2_5_vl"


def _greedy_answers(family, model, processor, rows: list[dict], images: list[Image.Image]) -> list[str]:
    answers = []
    for start in range(0, len(rows), 16):
        samples = [
            family.encode(processor, messages_from_row(row["query"], None), [image], generation=True)
            for row, image in zip(rows[start : start + 16], images[start : start + 16], strict=True)
        ]
        batch = family.collate_for_generation(processor, samples)
        answers += family.generate(model, processor, batch, max_new_tokens=6)
    return [answer.strip() for answer in answers]


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n == "minicpm_v4_6" else n for n in FAMILIES]
)
def test_the_shared_recipe_teaches_every_family_s_twin_to_read_the_colour(name, monkeypatch):
    """The twin at its cache place (built once per checkout) answers held-out colour questions from the
    image: right with the right image, mostly wrong with another row's, never empty; the second call reuses
    it."""
    family = get_family(name)
    folder = ensure_twin(family)
    assert folder == default_twin_path(twin_name(name))
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["family"] == name and manifest["final_loss"] < 0.1 * manifest["first_loss"], manifest

    def no_rebuild(*args):
        raise AssertionError("a finished twin was rebuilt")

    monkeypatch.setattr(twin, "build_twin", no_rebuild)
    assert ensure_twin(name) == folder
    assert twin_folder(family, folder, build_if_missing=True) == folder

    rows, images = generate_pretrain(120, seed=4321)  # a seed the pre-training never used
    rows = [row for row in rows if row.get("images")]
    pictures = [images[row["images"][0]] for row in rows]
    model, processor = family.load(folder)
    right = _greedy_answers(family, model, processor, rows, pictures)
    swapped = _greedy_answers(family, model, processor, rows, pictures[1:] + pictures[:1])
    assert all(right) and all(swapped), "empty (or whitespace) answers"
    expected = [row["response"] for row in rows]
    right_score, swapped_score = exact_match(right, expected), exact_match(swapped, expected)
    assert right_score >= 0.7, (right_score, list(zip(expected, right, strict=True))[:12])
    assert swapped_score < 0.5 * right_score, swapped_score  # the answer follows the image, not the question


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


def _score(loaded, rows: list[Row]) -> float:
    bundle, family = loaded
    answers = generate_for_rows(
        family, bundle, rows, generation_settings({"max_new_tokens": 6}), batch_size=8
    )
    return exact_match(answers, [row.response for row in rows])


def test_prefetched_batches_give_the_same_answers_and_name_a_bad_row(pretrained_twin, colour_rows, tmp_path):
    """Images loaded and encoded on threads ahead of generation (the GPU default): the same answers as one
    batch after the other; a row whose image fails in a later batch is named."""
    from pipeline.data.images import ImageLoadError

    bundle, family = load_inference_bundle(str(pretrained_twin), device="cpu", dtype="float32")
    settings = generation_settings({"max_new_tokens": 6})
    rows = colour_rows[:14]
    plain = generate_for_rows(family, bundle, rows, settings, batch_size=3, prefetch=False)
    assert generate_for_rows(family, bundle, rows, settings, batch_size=3, prefetch=True) == plain
    broken = tmp_path / "cut.png"
    broken.write_bytes(Path(rows[0].images[0]).read_bytes()[:200])
    bad = Row(rows[-1].query, rows[-1].response, [], [str(broken)], None, "rows.jsonl:14")
    with pytest.raises(ImageLoadError, match="rows.jsonl:14: .*cut.png"):
        generate_for_rows(family, bundle, [*rows[:-1], bad], settings, batch_size=3, prefetch=True)


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
    """Layers point down: the twin's pre-training (pipeline/training/twin.py) uses both the families and the
    data; no family module imports the data, training, apps or stages layers."""
    above = ("pipeline.data", "pipeline.training", "pipeline.apps", "pipeline.stages", "pipeline.config")
    modules = sorted((PROJECT_ROOT / "pipeline" / "families").rglob("*.py"))
    assert len(modules) > 10
    for path in modules:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""] if node.level == 0 else []
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            for name in names:
                assert not name.startswith(above), (path, name)
