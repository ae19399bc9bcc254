"""The embedded default teaches something: fine-tuning the pre-trained twin on the demo set beats the base
model on the held-out rows, the run ends with the before/after table, and `ckpt=base` reproduces "before"."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.helpers import run_entry, run_folders

FAST = ("model.gradient_checkpointing=false",)  # the same result, sooner


def _run(args: list[str], cwd: Path) -> tuple[str, Path]:
    """Returns the stdout of `python -m pipeline <args>` started in `cwd`, and its run folder."""
    out = cwd / "out"
    proc = run_entry([*args, f"output_root={out}"], cwd, timeout=500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = run_folders(out)
    return proc.stdout, run_dir


@pytest.fixture(scope="module")
def qkv_run(pretrained_twin, tmp_path_factory) -> tuple[str, Path, Path]:
    """`make run`'s experiment (sft and eval), started in a folder of its own."""
    cwd = tmp_path_factory.mktemp("qkv")
    return (*_run(["+experiment=lora_qkv", "stages=[sft,eval]", *FAST], cwd), cwd)


def _check_before_after(stdout: str, run_dir: Path, cwd: Path, twin: Path) -> None:
    comparison = json.loads((run_dir / "eval" / "comparison.json").read_text())
    base, tuned = comparison["base"], comparison["finetuned"]
    assert tuned["eval_loss"] <= 0.8 * base["eval_loss"], comparison
    assert tuned["exact_match"] >= base["exact_match"] + 0.3, comparison
    # the table closes the run: both columns, and three answers with the image each was given
    table = stdout[stdout.index("before/after fine-tuning") :]
    assert "base" in table and "fine-tuned" in table and "exact_match" in table
    assert len(comparison["examples"]) == 3
    for example in comparison["examples"]:
        assert example["image"].endswith(".png") and example["image"] in table
        assert repr(example["base"]) in table and repr(example["finetuned"]) in table
    # started in another folder: the run used (and recorded) the checkout's twin, and built none there
    assert OmegaConf.load(run_dir / "config.yaml").model.path == str(twin)
    assert not (cwd / ".cache").exists()


def test_lora_qkv_on_the_demo_beats_the_base_model(qkv_run, pretrained_twin):
    _check_before_after(*qkv_run, pretrained_twin)


@pytest.mark.slow
@pytest.mark.parametrize("experiment", ["lora_all", "full"])
def test_lora_all_and_full_on_the_demo_beat_the_base_model(pretrained_twin, tmp_path, experiment):
    _check_before_after(
        *_run([f"+experiment={experiment}", "stages=[sft,eval]", *FAST], tmp_path), tmp_path, pretrained_twin
    )


def test_eval_of_the_base_reproduces_the_before_column(qkv_run, tmp_path):
    _, trained, _ = qkv_run
    before = json.loads((trained / "eval" / "comparison.json").read_text())["base"]
    _, evaluated = _run(["stages=[eval]", "ckpt=base"], tmp_path)
    metrics = json.loads((evaluated / "eval" / "metrics.json").read_text())
    assert metrics["eval_loss"] == pytest.approx(before["eval_loss"], rel=1e-5)
    assert metrics["exact_match"] == before["exact_match"]
    assert not (evaluated / "eval" / "comparison.json").exists()  # nothing to compare the base with
