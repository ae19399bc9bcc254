"""Padding-free packing for the HF-native families: one row of samples back to back, attended sample by sample.

The collate (`PackedCollate`) lays every sample of a micro-batch end to end in one row [1, T] and says where
each one starts (`cu_seq_lens_q` / `cu_seq_lens_k`, int32 [segments + 1], and `max_length_q` / `max_length_k`:
the kwargs transformers hands on to attention functions and linear-attention layers). Positions restart at
0 for every sample, as the model computes them for that sample alone (the family's `packed_positions`). A
sample's first token carries no label, so the shifted loss never predicts across a boundary. The tail that
rounds T up to `pad_to_multiple` is its own trailing segment (pad ids, no labels, its own positions), so no
kernel attends into it or out of it.

The language model attends through `PACKED` (`enable(model)` sets it on the text config only; the vision
tower keeps its own). With `cu_seq_lens_q` in its kwargs it runs causal attention within each segment:
torch's variable-length FlashAttention kernel (`torch.nn.attention.varlen`) on CUDA in bf16/fp16, else one
causal SDPA call per segment with the same result. Without them (eval, generation, serve, any padded batch)
it is transformers' SDPA with the mask it is given, so enabling it changes nothing for those.

No T x T mask is built for a packed forward: `packed_forward` marks the forward as packed, and the mask
function registered for `PACKED` then returns None (outside it, it is SDPA's). The marker covers only mask
creation, which happens once per forward; the attention function decides by its kwargs alone, so the
recomputation of checkpointed layers during backward (after the context has closed) stays exact.
`packed_forward` also hands the cu_seq_lens to the language model's forward only (a forward pre-hook): the
top-level forward would pass them to the vision tower too, whose attention sets its own.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import vision_attention
from .base import IGNORE_INDEX, EncodedSample

PACKED = "varlen_causal_packed"  # no "flash" in the name: transformers then treats it as a plain function
# The batch keys of a packed row that are not model inputs of the top-level forward (see packed_forward).
SEGMENT_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
NUM_SAMPLES = "num_samples"  # how many samples a packed row holds (the training loop's samples/s)

_packed = contextvars.ContextVar("packed_forward", default=False)

# `positions(padded) -> (R, B, L)`: a family's position rows for every row of the right-padded view of the
# micro-batch (R = 1 for plain positions; 4 for the Qwen VLs' [text; t; h; w]).
Positions = Callable[[Mapping[str, Any]], torch.Tensor]


def text_positions(padded: Mapping[str, Any]) -> torch.Tensor:
    """Returns (1, B, L): 0, 1, 2, ... along each row's tokens of a right-padded batch (0 on the padding)."""
    mask = padded["attention_mask"]
    return ((mask.cumsum(-1) - 1).clamp(min=0) * mask).unsqueeze(0)


class PackedCollate:
    """The collate of packed training micro-batches of an HF-native family.

    Positions are computed here, in the DataLoader's worker processes on the CPU, beside the encoding: the
    Qwen VLs' mRoPE positions loop in Python over every sample and image (transformers' `get_rope_index`),
    which in the training process would stall the GPU once per micro-batch. The collate holds only the
    processor, the family and a `positions` callable that carries the model's config (not its weights), so
    it is cheap to fork and pickles small where workers are spawned.
    """

    def __init__(
        self,
        collate: Callable[[Sequence[EncodedSample]], dict[str, Any]],
        positions: Positions,
        pad_id: int,
        token_keys: Sequence[str] = (),
        pad_to_multiple: int = 1,
        segments: int | None = None,
        static: bool = False,
    ) -> None:
        self.collate = collate  # the family's right-padded training collate
        self.positions = positions
        self.pad_id = pad_id
        self.token_keys = tuple(token_keys)  # per-token inputs beside input_ids (mm_token_type_ids)
        self.pad_to_multiple = max(int(pad_to_multiple), 1)
        # cu_seq_lens padded to segments + 1 entries with empty segments (shapes that do not depend on how
        # many samples a row holds, for compiled layers); None: as many entries as segments
        self.segments = segments
        self.static = static  # shapes for compiled layers: see `pack`

    def __call__(self, samples: Sequence[EncodedSample]) -> dict[str, Any]:
        padded = self.collate(samples)
        return pack(
            padded,
            self.positions(padded),
            self.pad_id,
            self.token_keys,
            self.pad_to_multiple,
            self.segments,
            self.static,
        )


LADDER_STEP = 128  # the finest rounding of a static length (the varlen kernels' tile multiple)


def static_floor(bucket: int) -> int:
    """Returns the shortest static length of a bucket (`static_length`): a quarter of it, at least 128."""
    return min(max(bucket // 4, LADDER_STEP), bucket)


def static_length(total: int, bucket: int) -> int:
    """Returns the static length a packed row of `total` tokens is rounded up to for compiled layers: a
    ladder of four lengths per doubling in multiples of 128 (for a bucket of 4096: 1024, 1280, 1536, 1792,
    2048, 2560, 3072, 3584, 4096, 5120, 6144, ...), from a quarter of the bucket (the plan's
    `static_bucket`: a quarter of the micro-batch budget), which shorter rows take. A row is padded by less
    than a quarter of its length, whatever its share of the budget (MiniCPM-V 4.6's rows spend the budget
    mostly on vision patches: 1,108 language-model tokens went to 4,096 when rows were rounded to multiples
    of the bucket; Qwen3-VL's sixteen 360-token rows, 5,800 tokens, to 8,192), and a run compiles at most
    four lengths per doubling of its rows' lengths."""
    if bucket <= 1:
        return total
    floor = static_floor(bucket)
    if total <= floor:
        return floor
    octave = 1 << (total - 1).bit_length() - 1  # the power of two below total: total in (octave, 2 x octave]
    step = max(LADDER_STEP, octave // 4)
    return -(-total // step) * step


def pack(
    padded: Mapping[str, Any],
    positions: torch.Tensor,
    pad_id: int,
    token_keys: Sequence[str] = (),
    pad_to_multiple: int = 1,
    segments: int | None = None,
    static: bool = False,
) -> dict[str, Any]:
    """Returns the right-padded batch `padded` as one packed row (see the module's docstring).

    `static` (compiled layers, which trace one graph per distinct shape and integer): the row's length
    rounded up by `static_length` (`pad_to_multiple` the bucket), cu_seq_lens padded with empty segments to a
    power-of-two count (at least 8; unless `segments` fixes it), and max_length_* the row's length, so that a
    row's shapes depend on its static length alone.

    `positions` (R, B, L) holds the position rows of every padded row; the packed position_ids are (R, 1, T)
    (R = 4: [text; t; h; w], which transformers' Qwen text models take as such), or (1, T) when R = 1.
    Per-token inputs (input_ids, labels, `token_keys`) are gathered from the valid positions, row after
    row; pixel inputs are kept as they are (already joined in sample order).
    """
    mask = padded["attention_mask"].bool()
    lengths = mask.sum(1).tolist()
    if any(n == 0 for n in lengths):
        raise ValueError("cannot pack an empty sample")
    total = sum(lengths)
    length = (
        static_length(total, pad_to_multiple) if static else -(-total // pad_to_multiple) * pad_to_multiple
    )
    tail = length - total
    bounds = [0]
    for n in lengths:
        bounds.append(bounds[-1] + n)
    if tail:
        bounds.append(length)
    if static and segments is None:
        segments = max(8, 1 << (len(bounds) - 2).bit_length())  # the power of two >= len(bounds) - 1
    if segments is not None:
        if len(bounds) - 1 > segments:
            raise ValueError(
                f"a packed row of {len(lengths)} sample(s){' and its tail' if tail else ''} needs "
                f"{len(bounds) - 1} segments; only {segments} were asked for"
            )
        bounds += [length] * (segments + 1 - len(bounds))

    def row(values: torch.Tensor, fill: int) -> torch.Tensor:
        out = values[mask]
        return torch.cat([out, out.new_full((tail,), fill)]).unsqueeze(0)

    out: dict[str, Any] = {}
    for key, value in padded.items():
        if key == "attention_mask":
            out[key] = row(torch.ones_like(value), 0)  # 1 on the samples' tokens, 0 on the tail
        elif key == "input_ids":
            out[key] = row(value, pad_id)
        elif key == "labels":
            labels = row(value, IGNORE_INDEX)
            labels[0, bounds[: len(lengths)]] = IGNORE_INDEX  # no sample's first token is predicted
            out[key] = labels
        elif key in token_keys:
            out[key] = row(value, 0)
        else:
            out[key] = value  # pixel inputs
    gathered = positions[:, mask]  # (R, total)
    pad_positions = torch.arange(tail, dtype=gathered.dtype).expand(gathered.shape[0], tail)
    position_ids = torch.cat([gathered, pad_positions], dim=1).unsqueeze(1)  # (R, 1, T)
    out["position_ids"] = position_ids[0] if position_ids.shape[0] == 1 else position_ids
    cu = torch.tensor(bounds, dtype=torch.int32)
    longest = length if static else max(b - a for a, b in zip(bounds, bounds[1:], strict=False))
    out.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest, max_length_k=longest)
    out[NUM_SAMPLES] = len(lengths)
    return out


def is_packed(batch: Mapping[str, Any]) -> bool:
    """Returns whether a collated batch is one packed row (it carries segment boundaries)."""
    return "cu_seq_lens_q" in batch


# -- the language model's attention -------------------------------------------------------------------


# whether torch's variable-length FlashAttention runs for a dtype on a device: the vision towers' check
kernel_runs = vision_attention.kernel_runs


def autocast_inputs(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Returns the attention's inputs in autocast's lower precision where autocast is on for their device
    (the dtype torch's scaled_dot_product_attention computes in there), else as they are."""
    device = tensors[0].device.type
    if not torch.is_autocast_enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(t if t.dtype == dtype else t.to(dtype) for t in tensors)


def _kernel_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, longest: int, scale: float
) -> torch.Tensor:
    """Causal attention within each segment by torch's varlen kernel, whatever the torch release takes:
    `is_causal` (2.9/2.10) or `window_size=(-1, 0)` (2.11+); `scale` where it is taken (else folded into
    the queries); `enable_gqa` where it is taken (else the key/value heads are repeated). q (T, Hq, D),
    k/v (T, Hkv, D); returns (T, Hq, D)."""
    fn, params = vision_attention._kernel()
    options: dict[str, Any] = {}
    if "is_causal" in params:
        options["is_causal"] = True
    elif "window_size" in params:
        options["window_size"] = (-1, 0)
    else:
        raise RuntimeError("torch's varlen_attn takes neither is_causal nor window_size: cannot be causal")
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        if "enable_gqa" in params:
            options["enable_gqa"] = True
        else:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    if "scale" in params:
        options["scale"] = scale
    else:  # the default scale is dim ** -0.5
        q = q * (scale * q.shape[-1] ** 0.5)
    return fn(q, k, v, cu, cu, longest, longest, **options)


def _segment_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bounds: Sequence[int],
    scale: float,
    dropout: float,
) -> torch.Tensor:
    """The same attention one segment at a time with causal SDPA (CPU, fp32, older cards): q (Hq, T, D),
    k/v (Hkv, T, D); returns (T, Hq, D). Empty segments are skipped."""
    groups = q.shape[0] // k.shape[0]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=0), v.repeat_interleave(groups, dim=0)
    pieces = []
    for start, end in zip(bounds, bounds[1:], strict=False):
        if end > start:
            s = slice(start, end)
            out = F.scaled_dot_product_attention(
                q[:, s], k[:, s], v[:, s], dropout_p=dropout, is_causal=True, scale=scale
            )
            pieces.append(out.transpose(0, 1))
    return torch.cat(pieces)


def packed_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    cu_seq_lens_k: torch.Tensor | None = None,
    max_length_q: int | None = None,
    max_length_k: int | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function contract for the language model: q (B, Hq, T, D), k/v (B, Hkv, T, D)
    -> ((B, T, Hq, D), None). With cu_seq_lens (a packed row, B = 1): causal attention within each segment,
    no mask (queries and keys share the segments: cu_seq_lens_k is cu_seq_lens_q's copy, not read, so that
    no check syncs the GPU); without: transformers' SDPA with the mask given. Attention dropout in training
    takes the per-segment path (the kernel has no dropout)."""
    if cu_seq_lens_q is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if attention_mask is not None or query.shape[0] != 1:
        raise ValueError(f"{PACKED}: a packed batch is one row with no attention mask (cu_seq_lens instead)")
    # as torch's SDPA does under autocast (the padded path): fp32 weights (full fine-tuning) give fp32
    # queries once RoPE's fp32 tables have touched them, which the kernel takes only in half precision
    query, key, value = autocast_inputs(query, key, value)
    if kwargs.get("sliding_window") is not None:
        raise ValueError(f"{PACKED}: sliding-window attention is not supported for packed rows")
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    if kernel_runs(query.device, query.dtype) and not (module.training and dropout):
        cu = cu_seq_lens_q.to(device=query.device, dtype=torch.int32)
        longest = int(max_length_q) if max_length_q else int((cu[1:] - cu[:-1]).max())
        q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (T, heads, D)
        return _kernel_attention(q, k, v, cu, longest, scale).unsqueeze(0), None
    dropout = dropout if module.training else 0.0
    if torch.compiler.is_compiling():  # compiled layers off the kernel (CPU, fp32): no loop over segments
        q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (T, heads, D)
        out = vision_attention.block_diagonal_attention(
            q, k, v, cu_seq_lens_q, scale, causal=True, dropout=dropout
        )
        return out.unsqueeze(0), None
    out = _segment_attention(query[0], key[0], value[0], cu_seq_lens_q.tolist(), scale, dropout)
    return out.unsqueeze(0), None


def packed_mask(*args: Any, **kwargs: Any) -> torch.Tensor | None:
    """The mask function of `PACKED`: none inside `packed_forward` (the segments are in cu_seq_lens), SDPA's
    mask elsewhere."""
    if _packed.get():
        return None
    from transformers import masking_utils

    return masking_utils.sdpa_mask(*args, **kwargs)


def register() -> None:
    """Registers `PACKED` with transformers' attention and mask functions (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(PACKED, packed_attention)
    AttentionMaskInterface.register(PACKED, packed_mask)


def enable(language_model: nn.Module) -> int:
    """Sets `PACKED` on every config object of the language model's type in it (those its attention layers
    read); returns how many. Idempotent; the vision tower keeps its implementation."""
    register()
    text = language_model.config
    configs = {id(text): text}
    for module in language_model.modules():
        config = getattr(module, "config", None)
        if config is not None and type(config) is type(text):
            configs[id(config)] = config
    for config in configs.values():
        config._attn_implementation_internal = PACKED
    return len(configs)


@contextlib.contextmanager
def packed_forward(language_model: nn.Module, segments: Mapping[str, Any]) -> Iterator[None]:
    """Runs the forward inside as a packed one: the language model's forward (only it) gets `segments`
    (cu_seq_lens_q/k, max_length_q/k) as keyword arguments, and no attention mask is built."""
    if language_model.config._attn_implementation != PACKED:
        raise RuntimeError(f"packed_forward needs the language model's attention set to {PACKED} (enable)")
    extra = dict(segments)

    def add_segments(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return args, {**kwargs, **extra}

    handle = language_model.register_forward_pre_hook(add_segments, with_kwargs=True)
    token = _packed.set(True)
    try:
        yield
    finally:
        _packed.reset(token)
        handle.remove()
