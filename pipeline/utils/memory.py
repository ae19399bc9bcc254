"""What a stage that runs out of GPU memory tells its user: where it ran out and the settings that bound it."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch


class OutOfGPUMemory(RuntimeError):
    """A stage ran out of GPU memory; the message names where and the settings to lower, cheapest first."""


@contextmanager
def advice_on_out_of_memory(where: str, knobs: Sequence[str]) -> Iterator[None]:
    """Turns torch's out-of-memory error inside the block into OutOfGPUMemory naming `where` ("in the infer
    stage, 200 rows") and `knobs` (the settings that bound the memory there, cheapest first); torch's error
    stays attached as the cause."""
    try:
        yield
    except torch.OutOfMemoryError as err:
        raise OutOfGPUMemory(out_of_memory_message(where, knobs)) from err


def out_of_memory_message(where: str, knobs: Sequence[str]) -> str:
    """Returns what a run that ran out of GPU memory `where` says: there, and the `knobs`, cheapest first."""
    return f"out of GPU memory {where}. Knobs, cheapest first: " + ", ".join(knobs)


def halved(key: str, value: int) -> str:
    """Returns the advice to halve the integer setting `key` (now `value`), e.g. `infer.batch_size=8 (now 16)`."""
    return f"{key}={max(value // 2, 1)} (now {value})"


def resolution_knob(setting: str) -> list[str]:
    """Returns the advice to lower a family's image resolution, from its `resolution_setting` ("model.
    max_slice_nums (slices per image; ...)": the key, then what it sets); none where it has no such setting."""
    return [f"{setting.split(' ')[0]} (fewer image tokens)"] if setting else []
