"""Packed rows through Qwen3.5's linear-attention layers (GatedDeltaNet, MiniCPM-V 4.6's language model).

A GatedDeltaNet layer runs a causal depthwise convolution and a recurrence along the sequence. On a packed
row both would carry state from one sample into the next: transformers' PyTorch code ignores the
cu_seq_lens it is handed. `enable(language_model)` wraps every such layer's forward so that a packed
forward (cu_seq_lens_q in its kwargs) is exact:

- where flash-linear-attention (`fla`) is installed and the row is on CUDA, the layer runs on its
  variable-length kernels (`causal_conv1d` and `chunk_gated_delta_rule` with cu_seqlens), which restart
  the convolution and the state at every boundary (`_fla_forward`, the one place that names fla);
- elsewhere the layer's own forward runs once on the row's samples as a right-padded batch (empty segments
  skipped) and their tokens are joined back: causal convolution and recurrence never see a sample's padding,
  so each is its result alone.

Unpacked forwards (no cu_seq_lens: eval, generation with its cache) go to the layer's forward unchanged.

`model.linear_attention` (the choice `enable` binds to each layer, resolved at load by `resolve`): auto =
flash-linear-attention's kernels where they run (the package installed, a CUDA device, and a small gated
delta rule forward and backward passing on that device: fla refuses its gated backward on Hopper under
Triton 3.4-3.7.0, where its Triton kernel computes wrong gradients, unless tilelang is installed (and nvcc
found), which fla then uses for that kernel; transformers picks the kernels for unpacked rows itself)
and transformers' PyTorch code elsewhere, with a warning saying why; fla = the same, refused where they cannot
run; torch = transformers' PyTorch code always (the switch that turns the lever off), for packed and unpacked
rows alike.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import inspect
import logging
import threading
import warnings
import weakref
from collections.abc import Callable, Iterator
from typing import Any, ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .base import FamilyError
from .packing import SEGMENT_KEYS

logger = logging.getLogger(__name__)

CHOICES = ("auto", "fla", "torch")
# transformers' Qwen3.5 functions that pick flash-linear-attention's (or causal-conv1d's) kernel when installed
KERNEL_FUNCTIONS = (
    "torch_chunk_gated_delta_rule",
    "torch_recurrent_gated_delta_rule",
    "causal_conv1d_fn",
    "causal_conv1d_update",
)
_TORCH_ONLY = threading.RLock()


def _is_gated_delta_net(module: nn.Module) -> bool:
    from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5GatedDeltaNet

    return isinstance(module, Qwen3_5GatedDeltaNet)


def fla_installed() -> bool:
    return importlib.util.find_spec("fla") is not None


@functools.cache
def fla_trains(device: torch.device) -> str | None:
    """Runs one small gated delta rule forward and backward on fla's kernels on `device` (bf16, the training
    dtype) and returns None where that works, else fla's error: fla raises rather than compute wrong gradients
    on some GPU and Triton pairs (Hopper under Triton 3.4-3.7.0)."""
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule

    generator = torch.Generator(device=device).manual_seed(0)

    def draw(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=device, generator=generator, dtype=torch.bfloat16)

    q, k, v = (draw(1, 64, 1, 64).requires_grad_() for _ in range(3))
    g = F.logsigmoid(draw(1, 64, 1)).requires_grad_()
    beta = torch.sigmoid(draw(1, 64, 1)).requires_grad_()
    try:
        out, _ = chunk_gated_delta_rule(q, k, v, g=g, beta=beta, use_qk_l2norm_in_kernel=True)
        out.float().sum().backward()
        torch.cuda.synchronize(device)
    except Exception as error:  # noqa: BLE001 - any failure means: not on this device
        return f"{type(error).__name__}: {error}"
    return None


def resolve(choice: str, device: torch.device, quiet: bool = False) -> str:
    """The model.linear_attention choice bound for a model on `device`: `choice` itself, except that auto
    becomes torch, with a warning, where fla is installed but fails its check on this CUDA device (see the
    module's docstring). Refuses a value that is not a choice, and fla where its kernels cannot run."""
    if choice not in CHOICES:
        raise FamilyError(
            f"model.linear_attention={choice} is not a valid choice; valid: {', '.join(CHOICES)}"
        )
    if choice == "torch" or (choice == "auto" and not (device.type == "cuda" and fla_installed())):
        return choice
    if device.type != "cuda" or not fla_installed():
        why = "it runs on a CUDA device only" if device.type != "cuda" else "the fla package is not installed"
        raise FamilyError(
            f"model.linear_attention=fla cannot run here: {why} (pip install 'pipeline[gpu]'); "
            "set model.linear_attention=auto or torch"
        )
    failure = fla_trains(
        device if device.index is not None else torch.device("cuda", torch.cuda.current_device())
    )
    if failure is None:
        if not quiet:
            logger.info(
                "linear attention: flash-linear-attention's kernels; on a machine's first run they benchmark "
                "their configurations before the first steps (minutes; Triton keeps the results for later runs)"
            )
        return choice
    if choice == "fla":
        raise FamilyError(
            f"model.linear_attention=fla cannot run on this GPU: flash-linear-attention's gated delta rule "
            f"failed its check ({failure}); set model.linear_attention=torch, or upgrade Triton / install "
            "tilelang as fla's message says"
        )
    if not quiet:
        warnings.warn(
            f"model.linear_attention=auto: flash-linear-attention's kernels fail on this GPU ({failure}); the "
            "linear-attention layers run on transformers' PyTorch code (slower; on Hopper, pip install tilelang "
            "with nvcc on the machine gives fla the kernel it asks for)",
            stacklevel=2,
        )
    return "torch"


def enable(language_model: nn.Module, choice: str = "auto") -> int:
    """Wraps the forward of every GatedDeltaNet layer of the language model for packed rows and binds the
    model.linear_attention `choice` to it (again with another choice: rebinds); returns how many layers.
    Whether the kernel packages are installed is bound too, looked up here, eagerly: inside a compiled layer
    the package lookup (importlib) would split the graph at every linear-attention layer."""
    installed = KernelPackages.find()
    count = 0
    for module in language_model.modules():
        if not _is_gated_delta_net(module):
            continue
        forward = module.forward
        if isinstance(forward, functools.partial) and forward.func is _packed_or_plain:
            forward = forward.args[1]  # the layer's own forward
        module.forward = functools.partial(_packed_or_plain, module, forward, choice, installed)
        count += 1
    return count


def choice_of(language_model: nn.Module) -> str | None:
    """Returns the model.linear_attention choice bound to the language model's layers (None: not wrapped)."""
    for module in language_model.modules():
        forward = getattr(module, "forward", None)
        if isinstance(forward, functools.partial) and forward.func is _packed_or_plain:
            return forward.args[2]
    return None


class KernelPackages(NamedTuple):
    """Which packages with kernels for these layers are installed: fla, and any that transformers' Qwen3.5
    code picks by itself for unpacked rows (fla, causal-conv1d); all of them run on CUDA tensors only."""

    fla: bool
    any: bool

    @classmethod
    def find(cls) -> KernelPackages:
        fla = fla_installed()
        return cls(fla, fla or importlib.util.find_spec("causal_conv1d") is not None)


@contextlib.contextmanager
def torch_only() -> Iterator[None]:
    """Runs transformers' Qwen3.5 linear-attention code on its PyTorch functions inside (model.linear_attention
    =torch), whatever kernel packages are installed; one forward at a time."""
    from transformers.models.qwen3_5 import modeling_qwen3_5 as modeling

    with _TORCH_ONLY:
        saved = {name: getattr(modeling, name) for name in KERNEL_FUNCTIONS if hasattr(modeling, name)}
        try:
            for name, fn in saved.items():
                setattr(modeling, name, inspect.unwrap(fn))
            yield
        finally:
            for name, fn in saved.items():
                setattr(modeling, name, fn)


def _packed_or_plain(
    module: nn.Module,
    forward: Callable[..., torch.Tensor],
    choice: str,
    installed: KernelPackages,
    hidden_states: torch.Tensor,
    cache: Any = None,
    attention_mask: torch.Tensor | None = None,
    **kwargs: Any,
) -> torch.Tensor:
    """The wrapped forward: unpacked rows go to `forward` as they are; a packed row (cu_seq_lens_q) runs on
    fla's variable-length kernels where they serve (a CUDA row, fla installed), else as a right-padded batch of
    its samples. A row on the CPU runs transformers' PyTorch code where kernel packages are installed: some
    transformers releases (5.24) hand CPU tensors to fla's Triton kernels, which refuse them (a twin built on
    the CPU of a GPU machine)."""
    on_pytorch = choice == "torch" or (installed.any and not hidden_states.is_cuda)
    context = torch_only() if on_pytorch else contextlib.nullcontext()
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:
        with context:
            return forward(hidden_states, cache=cache, attention_mask=attention_mask, **kwargs)
    if cache is not None or attention_mask is not None or hidden_states.shape[0] != 1:
        raise ValueError("a packed row of a linear-attention layer is one row, without a cache or a mask")
    if choice != "torch" and installed.fla and hidden_states.is_cuda:
        return _fla_forward(module, hidden_states, cu)
    rest = {k: v for k, v in kwargs.items() if k not in SEGMENT_KEYS}
    with context:
        return _padded_forward(forward, hidden_states, cu, rest)


# The samples' bounds are read on the host: inside compiled decoder layers this runs as it is, one clean break
# around it rather than a trace that breaks at every data-dependent step.
@torch.compiler.disable
def _padded_forward(
    forward: Callable[..., torch.Tensor], hidden_states: torch.Tensor, cu: torch.Tensor, rest: dict[str, Any]
) -> torch.Tensor:
    """Returns the layer's output on a packed row [1, T, D], computed on its samples as one right-padded batch:
    the convolution and the recurrence are causal, so the padding after a sample never reaches its tokens (each
    sample's result alone, without a loop of forwards)."""
    bounds = [int(b) for b in cu.tolist()]
    spans = [(start, end) for start, end in zip(bounds, bounds[1:], strict=False) if end > start]
    batch = nn.utils.rnn.pad_sequence([hidden_states[0, start:end] for start, end in spans], batch_first=True)
    out = forward(batch, cache=None, attention_mask=None, **rest)
    return torch.cat([out[i, : end - start] for i, (start, end) in enumerate(spans)], dim=0).unsqueeze(0)


FLA_CHUNK = 64  # the chunk length of fla's convolution and gated delta rule kernels (their default)


def chunk_indices(bounds: torch.Tensor, chunk: int = FLA_CHUNK) -> torch.Tensor:
    """Returns [chunks, 2] int64: (segment, chunk within that segment) for every `chunk`-token chunk of every
    segment of `bounds` (cu_seqlens; an empty segment has none), in order: the chunk table fla's
    variable-length kernels are launched over, computed on the host from host bounds."""
    bounds = bounds.to(device="cpu", dtype=torch.long)
    counts = (bounds[1:] - bounds[:-1] + chunk - 1).div(chunk, rounding_mode="floor")
    segment = torch.repeat_interleave(torch.arange(len(counts)), counts)
    firsts = torch.repeat_interleave(counts.cumsum(0) - counts, counts)  # each chunk's segment's first chunk
    return torch.stack([segment, torch.arange(len(segment)) - firsts], 1)


class RowSegments:
    """A packed row's bounds in the forms fla's kernels take (`fla_kwargs`): int64 on the row's device,
    int64 on the host, and the chunk table. Built once per row (`of`), from one read of the bounds to the
    host, and shared by every linear-attention layer of that row, forward and backward: given none of them,
    fla derives the chunk table in every call from the device bounds, which reads them back to the host
    (a stream sync each time: 18 layers x forward and backward per micro-batch for MiniCPM-V 4.6), and its
    per-tensor caches miss whenever the bounds arrive as a new tensor."""

    _last: ClassVar[tuple[Any, RowSegments] | None] = None  # (weak reference to the source bounds, segments)

    def __init__(self, cu_seqlens: torch.Tensor, device: torch.device) -> None:
        self.on_host = cu_seqlens.detach().to(device="cpu", dtype=torch.long)
        self.on_device = self.on_host.to(device, non_blocking=True)
        self.chunks = chunk_indices(self.on_host).to(device, non_blocking=True)

    @classmethod
    def of(cls, cu_seqlens: torch.Tensor, device: torch.device) -> RowSegments:
        """The segments of the row whose bounds are `cu_seqlens` (the same tensor object for every layer of a
        forward): the last row's again where it is the same tensor, else built anew."""
        last = cls._last
        if last is not None and last[0]() is cu_seqlens and last[1].on_device.device == device:
            return last[1]
        segments = cls(cu_seqlens, device)
        cls._last = (weakref.ref(cu_seqlens), segments)
        return segments

    def fla_kwargs(self) -> dict[str, torch.Tensor]:
        return {"cu_seqlens": self.on_device, "cu_seqlens_cpu": self.on_host, "chunk_indices": self.chunks}


# Inside compiled decoder layers fla runs as it is (its own Triton kernels; its launchers read the segment
# bounds on the host): one clean break around it rather than a trace into its Python.
@torch.compiler.disable
def _fla_forward(module: nn.Module, hidden_states: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """The GatedDeltaNet layer's computation (as transformers' Qwen3.5 forward, without a cache) with the
    convolution and the gated delta rule on fla's kernels, restarted at every boundary in `cu_seqlens`
    (their `RowSegments`). Runs on CUDA (a GPU test compares it with the per-sample path; the CPU tests
    check what it hands fla)."""
    from fla.modules.convolution import causal_conv1d
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule

    segments = RowSegments.of(cu_seqlens, hidden_states.device).fla_kwargs()
    batch, length, _ = hidden_states.shape
    mixed_qkv = module.in_proj_qkv(hidden_states)  # (1, T, conv_dim)
    z = module.in_proj_z(hidden_states).reshape(batch, length, -1, module.head_v_dim)
    b = module.in_proj_b(hidden_states)
    a = module.in_proj_a(hidden_states)
    mixed_qkv, _ = causal_conv1d(
        x=mixed_qkv,
        weight=module.conv1d.weight.squeeze(1),
        bias=module.conv1d.bias,
        activation=module.activation,
        **segments,
    )
    query, key, value = torch.split(mixed_qkv, [module.key_dim, module.key_dim, module.value_dim], dim=-1)
    query = query.reshape(batch, length, -1, module.head_k_dim)
    key = key.reshape(batch, length, -1, module.head_k_dim)
    value = value.reshape(batch, length, -1, module.head_v_dim)
    groups = module.num_v_heads // module.num_k_heads
    if groups > 1:  # each query/key head serves `groups` consecutive value heads
        query, key = query.repeat_interleave(groups, dim=2), key.repeat_interleave(groups, dim=2)
    beta = b.sigmoid()
    g = -module.A_log.float().exp() * F.softplus(a.float() + module.dt_bias)
    out, _ = chunk_gated_delta_rule(
        query,
        key,
        value,
        g=g,
        beta=beta,
        initial_state=None,
        output_final_state=False,
        use_qk_l2norm_in_kernel=True,
        **segments,
    )
    out = module.norm(out.reshape(-1, module.head_v_dim), z.reshape(-1, module.head_v_dim))
    return module.out_proj(out.reshape(batch, length, -1))
