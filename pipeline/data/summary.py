"""The dataset summary shown and saved before training: rows, token lengths, images and their tokens.

Everything in it is already known once the rows are validated (token counts from text and image headers);
only the image tokens per row are counted again, from the same headers, by the family's counter.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pipeline.data.rows import Row
from pipeline.utils.io import atomic_write_json

log = logging.getLogger(__name__)


def percentiles(values: Sequence[int]) -> dict[str, int] | None:
    """Returns {p50, p95, max} of values (nearest rank), None when there are none."""
    if not values:
        return None
    ordered = sorted(values)

    def rank(p: float) -> int:
        return ordered[max(0, math.ceil(p * len(ordered)) - 1)]

    return {"p50": rank(0.50), "p95": rank(0.95), "max": ordered[-1]}


def summarize_dataset(
    rows: Sequence[Row],
    train: Sequence[Row],
    val: Sequence[Row],
    *,
    max_length: int,
    skipped: int,
    image_tokens: Callable[[Row], int] | None,
    resolution_setting: str,
) -> dict[str, Any]:
    """Returns the summary of a validated dataset: `rows` every row read (their num_tokens counted), `train`
    and `val` the rows kept, `skipped` the rows dropped under on_error=skip, `image_tokens` the family's image
    token counter (None: not countable from headers) and `resolution_setting` the key that bounds them."""
    counted = [row.num_tokens for row in rows if row.num_tokens is not None]
    kept = [*train, *val]
    images = [len(row.images) for row in kept]
    image_counts = [image_tokens(row) for row in kept] if image_tokens is not None else None
    tokens = percentiles([row.num_tokens for row in kept if row.num_tokens is not None])
    return {
        "rows": {"train": len(train), "validation": len(val), "skipped": skipped},
        "tokens_per_row": tokens,
        "max_length": max_length,
        "rows_over_max_length": sum(count > max_length for count in counted),
        "images_per_row": {
            "mean": round(sum(images) / len(images), 3) if images else 0.0,
            "max": max(images, default=0),
            "rows_with_images": sum(n > 0 for n in images),
        },
        "videos_per_row": {
            "max": max((len(row.videos) for row in kept), default=0),
            "rows_with_videos": sum(bool(row.videos) for row in kept),
        },
        "image_tokens_per_row": percentiles(image_counts) if image_counts is not None else None,
        "image_token_share": (
            round(sum(image_counts) / max(1, sum(row.num_tokens or 0 for row in kept)), 3)
            if image_counts is not None
            else None
        ),
        "resolution_setting": resolution_setting or None,
    }


def describe_summary(summary: dict[str, Any]) -> str:
    """Returns the summary as the few lines the log shows, ending with what to lower when memory is tight."""
    rows, tokens, images = summary["rows"], summary["tokens_per_row"], summary["images_per_row"]
    lines = [
        f"dataset summary: {rows['train']} train rows, {rows['validation']} validation rows"
        + (f", {rows['skipped']} skipped" if rows["skipped"] else ""),
    ]
    if tokens:
        lines.append(
            f"  tokens per row: p50 {tokens['p50']}, p95 {tokens['p95']}, max {tokens['max']} "
            f"(dataset.max_length={summary['max_length']}; {summary['rows_over_max_length']} row(s) over it)"
        )
    lines.append(
        f"  images per row: mean {images['mean']:g}, max {images['max']} "
        f"({images['rows_with_images']} row(s) with images)"
    )
    videos = summary.get("videos_per_row") or {}
    if videos.get("rows_with_videos"):
        lines.append(
            f"  videos per row: max {videos['max']} ({videos['rows_with_videos']} row(s) with videos; their "
            "tokens are counted with the text, by encoding the sampled frames)"
        )
    image_tokens = summary["image_tokens_per_row"]
    if image_tokens:
        share = summary["image_token_share"]
        lines.append(
            f"  image tokens per row: p50 {image_tokens['p50']}, p95 {image_tokens['p95']}, "
            f"max {image_tokens['max']} ({share:.0%} of all tokens)"
        )
    elif images["max"]:
        lines.append("  image tokens per row: counted with the text (this family encodes rows to count them)")
    if images["max"] and summary["resolution_setting"]:
        lines.append(
            f"  memory tight? lower {summary['resolution_setting']}, then trainer.batch_size or "
            "dataset.max_length"
        )
    return "\n".join(lines)


def report_summary(summary: dict[str, Any], path: Path | None) -> None:
    """Logs the summary and writes it as JSON at `path` (when given), atomically."""
    log.info("%s", describe_summary(summary))
    if path is not None:
        atomic_write_json(path, summary)
