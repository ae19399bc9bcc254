"""The learning-rate schedule through the sft stage: warmup by steps (optim.warmup_steps, over warmup_ratio)
and a cosine that decays to a floor (optim.min_lr_rate), as transformers' schedules define them."""

from __future__ import annotations

import math

import pytest

from pipeline.config import ConfigError, validate
from pipeline.stages import sft
from tests.helpers import compose_config, log_records, run_stage
from tests.helpers import twin_config as make_cfg

STEPS = 8
PLAN = (
    "+experiment=lora_qkv",
    f"trainer.max_steps={STEPS}",
    "trainer.logging_steps=1",
    "trainer.eval_steps=100",
    "trainer.batch_size=2",
    "trainer.max_eval_samples=2",
    "model.gradient_checkpointing=false",
    "optim.lr=1e-3",
)


def expected_rate(step: int, warmup: int, floor: float) -> float:
    """The rate of optimizer step `step` (1-based): linear warmup from 0, then a half cosine to `floor`."""
    done = step - 1  # the schedule's count before this step
    if done < warmup:
        return 1e-3 * done / warmup
    progress = (done - warmup) / (STEPS - warmup)
    return 1e-3 * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


@pytest.mark.parametrize(
    ("overrides", "warmup", "floor"),
    [
        (("optim.warmup_steps=3", "optim.min_lr_rate=0.1"), 3, 0.1),  # the steps win over the ratio
        (("optim.warmup_ratio=0.25",), 2, 0.0),
    ],
)
def test_the_logged_rates_follow_the_schedule(pretrained_twin, tmp_path, overrides, warmup, floor):
    run_stage(sft, make_cfg(pretrained_twin, *PLAN, *overrides), tmp_path)
    rates = {r["step"]: r["lr"] for r in log_records(tmp_path / "sft") if "lr" in r}
    assert sorted(rates) == list(range(1, STEPS + 1))
    for step, rate in rates.items():
        assert rate == pytest.approx(expected_rate(step + 1, warmup, floor), rel=1e-6, abs=1e-12), step
    assert rates[STEPS] == pytest.approx(1e-3 * floor, abs=1e-12)  # where the schedule ends


def test_a_floor_without_cosine_is_refused_before_any_model_loads():
    with pytest.raises(
        ConfigError,
        match=r"optim.min_lr_rate=0.1 is the floor of the cosine schedule; with optim.scheduler=linear",
    ):
        validate(compose_config(["optim.min_lr_rate=0.1", "optim.scheduler=linear"]))
