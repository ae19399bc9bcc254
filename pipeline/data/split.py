"""Holding out a validation split, the same one on every run, machine and library version."""

from __future__ import annotations

import hashlib
import math
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
    min_test: int = 1,
    val_rows: list[T] | None = None,
) -> tuple[list[T], list[T]]:
    """Return (train, val): ceil(test_ratio * len) rows held out (at least min_test), both in original order.

    Like ms-swift's dataset_test_ratio (which rounds the test size up). At least one row always stays in
    train, and a single row is never split. With ``val_rows`` (an explicit validation set) nothing is held
    out of ``rows``.
    """
    if val_rows is not None:
        return list(rows), list(val_rows)
    if not 0 <= test_ratio < 1:
        raise DatasetError(f"test_ratio={test_ratio} must be in [0, 1)")
    if min_test < 0:
        raise DatasetError(f"min_test={min_test} must be >= 0")
    if len(rows) <= 1:
        return list(rows), []
    # round() first so that float noise (0.07 * 100 = 7.000000000000001) does not add a row
    n_val = min(max(math.ceil(round(test_ratio * len(rows), 9)), min_test), len(rows) - 1)
    held = set(stable_order(len(rows), "split", seed)[:n_val])
    train = [row for index, row in enumerate(rows) if index not in held]
    val = [row for index, row in enumerate(rows) if index in held]
    return train, val
