"""How the samples of one optimizer step are grouped into micro-batches.

The optimizer step always sees the same samples (the window: batch_size x grad_accum per process) and the
same token-weighted loss; only how they are cut into forward passes changes. Two regimes:

- fixed (`trainer.micro_batch_tokens=0`): micro-batches of `batch_size` samples in window order, the plain
  regime (ms-swift runs batch 1 x grad-accum 16 this way);
- token budget (`trainer.micro_batch_tokens=N`, the default): the window's samples sorted by length and cut
  greedily into micro-batches whose padded size (rows x longest row, rounded up to the padding multiple)
  stays within N tokens. Similar lengths share a micro-batch, so padding stays low, and 16 short samples
  run as one forward instead of sixteen. A sample longer than N runs alone. With packing (`trainer.packing`) the
  micro-batch is one packed row, so its size is the sum of the lengths (no padding but the tail).

A row's size in the budget is its language-model tokens plus, where the family counts them, its vision-tower
patches at `trainer.patch_weight` each (`budget_sizes`): a micro-batch of many large images then holds fewer
rows, so the budget bounds the vision tower's work as well as the language model's.

Plans depend only on the window's indices and the rows' token counts, so every process computes every
process's plan, and a resumed run makes the same plan as an uninterrupted one. Under engines that gather
weights in each forward (FSDP, ZeRO-3) every process must run as many micro-batches as the others: the
plans are evened out by splitting the largest micro-batches of the processes with fewer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def budget_sizes(tokens: Sequence[int], patches: Sequence[int] | None, weight: float) -> list[int]:
    """Returns every row's size in the token budget: its tokens plus `weight` x its vision patches (rounded
    up); the tokens alone when `patches` is None or the weight 0."""
    if patches is None or weight <= 0:
        return list(tokens)
    if len(patches) != len(tokens):
        raise ValueError(f"{len(tokens)} token counts but {len(patches)} patch counts")
    return [t + math.ceil(weight * p) for t, p in zip(tokens, patches, strict=True)]


def padded_size(lengths: Sequence[int], multiple: int = 1) -> int:
    """Returns rows x the longest length rounded up to `multiple`: the tokens a right-padded batch holds."""
    if not lengths:
        return 0
    longest = -(-max(lengths) // multiple) * multiple
    return len(lengths) * longest


def fixed_micro_batches(indices: Sequence[int], batch_size: int) -> list[list[int]]:
    """Returns consecutive groups of `batch_size` indices (the last may be shorter)."""
    return [list(indices[i : i + batch_size]) for i in range(0, len(indices), batch_size)]


def packed_size(lengths: Sequence[int], multiple: int = 1) -> int:
    """Returns the tokens of one packed row holding every length, rounded up to `multiple`."""
    return -(-sum(lengths) // multiple) * multiple


def budget_micro_batches(
    indices: Sequence[int], lengths: Sequence[int], budget: int, multiple: int = 1, packed: bool = False
) -> list[list[int]]:
    """Returns the indices cut into micro-batches of at most `budget` padded (or packed) tokens, longest
    first.

    `lengths[i]` is the token count of row `indices[i]`. Sorting is stable (ties keep window order), so the
    plan is deterministic.
    """
    if len(indices) != len(lengths):
        raise ValueError(f"{len(indices)} indices but {len(lengths)} lengths")
    order = sorted(range(len(indices)), key=lambda j: -lengths[j])
    size = packed_size if packed else padded_size
    groups: list[list[int]] = []
    current: list[int] = []
    current_lengths: list[int] = []
    for j in order:
        if current and size([*current_lengths, lengths[j]], multiple) > budget:
            groups.append(current)
            current, current_lengths = [], []
        current.append(indices[j])
        current_lengths.append(lengths[j])
    if current:
        groups.append(current)
    return groups


def split_to_count(groups: list[list[int]], count: int, length_of) -> list[list[int]]:
    """Returns `groups` with its largest micro-batches halved until there are `count` of them.

    `length_of(index)` gives a row's token count; the largest is the one with the most padded tokens.
    """
    groups = [list(g) for g in groups]
    while len(groups) < count:
        splittable = [k for k, g in enumerate(groups) if len(g) > 1]
        if not splittable:
            raise ValueError(f"cannot split {len(groups)} micro-batches of one row each into {count}")
        k = max(splittable, key=lambda k: padded_size([length_of(i) for i in groups[k]]))
        g = groups.pop(k)
        half = len(g) // 2
        groups[k:k] = [g[:half], g[half:]]
    return groups


def plan_window(
    per_rank: Sequence[Sequence[int]],
    lengths: Sequence[int] | None,
    batch_size: int,
    budget: int,
    multiple: int = 1,
    equal_counts: bool = False,
    packed: bool = False,
) -> list[list[list[int]]]:
    """Returns, for every process, its micro-batches (lists of row indices) for one optimizer step.

    `per_rank[r]` holds process r's rows of the window; `lengths` every row's token count (by row index).
    `budget` 0 (or no lengths) gives fixed micro-batches of `batch_size`. `equal_counts` evens out the
    number of micro-batches across processes (needed where each forward is collective).
    """
    if budget <= 0 or lengths is None:
        plans = [fixed_micro_batches(rows, batch_size) for rows in per_rank]
    else:
        plans = [
            budget_micro_batches(rows, [lengths[i] for i in rows], budget, multiple, packed)
            for rows in per_rank
        ]
    if equal_counts and plans:
        most = max(len(p) for p in plans)
        length_of = (lambda i: lengths[i]) if lengths is not None else (lambda i: 1)
        plans = [split_to_count(p, most, length_of) for p in plans]
    return plans
