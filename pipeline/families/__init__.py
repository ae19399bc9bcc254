"""The model families: one registry, one module per family, one conf/model/*.yaml per checkpoint.

    minicpm_v2     the project's own MiniCPM-V-2 implementation (pipeline/families/minicpm_v2/)
    minicpm_v4_6   MiniCPM-V 4.6 through transformers' minicpmv4_6
    qwen2_5_vl     Qwen2.5-VL (3B, 7B) through transformers' qwen2_5_vl
    qwen3_vl       Qwen3-VL (dense Instruct) through transformers' qwen3_vl

`FAMILIES` names each family's class without importing it, so the config schema can list the choices
without loading torch or transformers (and so do the LoRA presets and truncation policies below).
Adding a family = one module here + one line below + its yaml.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.families.checkpoints import MODEL_CONFIG

if TYPE_CHECKING:
    from .base import Family

FAMILIES: dict[str, str] = {
    "minicpm_v2": "pipeline.families.minicpm_v2.family:MiniCPMV2",
    "minicpm_v4_6": "pipeline.families.minicpm_v4_6:MiniCPMV4_6",
    "qwen2_5_vl": "pipeline.families.qwen2_5_vl:Qwen2_5_VL",
    "qwen3_vl": "pipeline.families.qwen3_vl:Qwen3_VL",
}
LORA_PRESETS = ("qkv", "all")  # lora.name's adapters (lora.name=none is full fine-tuning)
# dataset.truncation: drop a conversation longer than max_length, or cut it (MiniCPM-V-2's template only)
TRUNCATION_POLICIES = ("delete", "truncate")


def get_family(
    name: str, settings: Mapping[str, Any] | None = None, vision_attention: str = "auto"
) -> Family:
    """Returns the family named `name`, configured with its resolution settings and its vision towers'
    attention (model.vision_attention); unknown names are refused."""
    from .base import FamilyError

    if name not in FAMILIES:
        raise FamilyError(f"model.family={name} is not a known family; valid: {', '.join(FAMILIES)}")
    module, cls = FAMILIES[name].split(":")
    family = getattr(importlib.import_module(module), cls)(settings, vision_attention)
    if family.name != name:
        raise FamilyError(
            f"family class {FAMILIES[name]} calls itself {family.name!r}, registered as {name!r}"
        )
    return family


def locate_model(
    family: Family, path: str, build_if_missing: bool = False, allow_download: bool = False
) -> Path:
    """Returns the local folder of `path`: as it is, the tiny twin built there when asked, or downloaded."""
    folder = Path(path).expanduser()
    if build_if_missing and not (folder / MODEL_CONFIG).is_file():
        return family.build_tiny(folder)
    return family.resolve(path, allow_download)


def image_limit(model: Any) -> tuple[int, str]:
    """Returns (images per conversation, the model's name) of a `model` config node's family, for data
    validation before any weight loads."""
    family = get_family(model.family, None)
    return family.max_images, "MiniCPM-V-2" if family.name == "minicpm_v2" else f"model.family={family.name}"


def family_from_config(model: Any) -> Family:
    """Returns the family of a `model` config node with its resolution settings.

    MiniCPM-V-2 keeps its own keys (model.max_slice_nums, model.slice_mode); every other family takes the
    settings its processor accepts from model.processor_kwargs."""
    if model.family == "minicpm_v2":
        settings = {"max_slice_nums": model.max_slice_nums, "slice_mode": model.slice_mode}
    else:
        settings = dict(model.processor_kwargs)
    return get_family(model.family, settings, str(model.get("vision_attention", "auto")))
