"""Which parameters train: LoRA presets (`qkv`, `all`) through PEFT, or full fine-tuning with freeze switches."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

from torch import nn

from pipeline.families import LORA_PRESETS

from .modeling import MiniCPMV

if TYPE_CHECKING:
    from peft import LoraConfig, PeftModel

# ms-swift's default for this model (LoRATM.llama): the LLM's q/k/v projections.
QKV_PATTERN = r"llm\.model\.layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj)"
# nn.MultiheadAttention reads out_proj.weight directly (its forward is never called), so a LoRA there
# would train nothing; lm_head stays out as in ms-swift's `ALL`.
ALL_EXCLUDED = ("llm.lm_head", "resampler.attn.out_proj")


def all_linear_names(model: nn.Module) -> list[str]:
    """Returns the full names of every nn.Linear that `all` targets (vision tower and resampler included)."""
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name not in ALL_EXCLUDED
    ]


def lora_target_regex(model: nn.Module, preset: str, target_modules: Sequence[str] | None) -> str:
    """Returns a full-match regex over module names for PEFT's `target_modules`."""
    if target_modules:
        names = [n for n, _ in model.named_modules()]
        pattern = "|".join(f"(?:{t})" for t in target_modules)
        hits = [
            n for n in names if re.fullmatch(pattern, n) or any(n.endswith(f".{t}") for t in target_modules)
        ]
        if not hits:
            raise ValueError(
                f"lora.target_modules {list(target_modules)} match no module; examples of names: "
                f"{[n for n in names if n.endswith('q_proj')][:2] + [n for n in names if 'fc1' in n][:1]}"
            )
        return "|".join(re.escape(n) for n in hits)
    if preset == "qkv":
        return QKV_PATTERN
    if preset == "all":
        return "|".join(re.escape(n) for n in all_linear_names(model))
    raise ValueError(f"lora.name must be one of {list(LORA_PRESETS)}, got {preset!r}")


def build_lora_config(
    model: MiniCPMV,
    preset: str,
    r: int,
    alpha: float,
    dropout: float,
    target_modules: Sequence[str] | None = None,
    modules_to_save: Sequence[str] | None = None,
    base_model_path: str | None = None,
    bias: str = "none",
) -> LoraConfig:
    """Returns the PEFT LoraConfig for a preset (or explicit target modules).

    ``bias``: "none", "all" (every bias of the model trains, as ms-swift's lora_bias_trainable=all) or
    "lora_only" (the biases of the adapted layers); trained biases are saved with the adapter.
    """
    from peft import LoraConfig

    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=lora_target_regex(model, preset, target_modules),
        modules_to_save=list(modules_to_save) if modules_to_save else None,
        bias=bias,
    )
    config.base_model_name_or_path = base_model_path
    return config


def apply_lora(model: MiniCPMV, config: LoraConfig) -> PeftModel:
    """Returns the PEFT-wrapped model; only LoRA weights (and modules_to_save) require grad.

    PEFT names the base in adapter_config.json after the model's `name_or_path`, so the base named in
    `config` (a folder or hub id) is written there, where `PeftModel`/`AutoPeftModel` look for it.
    """
    from peft import get_peft_model

    if config.base_model_name_or_path:
        model.name_or_path = config.base_model_name_or_path
    peft_model = get_peft_model(model, config)
    model.resampler.pos_embed.requires_grad_(False)
    return peft_model


def set_full_finetune(
    model: MiniCPMV, freeze_vision: bool = False, freeze_resampler: bool = False, freeze_llm: bool = False
) -> None:
    """Makes every parameter trainable except the frozen parts and the fixed query position table."""
    for name, param in model.named_parameters():
        part = name.split(".")[0]
        frozen = {"vpm": freeze_vision, "resampler": freeze_resampler, "llm": freeze_llm}.get(part, False)
        param.requires_grad_(not frozen)
    model.resampler.pos_embed.requires_grad_(False)
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(
            "lora=none with freeze_vision, freeze_resampler and freeze_llm all true trains nothing"
        )
