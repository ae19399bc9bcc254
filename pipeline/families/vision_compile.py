"""The Qwen VLs' vision blocks compiled for training steps, on patch sequences of a few static shapes.

The vision tower (transformers' Qwen2.5-VL / Qwen3-VL tower) embeds every image's patches, lays them end to
end in one sequence and runs its blocks over it, each attending within the pieces that `cu_seqlens` bounds
(one per image frame; Qwen2.5-VL's windowed blocks: one per 112-pixel window, the patches reordered window
by window). The sequence's length and its number of pieces follow the images of each micro-batch, so a
compiled block would trace a graph for nearly every micro-batch. `pad_tower(tower)` gives the tower a
forward that, in a training step (training mode, gradients on), makes them static:

- the patch sequence is padded up to `bucket_length` (its octave in quarters: 1024, 1280, 1536, 1792, 2048,
  2560, ...: four lengths per doubling, at most a quarter padding): the padding patches enter as one more
  image of zero pixels, so transformers' own position, window and interpolation tables cover them;
- every `cu_seqlens` (full attention and windows alike) gets the padding as pieces of its own (no real
  patch attends to it, nor it to them), then empty pieces up to a power-of-two count (at least 8);
- the longest piece each attention is told of (`max_seqlen`) comes from a few values too: the window's
  size for windowed blocks, else the largest image's `bucket_length` (the padding is cut to pieces no
  longer);
- the outputs of the padding (its rows of the last hidden state, of the merger's and of the deepstack
  mergers' features) are dropped before they leave the tower.

The tower takes these tables through the keyword arguments transformers' vision helpers read precomputed
(`cu_seqlens`, `max_seqlen`, `window_index`, `cu_window_seqlens`, `max_window_seqlen`:
transformers.vision_utils). Real patches see exactly what they see without padding, so the image features
and every gradient are those of the unpadded tower; padding rows are finite (zero pixels) and carry no
gradient. Evaluation, generation and a tower given tables of its own run the tower as it is.

`compile_for_training(tower.blocks)` (layer_compile) then compiles the blocks: one graph per (length,
pieces) pair and kind of block, shared by every block of the kind.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch
from torch import nn

MIN_PATCHES = 256  # the shortest padded patch sequence
MIN_SEGMENTS = 8  # the fewest pieces a padded cu_seqlens holds
PADDED_FOR_TRAINING = "padded_for_training"


def available() -> bool:
    """Returns whether the installed transformers' vision towers read precomputed tables from their keyword
    arguments (transformers.vision_utils), which the padding needs."""
    return importlib.util.find_spec("transformers.vision_utils") is not None


def bucket_length(patches: int) -> int:
    """Returns the static length `patches` is padded to: at least MIN_PATCHES, else rounded up to a quarter
    of its octave (1025..1280 -> 1280, 1281..1536 -> 1536, ...; multiples of 64)."""
    if patches <= MIN_PATCHES:
        return MIN_PATCHES
    step = 1 << ((patches - 1).bit_length() - 3)
    return -(-patches // step) * step


def padded_bounds(bounds: torch.Tensor, real: int, total: int, longest: int) -> torch.Tensor:
    """Returns cu_seqlens `bounds` (int32 [pieces + 1], ending at `real`) with the padding real..total as
    pieces of at most `longest` patches, then empty pieces up to a power-of-two count (at least
    MIN_SEGMENTS)."""
    if int(bounds[-1]) != real:
        raise ValueError(f"cu_seqlens end at {int(bounds[-1])}, not at the {real} patches given")
    tail = [*range(real + longest, total, longest), total] if total > real else []
    pieces = bounds.numel() - 1 + len(tail)
    count = max(MIN_SEGMENTS, 1 << (pieces - 1).bit_length())
    tail += [total] * (count - pieces)
    return torch.cat([bounds.to(torch.int32), torch.tensor(tail, dtype=torch.int32)])


def _padding_grid(grid: torch.Tensor, pad: int) -> torch.Tensor:
    """Returns `grid` (images x (t, h, w)) with the padding as one more image of one frame, 2 rows high:
    h and w stay multiples of the 2 x 2 merge (`pad` is a multiple of 4)."""
    return torch.cat([grid, grid.new_tensor([[1, 2, pad // 2]])]) if pad else grid


def static_tables(tower: nn.Module, grid: torch.Tensor, real: int, windows: bool) -> dict[str, Any]:
    """Returns the keyword arguments that make the tower's blocks see static shapes for `real` patches of
    the images `grid` (on the CPU): the padded length (`total`), the grid with the padding image, and the
    tables transformers' vision helpers take precomputed."""
    from transformers.vision_utils import get_vision_cu_seqlens, get_vision_window_index

    total = bucket_length(real)
    merge = int(tower.spatial_merge_size)
    if (total - real) % (2 * merge):
        raise ValueError(f"the vision tower's {real} patches are not whole {merge} x {merge} merge units")
    padded_grid = _padding_grid(grid, total - real)
    frames = (grid[:, 1] * grid[:, 2]).tolist()
    longest = min(bucket_length(max(frames)), total)
    tables: dict[str, Any] = {
        "cu_seqlens": padded_bounds(get_vision_cu_seqlens(grid), real, total, longest),
        "max_seqlen": longest,
    }
    if windows:
        window_index, cu_window = get_vision_window_index(
            padded_grid, merge, int(tower.window_size), int(tower.patch_size)
        )
        side = int(tower.window_size) // merge // int(tower.patch_size)
        window = side * side * merge * merge  # the patches of a full window
        real_windows = cu_window[cu_window <= real]
        tables.update(
            window_index=window_index,
            cu_window_seqlens=padded_bounds(real_windows, real, total, window),
            max_window_seqlen=window,
        )
    return {"total": total, "grid": padded_grid, "tables": tables}


def pad_tower(tower: nn.Module, windows: bool = False) -> None:
    """Gives the vision tower a forward that pads its patch sequence to static shapes in training steps (see
    the module's docstring); `windows`: its blocks also attend by windows (Qwen2.5-VL)."""
    if not available():
        raise RuntimeError(
            "the vision blocks' static shapes need transformers.vision_utils (precomputed vision tables); "
            "upgrade transformers or set trainer.compile_vision=false"
        )
    original = tower.forward

    def forward(hidden_states: torch.Tensor, grid_thw: torch.Tensor, **kwargs: Any) -> Any:
        if not (tower.training and torch.is_grad_enabled()) or "cu_seqlens" in kwargs:
            return original(hidden_states, grid_thw, **kwargs)
        real = int(hidden_states.shape[0])
        plan = static_tables(tower, grid_thw.cpu(), real, windows)
        device = hidden_states.device
        pixels = torch.cat(
            [hidden_states, hidden_states.new_zeros(plan["total"] - real, hidden_states.shape[1])]
        )
        tables = {k: v.to(device) if torch.is_tensor(v) else v for k, v in plan["tables"].items()}
        out = original(pixels, plan["grid"].to(grid_thw.device), **kwargs, **tables)
        return _unpadded(out, real, real // int(tower.spatial_merge_size) ** 2)

    forward.padded_for_training = True  # type: ignore[attr-defined]
    tower.forward = forward


def _unpadded(out: Any, patches: int, merged: int) -> Any:
    """Returns the tower's output with the padding's rows dropped: the last hidden state's (patches), the
    merger's and the deepstack mergers' (merged patches)."""
    out.last_hidden_state = out.last_hidden_state[:patches]
    out.pooler_output = out.pooler_output[:merged]
    deepstack = getattr(out, "deepstack_features", None)
    if deepstack is not None:
        out.deepstack_features = [features[:merged] for features in deepstack]
    return out


def is_padded_for_training(tower: nn.Module) -> bool:
    """Returns whether `pad_tower` set the tower's forward."""
    return bool(getattr(tower.__dict__.get("forward"), PADDED_FOR_TRAINING, False))
