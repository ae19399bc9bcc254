"""trainer.early_stopping_patience: the sft stage ends with a checkpoint after that many evaluations in a row
without a better eval loss, the run folder says where; the same command then trains nothing more, and a run
resumed without the patience goes on from that checkpoint to its planned steps."""

from __future__ import annotations

import json
import logging

import pytest

from pipeline.stages import sft
from pipeline.training.checkpoints import list_checkpoints
from pipeline.training.loop import TrainingError
from tests.helpers import eval_losses, losses_by_step, run_stage
from tests.helpers import twin_config as make_cfg

PLAN = (
    "+experiment=lora_qkv",
    "trainer.max_steps=8",
    "trainer.eval_steps=1",
    "trainer.save_steps=4",
    "trainer.logging_steps=1",
    "trainer.batch_size=2",
    "trainer.max_eval_samples=4",
    "model.gradient_checkpointing=false",
)
# a rate at which nothing moves: every evaluation after the first fails to beat it by the threshold
STILL = ("optim.lr=1e-12", "trainer.early_stopping_patience=2", "trainer.early_stopping_threshold=0.001")


def test_a_run_without_gain_stops_at_its_patience_and_goes_on_without_it(pretrained_twin, tmp_path, caplog):
    out = run_stage(sft, make_cfg(pretrained_twin, *PLAN, *STILL), tmp_path)
    sft_dir = tmp_path / "sft"
    # evaluation 1 sets the best, 2 and 3 do not beat it: the run stops at step 3, with a checkpoint there
    assert out["sft"]["stopped_early_at"] == 3 and out["sft"]["global_step"] == 3
    assert sorted(losses_by_step(sft_dir)) == [1, 2, 3]
    assert [p.name for p in list_checkpoints(sft_dir)] == ["checkpoint-3"]
    assert (sft_dir / "last").resolve().name == "checkpoint-3"
    state = json.loads((sft_dir / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["evals_without_gain"] == 2 and state["stopped_early_at"] == 3
    summary = json.loads((sft_dir / "summary.json").read_text())
    assert summary["stopped_early_at"] == 3

    # the same command again: the patience is spent, nothing trains
    with caplog.at_level(logging.INFO, logger="pipeline.training.loop"):
        again = run_stage(sft, make_cfg(pretrained_twin, *PLAN, *STILL), tmp_path)
    assert again["sft"]["global_step"] == 3 and sorted(losses_by_step(sft_dir)) == [1, 2, 3]
    assert "nothing left to train" in caplog.text

    # without the patience it resumes from checkpoint-3 to the planned 8 steps
    on = run_stage(sft, make_cfg(pretrained_twin, *PLAN, "optim.lr=1e-12"), tmp_path)
    assert on["sft"]["resumed_from"].endswith("checkpoint-3") and on["sft"]["stopped_early_at"] is None
    assert sorted(losses_by_step(sft_dir)) == list(range(1, 9)) and sorted(eval_losses(sft_dir))[-1] == 8


def test_a_learning_run_is_not_stopped(pretrained_twin, tmp_path):
    # the strictest patience: every evaluation after the first lowers the eval loss here
    cfg = make_cfg(pretrained_twin, *PLAN, "optim.lr=5e-3", "trainer.early_stopping_patience=1")
    out = run_stage(sft, cfg, tmp_path)
    assert out["sft"]["stopped_early_at"] is None and out["sft"]["global_step"] == 8


def test_patience_without_validation_rows_is_refused_naming_the_keys(pretrained_twin, tmp_path):
    cfg = make_cfg(pretrained_twin, *PLAN, "dataset.test_ratio=0", "trainer.early_stopping_patience=2")
    with pytest.raises(TrainingError, match=r"trainer\.early_stopping_patience=2 .*dataset\.test_ratio"):
        run_stage(sft, cfg, tmp_path)


def test_patience_without_held_out_rows_is_refused_before_any_model_loads():
    from pipeline.config import ConfigError, validate
    from tests.helpers import compose_config

    with pytest.raises(ConfigError, match=r"trainer\.early_stopping_patience=3 .*dataset\.test_ratio=0"):
        validate(compose_config(["trainer.early_stopping_patience=3", "dataset.test_ratio=0"]))
    validate(compose_config(["trainer.early_stopping_patience=3"]))  # the default split holds rows out
