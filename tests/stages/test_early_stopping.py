"""trainer.early_stopping_patience: the sft stage ends with a checkpoint after that many evaluations in a row
without a better eval loss, the run folder says where; the same command then trains nothing more, and a run
resumed without the patience goes on from that checkpoint to its planned steps. trainer.metric_for_best_model:
the evaluation metric, and its direction, that picks sft/best and that early stopping watches."""

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


def test_the_best_checkpoint_is_picked_by_the_metric_named_in_its_direction(pretrained_twin, tmp_path):
    every_step = (*PLAN, "trainer.save_steps=1", "trainer.save_total_limit=10", "optim.lr=5e-3")
    for overrides, name, pick in (
        (("trainer.metric_for_best_model=token_acc",), "eval_token_acc", max),  # inferred: greater is better
        (
            ("trainer.metric_for_best_model=eval_token_acc", "trainer.greater_is_better=false"),
            "eval_token_acc",
            min,
        ),
        ((), "eval_loss", min),
    ):
        run_dir = tmp_path / name / pick.__name__
        out = run_stage(sft, make_cfg(pretrained_twin, *every_step, *overrides), run_dir)["sft"]
        by_step = {h["step"]: h[name] for h in out["eval_history"] if h["step"] > 0}
        assert len(by_step) == 8
        best = pick(by_step.values())
        first = min(step for step, value in by_step.items() if value == best)  # a tie does not replace it
        assert out["metric_for_best_model"] == name and out["best_metric"] == best
        assert out["best_checkpoint"].endswith(f"checkpoint-{first}")
        assert (run_dir / "sft" / "best").resolve().name == f"checkpoint-{first}"
        state = json.loads((run_dir / "sft" / f"checkpoint-{first}" / "trainer_state.json").read_text())
        assert state["best_metric_name"] == name


def test_a_resumed_run_that_names_another_metric_counts_its_patience_anew(pretrained_twin, tmp_path, caplog):
    run_stage(sft, make_cfg(pretrained_twin, *PLAN, *STILL), tmp_path)  # stops at step 3 by the eval loss
    with caplog.at_level(logging.INFO, logger="pipeline.training.loop"):
        out = run_stage(
            sft, make_cfg(pretrained_twin, *PLAN, *STILL, "trainer.metric_for_best_model=token_acc"), tmp_path
        )["sft"]
    assert "the best checkpoint and early stopping's count start again" in caplog.text
    # evaluation 4 sets token accuracy's best, 5 and 6 do not beat it (the rate moves nothing)
    assert out["resumed_from"].endswith("checkpoint-3") and out["stopped_early_at"] == 6
    assert (
        out["best_checkpoint"].endswith("checkpoint-4") and out["metric_for_best_model"] == "eval_token_acc"
    )


def test_a_metric_the_training_stage_does_not_report_is_refused_naming_those_it_does():
    from pipeline.config import ConfigError, validate
    from tests.helpers import compose_config

    with pytest.raises(
        ConfigError, match=r"metric_for_best_model='rouge_l': the sft stage evaluates loss, token_acc"
    ):
        validate(compose_config(["trainer.metric_for_best_model=rouge_l"]))
    with pytest.raises(ConfigError, match=r"'rewards/accuracies': the sft stage evaluates"):
        validate(compose_config(["trainer.metric_for_best_model=rewards/accuracies"]))
    with pytest.raises(
        ConfigError, match=r"'nll': the dpo stage evaluates loss, rewards/chosen, .*logps/rejected$"
    ):
        validate(compose_config(["+experiment=dpo", "trainer.metric_for_best_model=nll"]))
    for ok in (
        ["trainer.metric_for_best_model=eval_token_acc"],
        ["+experiment=dpo", "trainer.metric_for_best_model=rewards/accuracies"],
        ["+experiment=dpo", "trainer.metric_for_best_model=eval_nll", "preference.rpo_alpha=1.0"],
        ["stages=[eval]", "ckpt=base", "trainer.metric_for_best_model=anything"],  # nothing trains
    ):
        validate(compose_config(ok))
