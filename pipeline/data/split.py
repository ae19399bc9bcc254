"""Holding out a validation split, the same one on every run, machine and library version."""

from __future__ import annotations

import hashlib
from typing import TypeVar

from pipeline.data.rows import DatasetError

T = TypeVar("T")


def stable_order(count: int, *salt: object) -> list[int]:
    """Return range(count) ordered by sha256(salt, index): a shuffle that never changes across versions.

    Unlike Python's hash() (salted per process) or numpy's Generator streams (not promised stable across
    numpy releases), a digest gives the same order everywhere.
    """
    prefix = ":".join(map(str, salt)).encode()
    return sorted(range(count), key=lambda index: hashlib.sha256(prefix + b":%d" % index).digest())


def split_rows(
    rows: list[T],
    test_ratio: float = 0.01,
    seed: int = 42,
    val_rows: list[T] | None = None,
) -> tuple[list[T], list[T]]:
    """Return (train, val): max(int(test_ratio * len), 1) rows held out, both in original order.

    The count is ms-swift's for dataset_test_ratio (rounded down, at least one; none when the ratio is 0), so
    the same rows go to training as there. At least one row always stays in train, and a single row is never
    split. With ``val_rows`` (an explicit validation set) nothing is held out of ``rows``.
    """
    if val_rows is not None:
        return list(rows), list(val_rows)
    if not 0 <= test_ratio < 1:
        raise DatasetError(f"test_ratio={test_ratio} must be in [0, 1)")
    if len(rows) <= 1 or test_ratio == 0:
        return list(rows), []
    n_val = min(max(int(test_ratio * len(rows)), 1), len(rows) - 1)
    held = set(stable_order(len(rows), "split", seed)[:n_val])
    train = [row for index, row in enumerate(rows) if index not in held]
    val = [row for index, row in enumerate(rows) if index in held]
    return train, val
