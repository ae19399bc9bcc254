"""From the dataset config to validated train and validation rows (the same split on every run)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from pipeline.data.rows import Problem, Row
from pipeline.data.sources import (
    COMMON_KEYS,
    check_source,
    get_source,
    load_mixture,
    with_defaults,
)
from pipeline.data.split import split_rows
from pipeline.data.validate import apply_on_error, validate_rows, write_problems
from pipeline.families.base import VideoLimits

log = logging.getLogger(__name__)
# Keys of the dataset config that describe how rows are used rather than where a source is.
USAGE_KEYS = {
    "sources",
    "val_path",
    "test_ratio",
    "max_length",
    "truncation",
    "on_error",
    "max_rows",
    "system",
    "max_video_seconds",
}


@dataclass
class Splits:
    train: list[Row]
    val: list[Row]
    problems: list[Problem] = field(default_factory=list)


def source_entries(dataset_cfg: Mapping[str, Any]) -> list[dict]:
    """Returns the source list: `sources` when given, else the dataset itself as one source."""
    cfg = dict(dataset_cfg)
    if cfg.get("sources"):
        return [dict(s) for s in cfg["sources"]]
    # The dataset group holds the keys of every source kind; hand each source only those it reads.
    accepted = set(COMMON_KEYS) | set(get_source(cfg["name"]).keys)
    return [{k: v for k, v in cfg.items() if k in accepted and k not in USAGE_KEYS and v is not None}]


def _with_system(rows: list[Row], system: str | None) -> list[Row]:
    if not system:
        return rows
    for row in rows:
        if row.system is None:
            row.system = system
    return rows


@dataclass
class RawRows:
    """Rows read and checked for structure and images, before the tokenizer has counted their tokens."""

    rows: list[Row]
    val_rows: list[Row] | None
    problems: list[Problem] = field(default_factory=list)


def _plain(dataset_cfg: DictConfig | Mapping[str, Any]) -> dict:
    if isinstance(dataset_cfg, DictConfig):
        return OmegaConf.to_container(dataset_cfg, resolve=True)
    return dict(dataset_cfg)


def _val_source(cfg: Mapping[str, Any]) -> dict:
    return {
        "name": "custom",
        "path": cfg["val_path"],
        "columns": cfg.get("columns") or None,
        "cache_dir": cfg.get("cache_dir"),
    }


def check_dataset(dataset_cfg: DictConfig | Mapping[str, Any]) -> None:
    """Returns None when every source can be read as configured; raises DatasetError naming the key or path.

    Reads no row: the names and keys of the sources, their column mappings and that their files exist.
    """
    cfg = _plain(dataset_cfg)
    entries = source_entries(cfg) + ([_val_source(cfg)] if cfg.get("val_path") else [])
    for index, entry in enumerate(entries):
        check_source(with_defaults(entry, None, index))


def read_dataset(
    dataset_cfg: DictConfig | Mapping[str, Any],
    seed: int,
    image_limit: tuple[int, str] | None = None,
    video_limit: VideoLimits | None = None,
) -> RawRows:
    """Returns the rows of the dataset (and of val_path), checked for structure, images and videos; needs no
    model.

    `image_limit` is (images per conversation, model name) of the family that reads them, `video_limit` what
    it takes of videos (None: unchecked)."""
    cfg = _plain(dataset_cfg)
    on_error = cfg.get("on_error", "raise")
    media = dict(
        image_limit=image_limit, video_limit=video_limit, max_video_seconds=cfg.get("max_video_seconds")
    )
    rows, problems = load_mixture(
        source_entries(cfg), seed, on_error=on_error, max_rows=cfg.get("max_rows"), **media
    )
    val_rows = None
    if cfg.get("val_path"):
        val_rows, val_problems = load_mixture([_val_source(cfg)], seed, on_error=on_error, **media)
        problems += val_problems
    return RawRows(rows, val_rows, problems)


def keep_rows(raw: RawRows, problem_of: Callable[[Row], str | None], on_error: str) -> RawRows:
    """Returns `raw` without the rows (training and validation) that `problem_of` finds a problem with, each
    a problem naming the row's origin (dropped under on_error=skip, raised under raise)."""
    kept: list[list[Row] | None] = []
    problems = list(raw.problems)
    for rows in (raw.rows, raw.val_rows):
        if rows is None:
            kept.append(None)
            continue
        found = [
            (i, Problem(row.origin, reason)) for i, row in enumerate(rows) if (reason := problem_of(row))
        ]
        good, more = apply_on_error(rows, found, on_error)
        problems += more
        kept.append(good)
    return RawRows(kept[0] or [], kept[1], problems)


def split_dataset(
    raw: RawRows,
    dataset_cfg: DictConfig | Mapping[str, Any],
    seed: int,
    counter: Callable[[Row], int | None],
    problems_path: Path | None = None,
) -> Splits:
    """Returns train/val rows of `raw` that fit max_length; problems go to `problems_path` under on_error=skip.

    Tokens are counted by `counter`, the model family's (Family.token_counter)."""
    cfg = _plain(dataset_cfg)
    on_error = cfg.get("on_error", "raise")
    problems = list(raw.problems)
    check = partial(
        validate_rows,
        check_image_files=False,
        count_tokens=counter,
        max_length=cfg.get("max_length"),
        on_error=on_error,
    )
    rows, more = check(raw.rows)
    problems += more
    val_rows = None
    if raw.val_rows is not None:
        val_rows, more = check(raw.val_rows)
        problems += more
    train, val = split_rows(rows, test_ratio=cfg.get("test_ratio", 0.01), seed=seed, val_rows=val_rows)
    if problems and problems_path is not None:
        write_problems(problems, problems_path)
        log.warning("%d dataset problem(s) skipped; listed in %s", len(problems), problems_path)
    log.info("dataset: %d train rows, %d validation rows", len(train), len(val))
    return Splits(_with_system(train, cfg.get("system")), _with_system(val, cfg.get("system")), problems)


def prepare_splits(
    dataset_cfg: DictConfig | Mapping[str, Any],
    seed: int,
    counter: Callable[[Row], int | None],
    image_limit: tuple[int, str] | None = None,
    problems_path: Path | None = None,
    video_limit: VideoLimits | None = None,
) -> Splits:
    """Returns validated train/val rows (read_dataset, then split_dataset); problems go to `problems_path`."""
    raw = read_dataset(dataset_cfg, seed, image_limit, video_limit)
    return split_dataset(raw, dataset_cfg, seed, counter, problems_path)
