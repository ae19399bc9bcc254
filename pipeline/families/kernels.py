"""Fused kernels for the HF-native families' training: liger-kernel's RMSNorm and SwiGLU MLP.

`model.fused_kernels`:
- auto (default): liger where it runs (a CUDA device, the `liger-kernel` package importable, the family states
  how its RMSNorm computes) and the decoder layers are not compiled: compiled layers get their norms and MLPs fused by
  the compiler already, so liger serves the runs compile leaves eager (several processes, FSDP/DeepSpeed,
  trainer.compile=false);
- liger: liger wherever it runs, compiled layers included; refused, with the reason, where it cannot run;
- off: transformers' own modules.

Liger's kernels are bound to the loaded model instance, module by module, through liger's autograd functions
(`liger_kernel.ops`): every RMSNorm of the family's language model (weight x normalised input, the family's
offset and casting order: Qwen2.5-VL / Qwen3-VL compute like Llama, MiniCPM-V 4.6's Qwen3.5 like Gemma with
1 + weight) and every gated SiLU MLP (down(silu(gate(x)) * up(x))) gets liger's forward; nothing in
transformers' modules changes, so a model built later in the process is transformers' own. The project binds
them itself instead of calling liger's per-model functions: those import liger's own output classes for each
transformers release and break when the two drift apart (liger-kernel 0.8.5 under transformers 5.24 did). Rotary
embeddings stay transformers' (the Qwen VLs' mRoPE is applied inside attention in transformers 5) and the loss
stays the project's (it feeds only the supervised positions to lm_head). Training only: evaluation and
generation load the model without it. A GPU test compares losses and gradients within bf16 rounding.

pip install 'pipeline[gpu]' installs liger-kernel (and flash-linear-attention, for MiniCPM-V 4.6).
"""

from __future__ import annotations

import importlib.util
import types
from typing import Literal

import torch
from torch import nn

from .base import FamilyError

CHOICES = ("auto", "liger", "off")
# how a family's RMSNorm computes: (offset added to the weight, liger's casting mode: "llama" normalises in
# fp32 and multiplies the weight in the input's dtype, "gemma" does all of it in fp32)
NormKind = tuple[float, Literal["llama", "gemma"]]
INSTALL = "pip install 'pipeline[gpu]' (liger-kernel)"


def liger_installed() -> bool:
    return (
        importlib.util.find_spec("liger_kernel") is not None
        and importlib.util.find_spec("triton") is not None
    )


def resolve(value: str, device: torch.device, norm: NormKind | None, compiled: bool) -> bool:
    """Returns whether liger's kernels are applied: see the module's docstring. `norm`: how the family's
    RMSNorm computes (None: the family has no fused kernels); `compiled`: whether the decoder layers are
    compiled."""
    if value not in CHOICES:
        raise FamilyError(f"model.fused_kernels={value} is not a valid choice; valid: {', '.join(CHOICES)}")
    if value == "off":
        return False
    runs = norm is not None and device.type == "cuda" and liger_installed()
    if value == "liger" and not runs:
        why = (
            "this model family has no fused kernels"
            if norm is None
            else "it runs on a CUDA device only"
            if device.type != "cuda"
            else f"liger-kernel is not installed: {INSTALL}"
        )
        raise FamilyError(
            f"model.fused_kernels=liger cannot run here: {why}; set model.fused_kernels=auto or off"
        )
    return runs and (value == "liger" or not compiled)


def is_rms_norm(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return (
        type(module).__name__.endswith("RMSNorm")
        and isinstance(weight, torch.Tensor)
        and weight.dim() == 1
        and norm_eps(module) is not None
    )


def norm_eps(module: nn.Module) -> float | None:
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    return float(eps) if isinstance(eps, (int, float)) else None


def is_gated_silu_mlp(module: nn.Module) -> bool:
    act = getattr(module, "act_fn", None)
    return all(hasattr(module, name) for name in ("gate_proj", "up_proj", "down_proj")) and type(
        act
    ).__name__ in ("SiLU", "SiLUActivation")


def apply(norm: NormKind, target: nn.Module) -> tuple[int, int]:
    """Binds liger's RMSNorm and SiLU-and-multiply kernels to every RMSNorm and gated SiLU MLP under `target`
    (this instance only); returns how many of each."""
    from liger_kernel.ops.rms_norm import LigerRMSNormFunction
    from liger_kernel.ops.swiglu import LigerSiLUMulFunction

    offset, casting = norm

    def rms_norm_forward(self: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        return LigerRMSNormFunction.apply(hidden, self.weight, norm_eps(self), offset, casting, False)

    def mlp_forward(self: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        return self.down_proj(LigerSiLUMulFunction.apply(self.gate_proj(hidden), self.up_proj(hidden)))

    norms = mlps = 0
    for module in target.modules():
        if is_rms_norm(module):
            module.forward = types.MethodType(rms_norm_forward, module)
            norms += 1
        elif is_gated_silu_mlp(module):
            module.forward = types.MethodType(mlp_forward, module)
            mlps += 1
    return norms, mlps
