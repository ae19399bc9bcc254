"""Fused kernels for the HF-native families' training: liger-kernel's RMSNorm and SwiGLU MLP.

`model.fused_kernels`:
- auto (default): liger where it runs (a CUDA device, the `liger-kernel` package importable, the family names
  its liger patch) and the decoder layers are not compiled: compiled layers get their norms and MLPs fused by
  the compiler already, so liger serves the runs compile leaves eager (several processes, FSDP/DeepSpeed,
  trainer.compile=false);
- liger: liger wherever it runs, compiled layers included; refused, with the reason, where it cannot run;
- off: transformers' own modules.

Liger's patch is applied to the loaded model instance: its norms' and MLPs' forwards become liger's Triton
kernels, the same computation (a GPU test compares losses and gradients within bf16 rounding). Liger's
functions also replace classes and functions in transformers' modeling module; those are put back at once,
so only that model is fused (a model built later in the process is transformers' own). Rotary embeddings stay transformers' (the Qwen VLs' mRoPE is
applied inside attention in transformers 5, where liger's rope patch no longer reaches) and the loss stays
the project's (it feeds only the supervised positions to lm_head). Training only: evaluation and generation
load the model without it.

pip install 'pipeline[gpu]' installs liger-kernel (and flash-linear-attention, for MiniCPM-V 4.6).
"""

from __future__ import annotations

import importlib.util
import sys

import torch
from torch import nn

from .base import FamilyError

CHOICES = ("auto", "liger", "off")
INSTALL = "pip install 'pipeline[gpu]' (liger-kernel)"


def liger_installed() -> bool:
    return (
        importlib.util.find_spec("liger_kernel") is not None
        and importlib.util.find_spec("triton") is not None
    )


def resolve(value: str, device: torch.device, patch: str | None, compiled: bool) -> bool:
    """Returns whether liger's kernels are applied: see the module's docstring. `patch`: the family's liger
    function (None: the family has none); `compiled`: whether the decoder layers are compiled."""
    if value not in CHOICES:
        raise FamilyError(f"model.fused_kernels={value} is not a valid choice; valid: {', '.join(CHOICES)}")
    if value == "off":
        return False
    runs = patch is not None and device.type == "cuda" and liger_installed()
    if value == "liger" and not runs:
        why = (
            "this model family has no liger patch"
            if patch is None
            else "it runs on a CUDA device only"
            if device.type != "cuda"
            else f"liger-kernel is not installed: {INSTALL}"
        )
        raise FamilyError(
            f"model.fused_kernels=liger cannot run here: {why}; set model.fused_kernels=auto or off"
        )
    return runs and (value == "liger" or not compiled)


def apply(patch: str, target: nn.Module) -> None:
    """Applies liger's `patch` (a function of liger_kernel.transformers, e.g.
    apply_liger_kernel_to_qwen2_5_vl) to the model instance `target`: norms and MLPs only."""
    import liger_kernel.transformers as liger

    modeling = sys.modules[type(target).__module__]
    saved = dict(vars(modeling))
    try:
        getattr(liger, patch)(rope=False, cross_entropy=False, fused_linear_cross_entropy=False, model=target)
    finally:
        for name, value in saved.items():
            if getattr(modeling, name, None) is not value:
                setattr(modeling, name, value)
