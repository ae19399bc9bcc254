"""The model families: one registry, one module per family, one conf/model/*.yaml per checkpoint.

    minicpm_v2     the project's own MiniCPM-V-2 implementation (its folder: minicpm_v2/)
    minicpm_v4_6   MiniCPM-V 4.6 through transformers' minicpmv4_6
    qwen2_5_vl     Qwen2.5-VL (3B, 7B) through transformers' qwen2_5_vl
    qwen3_vl       Qwen3-VL (dense Instruct) through transformers' qwen3_vl

`FAMILIES` names each family's class without importing it, so the config schema can list the choices
without loading torch or transformers (and so do the LoRA presets and truncation policies below).
Adding a family = one module here + one line below + its yaml.
"""

from __future__ import annotations

import importlib
import json
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
# model.chunked_loss: every family's loss of many supervised positions a chunk at a time (chunked_loss.py)
CHUNKED_LOSS_MODES = ("auto", "off")


def get_family(
    name: str,
    settings: Mapping[str, Any] | None = None,
    vision_attention: str = "auto",
    video: Mapping[str, Any] | None = None,
    **kernels: str,
) -> Family:
    """Returns the family named `name`, configured with its resolution settings, its vision towers'
    attention (model.vision_attention), its video frame sampling (`video`: the model.video_* keys) and its
    kernel choices (`kernels`: fused_kernels, linear_attention, decode, chunked_loss); unknown names are
    refused."""
    from .base import FamilyError

    if name not in FAMILIES:
        raise FamilyError(f"model.family={name} is not a known family; valid: {', '.join(FAMILIES)}")
    module, cls = FAMILIES[name].split(":")
    family = getattr(importlib.import_module(module), cls)(settings, vision_attention, video=video, **kernels)
    if family.name != name:
        raise FamilyError(
            f"family class {FAMILIES[name]} calls itself {family.name!r}, registered as {name!r}"
        )
    return family


def image_limit(model: Any) -> tuple[int, str]:
    """Returns (images per conversation, the model's display name) of a `model` config node's family, for
    data validation before any weight loads."""
    capabilities = get_family(model.family, None).capabilities
    return capabilities.max_images, capabilities.display_name


VIDEO_KEYS = ("video_fps", "video_max_frames", "video_max_pixels")  # model.* keys of frame sampling


def video_settings(model: Any) -> dict[str, Any]:
    """Returns the model.video_* keys of a `model` config node that are set (null: the processor's default)."""
    return {key: model.get(key) for key in VIDEO_KEYS if model.get(key) is not None}


def video_limit(model: Any) -> Any:
    """Returns the VideoLimits (videos per conversation, frame sampling in words) of a `model` config node's
    family, for data validation before any weight loads."""
    return get_family(model.family, None, video=video_settings(model)).video_limits()


def family_from_config(model: Any) -> Family:
    """Returns the family of a `model` config node with its resolution settings (the model.* keys its
    capabilities name) and its vision towers' attention."""
    family = get_family(model.family, None)
    return get_family(
        model.family,
        family.settings_from_config(model),
        str(model.get("vision_attention", "auto")),
        video=video_settings(model),
        fused_kernels=str(model.get("fused_kernels", "auto")),
        linear_attention=str(model.get("linear_attention", "auto")),
        decode=str(model.get("decode", "auto")),
        chunked_loss=str(model.get("chunked_loss", "auto")),
    )


def families_that(can: str) -> list[str]:
    """Returns the names of the families whose capability `can` (e.g. "packs") is true."""
    return [name for name in FAMILIES if getattr(get_family(name).capabilities, can)]


# The family of a model folder without a readable config.json: its loader then reports what is missing.
DEFAULT_FAMILY = "minicpm_v2"


def family_of_folder(model: str | Path) -> Family:
    """Returns the family that runs the model folder, by its config.json model_type, before any weight loads;
    a model_type no family runs raises ValueError naming the folder and the known model types."""
    config = Path(model).expanduser() / MODEL_CONFIG
    try:
        model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        return get_family(DEFAULT_FAMILY)  # a missing or broken folder is the loader's to report
    known = []
    for name in FAMILIES:
        family = get_family(name)
        if family.model_type == model_type:
            return family
        known.append(family.model_type)
    raise ValueError(
        f"{model} holds a {model_type!r} model (config.json model_type), which no family runs; "
        f"known model types: {', '.join(known)}"
    )
