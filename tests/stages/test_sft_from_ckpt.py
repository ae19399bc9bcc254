"""sft with `ckpt=`: training goes on from an earlier run's adapter (as that adapter, with a fresh optimizer,
schedule and data order) or full weights; what cannot start from them is refused naming the keys."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from pipeline.config import ConfigError, validate
from pipeline.stages import sft
from pipeline.training.checkpoints import CheckpointError
from tests.helpers import compose_config, eval_losses, losses_by_step, run_stage
from tests.helpers import twin_config as make_cfg

STEPS = (
    "trainer.max_steps=4",
    "trainer.eval_steps=4",
    "trainer.logging_steps=1",
    "trainer.batch_size=2",
    "trainer.max_eval_samples=4",
    "model.gradient_checkpointing=false",
)
PLAN = ("+experiment=lora_qkv", *STEPS)


@pytest.fixture(scope="module")
def first_run(pretrained_twin, tmp_path_factory):
    """A LoRA run that learned something: its last checkpoint is where the next runs start."""
    run_dir = tmp_path_factory.mktemp("first")
    run_stage(sft, make_cfg(pretrained_twin, *PLAN, "optim.lr=5e-3"), run_dir)
    return run_dir


def test_an_adapter_trains_on_from_where_it_was(pretrained_twin, first_run, tmp_path):
    ckpt = first_run / "sft" / "checkpoint-4"
    # at a rate that moves nothing, the run starts and ends at the first run's adapter and eval loss
    still = make_cfg(pretrained_twin, *PLAN, f"ckpt={ckpt}", "optim.lr=1e-12")
    out = run_stage(sft, still, tmp_path / "on")
    assert out["sft"]["resumed_from"] is None and out["sft"]["global_step"] == 4  # a new run of 4 steps
    before = load_file(str(ckpt / "adapter_model.safetensors"))
    after = load_file(str(tmp_path / "on" / "sft" / "checkpoint-4" / "adapter_model.safetensors"))
    assert before.keys() == after.keys()
    for name in before:
        torch.testing.assert_close(after[name], before[name], atol=1e-6, rtol=1e-5, msg=name)
    start = eval_losses(tmp_path / "on" / "sft")[0]
    assert start == pytest.approx(eval_losses(first_run / "sft")[4], rel=1e-5)
    # from the base model instead, the same run starts at the base's eval loss, well above it
    fresh = run_stage(sft, make_cfg(pretrained_twin, *PLAN, "optim.lr=1e-12"), tmp_path / "fresh")
    assert fresh["sft"]["global_step"] == 4
    assert eval_losses(tmp_path / "fresh" / "sft")[0] > start + 0.1
    # the run folder works too (its best checkpoint), and training on moves the adapter further
    moving = make_cfg(pretrained_twin, *PLAN, f"ckpt={first_run}", "optim.lr=5e-3")
    run_stage(sft, moving, tmp_path / "further")
    assert losses_by_step(tmp_path / "further" / "sft")[1] < losses_by_step(first_run / "sft")[1]


def test_full_weights_are_trained_on_and_named_as_the_new_adapters_base(pretrained_twin, tmp_path):
    full_run = tmp_path / "full"
    run_stage(sft, make_cfg(pretrained_twin, "+experiment=full", *STEPS, "optim.lr=1e-3"), full_run)
    ckpt = full_run / "sft" / "checkpoint-4"
    run_stage(sft, make_cfg(pretrained_twin, *PLAN, f"ckpt={ckpt}", "optim.lr=5e-3"), tmp_path / "lora")
    saved = json.loads((tmp_path / "lora" / "sft" / "checkpoint-4" / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == str(ckpt)


def test_an_adapter_of_other_settings_is_refused_naming_them(pretrained_twin, first_run, tmp_path):
    cfg = make_cfg(pretrained_twin, *PLAN, f"ckpt={first_run / 'sft' / 'checkpoint-4'}", "lora.r=4")
    with pytest.raises(CheckpointError, match=r"lora\.r"):
        run_stage(sft, cfg, tmp_path)


@pytest.mark.parametrize(
    ("overrides", "said"),
    [
        (["lora=none"], "is a LoRA adapter and lora=none asks for full fine-tuning"),
        (["lora.init_weights=pissa"], "lora.init_weights=pissa would start a new one"),
    ],
)
def test_what_cannot_start_from_an_adapter_is_refused(pretrained_twin, first_run, tmp_path, overrides, said):
    cfg = make_cfg(pretrained_twin, *PLAN, f"ckpt={first_run / 'sft' / 'checkpoint-4'}", *overrides)
    with pytest.raises(ConfigError, match=said.replace(".", r"\.")):
        run_stage(sft, cfg, tmp_path)


def test_a_missing_ckpt_is_refused_before_training(tmp_path):
    with pytest.raises(ConfigError, match=r"ckpt=.*nowhere does not exist"):
        validate(compose_config(["stages=[sft]", f"ckpt={tmp_path / 'nowhere'}"]))
