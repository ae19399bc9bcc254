"""optim.name=adamw_bnb_8bit (bitsandbytes' 8-bit AdamW) through sft: full fine-tuning keeps its large tensors'
moments in 8 bits, trains, and resumes after a crash exactly as the uninterrupted run; the auto budget counts
its smaller state; an unknown optimizer is refused naming the key."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.config import ConfigError, validate
from pipeline.stages import engine, sft
from pipeline.training.plan import Launch, plan_training
from tests.entry.test_config import fake_card
from tests.helpers import compose_config, losses_by_step, run_stage, step_fails_at, twin_config

FULL = (
    "device=cpu",
    "stages=[sft]",
    "+experiment=full",
    "dataset.max_rows=40",
    "trainer.max_steps=6",
    "trainer.batch_size=2",
    "trainer.grad_accum=1",
    "trainer.save_steps=3",
    "trainer.eval_steps=3",
    "trainer.logging_steps=1",
    "trainer.max_eval_samples=2",
    "optim.lr=1e-3",
    "optim.name=adamw_bnb_8bit",
)


def test_8bit_adamw_trains_full_finetuning_and_resumes_exactly(family_twin, tmp_path, monkeypatch):
    import bitsandbytes as bnb

    twin = family_twin("minicpm_v2")
    optimizers = []
    real_build = engine.build_optimizer

    def recording(*args, **kwargs):
        optimizers.append(real_build(*args, **kwargs))
        return optimizers[-1]

    monkeypatch.setattr(engine, "build_optimizer", recording)
    run_stage(sft, twin_config(twin, *FULL), tmp_path / "whole")
    optimizer = optimizers[0]
    assert isinstance(optimizer, bnb.optim.AdamW8bit)
    states = [state for state in optimizer.state.values() if "state1" in state]
    assert any(state["state1"].dtype == torch.uint8 for state in states)  # 8-bit moments for large tensors
    whole = losses_by_step(tmp_path / "whole" / "sft")
    assert sorted(whole) == [1, 2, 3, 4, 5, 6] and all(math.isfinite(x) for x in whole.values())

    with step_fails_at(monkeypatch, 4, "killed"), pytest.raises(RuntimeError, match="killed"):
        run_stage(sft, twin_config(twin, *FULL), tmp_path / "run")
    run_stage(sft, twin_config(twin, *FULL), tmp_path / "run")
    assert losses_by_step(tmp_path / "run" / "sft") == pytest.approx(whole, rel=1e-6)


def test_the_auto_budget_counts_8bit_moments_and_bad_names_are_refused(compose, monkeypatch):
    fake_card(monkeypatch, 80)
    cuda = torch.device("cuda")

    def budget(*overrides: str) -> tuple[int, str]:
        cfg = compose(["model=qwen2_5_vl_tiny", "trainer=default", "+experiment=full", *overrides])
        plan = plan_training(cfg, Launch(cuda), compiles=False, parameters=3_750_000_000)
        return plan.loop.micro_batch_tokens, plan.describe()

    # Qwen2.5-VL-3B's state: 60 GB with torch's AdamW, 37.5 GB with 8-bit moments (half an 80 GiB card: 43 GB)
    assert budget()[0] == 4096
    tokens, described = budget("optim.name=adamw_bnb_8bit")
    assert tokens == 16384 and "optimizer: AdamW 8-bit (bitsandbytes)" in described
    with pytest.raises(ConfigError, match=r"optim\.name=adam"):
        validate(compose_config(["optim.name=adam"]))


def test_8bit_adamw_under_fsdp_is_refused_naming_the_engine_to_use(compose):
    # bitsandbytes' kernels take plain tensors, FSDP2's parameters are sharded DTensors; inside DeepSpeed's
    # ZeRO it steps flat partitions (tests/training/test_deepspeed.py resumes it exactly)
    cfg = compose(["model=qwen2_5_vl_tiny", "+experiment=full", "optim.name=adamw_bnb_8bit"])
    fsdp = Launch(torch.device("cuda"), processes=2, engine="FSDP")
    with pytest.raises(ConfigError, match=r"optim\.name=adamw_bnb_8bit.*FSDP.*deepspeed_zero3\.yaml"):
        plan_training(cfg, fsdp, compiles=False, parameters=3_750_000_000)
    deepspeed = Launch(torch.device("cuda"), processes=2, engine="DEEPSPEED")
    assert "AdamW 8-bit" in plan_training(cfg, deepspeed, compiles=False, parameters=3_750_000_000).describe()
