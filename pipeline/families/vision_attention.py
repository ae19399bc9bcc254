"""One attention call per layer over every image (or window) of a batch in the HF-native vision towers.

transformers' Qwen2.5-VL, Qwen3-VL and MiniCPM-V 4.6 towers pack all images of a batch into one sequence
with boundaries (`cu_seqlens`: images, or Qwen2.5-VL's 112-pixel windows). Without the flash-attn package
their attention loops in Python over those pieces, one SDPA call each, with a host sync per layer: a
batch of COCO photos is some 250 windows x 28 layers of tiny calls, and the step becomes launch-bound.
When the attention implementation's name says "flash", they pass the boundaries instead, in one call.

`enable(model)` registers such an implementation (`VARLEN`) and sets it on the vision tower's config only
(the language model keeps SDPA). It runs torch's own variable-length FlashAttention kernel
(`torch.nn.attention.varlen`, CUDA, bf16/fp16); elsewhere (CPU, fp32) the same attention is computed one
piece at a time with SDPA, with the same results (inside compiled vision blocks: one SDPA call with a
block-diagonal mask, so that the graph does not depend on where the pieces end). The setting lives on the loaded model only: saved
configs never name it (transformers does not serialise the attention implementation).

`model.vision_attention`: auto (varlen where the kernel runs: an Ampere-or-newer CUDA card, bf16/fp16
weights, torch with `torch.nn.attention.varlen`), varlen, or sdpa (transformers' default).
"""

from __future__ import annotations

import importlib.util
import inspect
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

VARLEN = "varlen_flash_vision"  # "flash" in the name: the towers pass their cu_seqlens in one call
CHOICES = ("auto", "varlen", "sdpa")


def _find_kernel() -> tuple[Any, frozenset[str]] | None:
    """Returns (torch's varlen_attn, the names of its parameters), or None when this torch has none."""
    if importlib.util.find_spec("torch.nn.attention.varlen") is None:
        return None
    from torch.nn.attention.varlen import varlen_attn

    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


# Looked up once, at import: compiled layers and vision blocks read it as a constant (torch.compile would
# trace a functools.cache'd lookup again in every graph).
_KERNEL = _find_kernel()


def _kernel() -> tuple[Any, frozenset[str]] | None:
    """Returns torch's variable-length FlashAttention and its parameters' names (the language model's packed
    attention, pipeline/families/packing.py, calls it too), or None."""
    return _KERNEL


def kernel_runs(device: torch.device, dtype: torch.dtype) -> bool:
    """Returns whether the variable-length kernel runs for weights of `dtype` on `device`: FlashAttention
    wants an Ampere-or-newer NVIDIA card (compute capability 8.0+) and half precision."""
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16) or _kernel() is None:
        return False
    return _ampere_or_newer(device.index or 0)


_CAPABLE: dict[int, bool] = {}


# Called inside compiled layers and vision blocks: torch.compile ignores `functools.cache` and would put the
# device query into the graph (a graph break in every layer); its result is a constant of the run instead.
@torch.compiler.assume_constant_result
def _ampere_or_newer(index: int) -> bool:
    if index not in _CAPABLE:
        _CAPABLE[index] = torch.version.hip is None and torch.cuda.get_device_capability(index) >= (8, 0)
    return _CAPABLE[index]


def resolve(value: str, device: torch.device, dtype: torch.dtype) -> bool:
    """Returns whether the vision towers use `VARLEN`: auto = where the kernel runs; varlen; sdpa = never."""
    if value not in CHOICES:
        raise ValueError(f"model.vision_attention={value} is not a valid choice; valid: {', '.join(CHOICES)}")
    return value == "varlen" or (value == "auto" and kernel_runs(device, dtype))


def varlen_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    cu_seq_lens_q: torch.Tensor | None = None,
    cu_seq_lens_k: torch.Tensor | None = None,
    max_length_q: int | None = None,
    max_length_k: int | None = None,
    is_causal: bool = False,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function contract: q/k/v (1, heads, T, dim) packed along T with the pieces'
    boundaries in cu_seq_lens_*; returns ((1, T, heads, dim), None). Vision attention only: bidirectional
    within each piece, no mask, no dropout."""
    if cu_seq_lens_q is None or attention_mask is not None or is_causal or (module.training and dropout):
        raise ValueError(
            f"{VARLEN} serves bidirectional vision attention over packed pieces (cu_seqlens), without a mask "
            "or dropout; use model.vision_attention=sdpa for this model"
        )
    cu_k = cu_seq_lens_q if cu_seq_lens_k is None else cu_seq_lens_k
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (T, heads, dim)
    if kernel_runs(q.device, q.dtype):
        fn, params = _kernel()
        takes_scale = "scale" in params
        cu_q, cu_k = cu_seq_lens_q.to(torch.int32), cu_k.to(torch.int32)
        max_q = int(max_length_q) if max_length_q else int((cu_q[1:] - cu_q[:-1]).max())
        max_k = int(max_length_k) if max_length_k else int((cu_k[1:] - cu_k[:-1]).max())
        if takes_scale:
            out = fn(q, k, v, cu_q, cu_k, max_q, max_k, scale=scale)
        else:  # the default scale is dim ** -0.5: fold any other into the queries
            out = fn(q * (scale * q.shape[-1] ** 0.5), k, v, cu_q, cu_k, max_q, max_k)
        return out.unsqueeze(0), None
    if torch.compiler.is_compiling():  # compiled vision blocks off the kernel (CPU, fp32)
        return block_diagonal_attention(q, k, v, cu_seq_lens_q, scale).unsqueeze(0), None
    bounds_q, bounds_k = cu_seq_lens_q.tolist(), cu_k.tolist()
    pieces = []
    for i in range(len(bounds_q) - 1):
        sq, sk = slice(bounds_q[i], bounds_q[i + 1]), slice(bounds_k[i], bounds_k[i + 1])
        if sq.stop == sq.start:  # an empty piece (cu_seqlens padded to a fixed count)
            continue
        pieces.append(
            F.scaled_dot_product_attention(
                q[sq].transpose(0, 1), k[sk].transpose(0, 1), v[sk].transpose(0, 1), scale=scale
            ).transpose(0, 1)
        )
    return torch.cat(pieces).unsqueeze(0), None


def block_diagonal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    scale: float,
    causal: bool = False,
    dropout: float = 0.0,
) -> torch.Tensor:
    """The same attention as one SDPA call with a block-diagonal mask built from `cu_seqlens` by tensor ops
    (q (T, heads, dim), k/v (T, kv heads, dim) -> (T, heads, dim); `causal` within each piece): what compiled
    blocks and layers run where the kernel does not, since a loop over the pieces reads their bounds on the
    host, which breaks the graph and specialises it on every boundary. T x T memory: for the CPU."""
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    positions = torch.arange(q.shape[0], device=q.device)
    piece = torch.bucketize(positions, cu_seqlens[1:].to(device=q.device, dtype=positions.dtype), right=True)
    mask = piece[:, None] == piece[None, :]
    if causal:
        mask = mask & (positions[:, None] >= positions[None, :])
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1),
        k.transpose(0, 1),
        v.transpose(0, 1),
        attn_mask=mask,
        dropout_p=dropout,
        scale=scale,
    )
    return out.transpose(0, 1)


def register() -> None:
    """Registers `VARLEN` with transformers' attention functions (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(VARLEN, varlen_attention)


def enable(model: nn.Module) -> int:
    """Sets `VARLEN` on every config object of the model's vision tower (the configs its attention layers
    read); returns how many. The model's other parts keep their implementation."""
    register()
    vision = getattr(model.config, "vision_config", None)
    if vision is None:
        return 0
    configs = {id(vision): vision}
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and type(config) is type(vision):
            configs[id(config)] = config
    for config in configs.values():
        config._attn_implementation_internal = VARLEN
    return len(configs)


def implementation(model: nn.Module) -> str | None:
    """Returns the vision tower's attention implementation (None when the model has no vision config)."""
    vision = getattr(model.config, "vision_config", None)
    return None if vision is None else vision._attn_implementation
