"""`lora.modules_to_save` for the projector of every family: the projector trains whole beside the adapters,
and its checkpoint holds all of it (frozen tensors such as MiniCPM-V-2's resampler position table too)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from pipeline.families import get_family
from pipeline.stages import sft
from tests.helpers import run_stage, twin_config
from tests.training.test_part_lrs import SHORT_SFT

PROJECTOR = {  # family -> (model config, the projector's module name)
    "minicpm_v2": ("minicpm_v2_tiny", "resampler"),
    "qwen2_5_vl": ("qwen2_5_vl_tiny", "merger"),
    "minicpm_v4_6": ("minicpm_v4_6_tiny", "merger"),
}


@pytest.mark.parametrize("name", sorted(PROJECTOR))
def test_the_projector_trains_whole_and_is_saved_whole(family_twin, tmp_path, name):
    model, projector = PROJECTOR[name]
    family = get_family(name)
    folder = family_twin(name)
    cfg = twin_config(
        folder,
        f"model={model}",
        "+experiment=lora_qkv",
        f"lora.modules_to_save=[{projector}]",
        *SHORT_SFT,
        "trainer.eval_steps=2",
        "trainer.save_steps=2",  # the checkpoint read below
        "optim.warmup_ratio=0",
    )
    run_stage(sft, cfg, tmp_path / "run")
    saved = load_file(str(tmp_path / "run" / "sft" / "checkpoint-2" / "adapter_model.safetensors"))
    base = family.load_bundle(folder).core
    groups = family.freeze_groups()
    expected = {n for n, _ in base.named_parameters() if groups.of(n) == "projector"}
    # the projector's tensors under its saved copy's names, e.g. ...resampler.pos_embed
    held = {key for key in saved if f".{projector}." in f".{key}" and "lora_" not in key}
    assert held and len(held) >= len(expected), (sorted(held)[:5], sorted(expected)[:5])
    trained = [key for key in held if key.endswith(".weight") and saved[key].ndim == 2]
    base_state = base.state_dict()

    def base_of(key: str) -> torch.Tensor:
        tail = key.split(f"{projector}.", 1)[1]
        return next(t for n, t in base_state.items() if n.endswith(f"{projector}.{tail}"))

    assert any(not torch.equal(saved[key], base_of(key)) for key in trained)  # it trained
