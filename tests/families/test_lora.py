"""LoRA presets through PEFT: which biases train (lora.bias), and the base the adapter names."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from pipeline.families.minicpm_v2.configuration import MiniCPMVConfig
from pipeline.families.minicpm_v2.lora import apply_lora, build_lora_config
from pipeline.families.minicpm_v2.modeling import MiniCPMV
from pipeline.families.minicpm_v2.tiny import TINY_SIZES


def tiny_model() -> MiniCPMV:
    torch.manual_seed(0)
    return MiniCPMV(MiniCPMVConfig(vocab_size=1024, **TINY_SIZES))


def trainable_biases(model: torch.nn.Module) -> list[str]:
    return [name for name, p in model.named_parameters() if p.requires_grad and name.endswith(".bias")]


def test_bias_none_trains_no_bias_and_all_trains_every_bias():
    model = tiny_model()
    peft = apply_lora(model, build_lora_config(model, "qkv", r=4, alpha=8, dropout=0.0))
    assert trainable_biases(peft) == []
    model = tiny_model()
    biases = [name for name, _ in model.named_parameters() if name.endswith(".bias")]
    assert biases  # the vision tower and the resampler have biases
    peft = apply_lora(model, build_lora_config(model, "qkv", r=4, alpha=8, dropout=0.0, bias="all"))
    assert len(trainable_biases(peft)) == len(biases)
    assert any("lora_A" in name for name, p in peft.named_parameters() if p.requires_grad)


def test_trained_biases_are_saved_with_the_adapter_and_come_back(tmp_path: Path):
    model = tiny_model()
    base_weights = {k: v.clone() for k, v in model.state_dict().items()}
    config = build_lora_config(
        model, "all", r=4, alpha=8, dropout=0.0, bias="all", base_model_path="/models/base"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "base_model_name_or_path was renamed" warning either
        peft = apply_lora(model, config)
    name = next(name for name in trainable_biases(peft) if ".vpm." in name)
    with torch.no_grad():
        dict(peft.named_parameters())[name].add_(1.0)
    peft.save_pretrained(tmp_path / "adapter", safe_serialization=True)
    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert any(key.endswith(".bias") and "lora" not in key for key in saved)
    adapter_config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == "/models/base" and adapter_config["bias"] == "all"

    fresh = tiny_model()
    fresh.load_state_dict(base_weights)
    reloaded = PeftModel.from_pretrained(fresh, str(tmp_path / "adapter"))
    assert torch.equal(dict(reloaded.named_parameters())[name], dict(peft.named_parameters())[name])


@pytest.mark.parametrize("bias", ["none", "lora_only"])
def test_other_bias_choices_reach_peft(bias: str):
    model = tiny_model()
    assert build_lora_config(model, "qkv", r=4, alpha=8, dropout=0.0, bias=bias).bias == bias
