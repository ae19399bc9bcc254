"""Batches prepared ahead on CPU threads while the current one runs on the GPU (eval and infer stages)."""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")

# batches prepared ahead of the one generating, and the CPU threads preparing them (on a GPU only)
PREFETCH_BATCHES = 2
PREPARE_THREADS = 4


def prepared_batches(
    batches: Sequence[Sequence[int]], prepare: Callable[[int], T], prefetch: bool
) -> Iterator[tuple[Sequence[int], list[T]]]:
    """Yields (indices, [prepare(i) for i in indices]) for each batch in order. With `prefetch`, the next
    PREFETCH_BATCHES batches are prepared on up to PREPARE_THREADS threads meanwhile; a failing item raises
    when its batch comes, in order, as it would without prefetch."""
    threads = min(PREPARE_THREADS, os.cpu_count() or 1) if prefetch else 0
    if not threads:
        for indices in batches:
            yield indices, [prepare(i) for i in indices]
        return
    with ThreadPoolExecutor(max_workers=threads) as pool:
        pending: deque[list[Future]] = deque(
            [pool.submit(prepare, i) for i in indices] for indices in batches[:PREFETCH_BATCHES]
        )
        for b, indices in enumerate(batches):
            futures = pending.popleft()
            if b + PREFETCH_BATCHES < len(batches):
                pending.append([pool.submit(prepare, i) for i in batches[b + PREFETCH_BATCHES]])
            yield indices, [future.result() for future in futures]
