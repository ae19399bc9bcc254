"""Checking dataset rows before training: record structure, images, token lengths, and the error policy."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from tqdm import tqdm

from pipeline.config import ON_ERROR_CHOICES
from pipeline.data.arrow_images import is_embedded
from pipeline.data.formats import FORMAT_KEYS, to_query_response, unknown_format_keys
from pipeline.data.image_check import check_image_refs
from pipeline.data.pairs import (
    feedback_to_query_response,
    feedback_unknown_keys,
    is_feedback_record,
    is_pair_record,
    pair_to_query_response,
    pair_unknown_keys,
)
from pipeline.data.rows import DatasetError, Problem, Row, is_url
from pipeline.data.video_check import video_headers
from pipeline.families.base import IMAGE_TAG, VIDEO_TAG, VideoInfo, VideoLimits
from pipeline.utils.io import atomic_write_text

__all__ = [
    "KNOWN_KEYS",
    "ON_ERROR_CHOICES",
    "DatasetError",
    "Problem",
    "apply_on_error",
    "check_images",
    "check_lengths",
    "check_on_error",
    "check_videos",
    "format_problems",
    "image_count_problems",
    "record_to_row",
    "unknown_keys",
    "validate_rows",
    "video_count_problems",
    "write_problems",
]

log = logging.getLogger(__name__)

KNOWN_KEYS = FORMAT_KEYS["query/response"]
MAX_LISTED = 20
# Keys people write by mistake for a known one; the warning names the intended key.
_KEY_HINTS = {
    "image": "images",
    "img": "images",
    "video": "videos",
    "answer": "response",
    "question": "query",
    "prompt": "query",
}


def check_on_error(on_error: str) -> str:
    """Return on_error unchanged when it is a valid policy, else raise naming the accepted values."""
    if on_error not in ON_ERROR_CHOICES:
        raise ValueError(f"on_error={on_error!r} is not valid; use one of {', '.join(ON_ERROR_CHOICES)}")
    return on_error


def unknown_keys(record: object) -> set[str]:
    """Return the keys of a record that its format (see pipeline.data.formats and pipeline.data.pairs) does
    not define (ignored)."""
    if is_pair_record(record):
        return pair_unknown_keys(record)
    if is_feedback_record(record):
        return feedback_unknown_keys(record)
    return unknown_format_keys(record)


def describe_unknown_keys(counts: Mapping[str, int]) -> str:
    """Return a one-line summary of ignored keys with their row counts and likely intended names."""
    parts = []
    for key in sorted(counts):
        hint = f", did you mean '{_KEY_HINTS[key]}'?" if key in _KEY_HINTS else ""
        parts.append(f"'{key}' ({counts[key]} rows{hint})")
    return ", ".join(parts)


def record_to_row(record: object, origin: str, base_dir: Path, need_response: bool = True) -> Row | list[str]:
    """Return the Row a record (in any format of pipeline.data.formats) describes, or why it cannot be used.

    Relative image paths resolve against ``base_dir`` (the data file's folder); URLs are kept as they are.
    With ``need_response=False`` (prompts to answer) the response may be left out; the Row's is then "".
    A preference pair (pipeline.data.pairs) becomes a Row with its chosen answer as the response and its
    rejected one as `rejected`; a labelled row (binary feedback), a Row with its `label`.
    """
    if not isinstance(record, Mapping):
        return [f"row is a JSON {_json_type(record)}, expected an object with 'query' and 'response'"]
    pair = is_pair_record(record)
    if pair:
        record = pair_to_query_response(record)
    elif is_feedback_record(record):
        record = feedback_to_query_response(record)
    else:
        record = to_query_response(record, need_response)
    if isinstance(record, list):
        return record
    keys = ("query", "response") if need_response or record.get("response") is not None else ("query",)
    reasons = [reason for key in keys if (reason := _text_reason(record, key))]
    history, history_reasons = _parse_history(record.get("history"))
    images, image_reasons = _parse_images(record.get("images"), base_dir)
    videos, video_reasons = _parse_images(record.get("videos"), base_dir, key="videos", what="video")
    system = record.get("system")
    reasons += history_reasons + image_reasons + video_reasons
    if system is not None and not isinstance(system, str):
        reasons.append(f"'system' must be a string or null, got {_json_type(system)}")
    if not reasons:
        reasons += _tag_reasons(record["query"], record.get("response"), history, images)
        reasons += _tag_reasons(record["query"], record.get("response"), history, videos, VIDEO_TAG, "video")
    if pair and not reasons:
        reasons += _pair_reasons(record["response"], record["rejected"])
    if reasons:
        return reasons
    return Row(
        query=record["query"],
        response=record.get("response") or "",
        history=history,
        images=images,
        system=system or None,
        origin=origin,
        rejected=record.get("rejected") if pair else None,
        videos=videos,
        label=record.get("label"),
    )


def _pair_reasons(chosen: str, rejected: str) -> list[str]:
    if IMAGE_TAG in rejected:
        return [f"{IMAGE_TAG} in the rejected answer; the tag places the image in a query"]
    if chosen.strip() == rejected.strip():
        return ["the chosen and the rejected answer are the same text; a pair needs two different answers"]
    return []


def _tag_reasons(
    query: str,
    response: str | None,
    history: list[tuple[str, str]],
    images: list[str],
    tag: str = IMAGE_TAG,
    what: str = "image",
) -> list[str]:
    reasons = []
    if tag in (response or "") or any(tag in r for _, r in history):
        reasons.append(f"{tag} in a response; the tag places the {what} in a query (or a history query)")
    tags = query.count(tag) + sum(q.count(tag) for q, _ in history)
    if tags > len(images):
        reasons.append(
            f"{tags} {tag} tag(s) but {len(images)} {what}(s) in '{what}s'; each tag marks where one {what} "
            "goes"
        )
    return reasons


def _text_reason(record: Mapping, key: str) -> str | None:
    if key not in record:
        return f"missing key '{key}' (a non-empty string)"
    value = record[key]
    if not isinstance(value, str):
        return f"'{key}' must be a non-empty string, got {_json_type(value)}"
    if not value.strip():
        return f"'{key}' is empty; it must be a non-empty string"
    return None


def _parse_history(value: object) -> tuple[list[tuple[str, str]], list[str]]:
    if value is None:
        return [], []
    expected = "a list of [query, response] pairs of non-empty strings"
    if not isinstance(value, list):
        return [], [f"'history' must be {expected}, got {_json_type(value)}"]
    pairs, reasons = [], []
    for index, pair in enumerate(value):
        ok = (
            isinstance(pair, list | tuple)
            and len(pair) == 2
            and all(isinstance(text, str) and text.strip() for text in pair)
        )
        if not ok:
            reasons.append(
                f"history[{index}] must be a [query, response] pair of non-empty strings, got "
                f"{json.dumps(pair, ensure_ascii=False)[:80]}"
            )
        else:
            pairs.append((pair[0], pair[1]))
    return pairs, reasons


def _parse_images(
    value: object, base_dir: Path, key: str = "images", what: str = "image"
) -> tuple[list[str], list[str]]:
    """Returns the row's image (or video) references (how many a model takes is checked by
    `image_count_problems` and `video_count_problems`)."""
    if value is None:
        return [], []
    if not isinstance(value, list):
        return [], [f"'{key}' must be a list of path or URL strings, got {_json_type(value)}"]
    bad = [k for k, ref in enumerate(value) if not (isinstance(ref, str) and ref.strip())]
    if bad:
        return [], [
            f"{key}[{bad[0]}] must be a non-empty path or URL string, got {_json_type(value[bad[0]])}"
        ]
    return [resolve_image_ref(ref, base_dir) for ref in value], []


def image_count_problems(rows: list[Row], max_images: int, model: str) -> list[tuple[int, Problem]]:
    """Returns (row index, problem) for every row with more images than the model takes per conversation."""
    return [
        (index, Problem(row.origin, f"{len(row.images)} images; {model} takes at most {_images(max_images)} "
                        "per conversation"))
        for index, row in enumerate(rows)
        if len(row.images) > max_images
    ]  # fmt: skip


def video_count_problems(rows: list[Row], limits: VideoLimits) -> list[tuple[int, Problem]]:
    """Returns (row index, problem) for every row with more videos than the family takes (none, for a family
    without video)."""
    return [
        (index, Problem(row.origin, f"{len(row.videos)} video(s); {limits.describe()}"))
        for index, row in enumerate(rows)
        if len(row.videos) > limits.max_videos
    ]


def check_videos(
    rows: list[Row],
    *,
    max_seconds: float | None = None,
    limits: VideoLimits | None = None,
    cache_dir: Path | None = None,
    workers: int | None = None,
) -> list[tuple[int, Problem]]:
    """Returns (row index, problem) for every row whose video cannot be read (missing, not a video, no frame)
    or is longer than `max_seconds` (dataset.max_video_seconds; the family's `limits` say how it samples).

    One header read per distinct video, remembered across runs (pipeline.data.video_check)."""
    headers = video_headers((ref for row in rows for ref in row.videos), cache_dir=cache_dir, workers=workers)
    found = []
    for index, row in enumerate(rows):
        for ref in row.videos:
            reason = _video_reason(ref, headers.get(ref), max_seconds, limits)
            if reason:
                found.append((index, Problem(row.origin, reason)))
    return found


def _video_reason(
    ref: str, header: VideoInfo | str | None, max_seconds: float | None, limits: VideoLimits | None
) -> str | None:
    if header is None or isinstance(header, str):
        return header or f"video {ref}: not checked"
    if max_seconds is not None and header.duration > max_seconds:
        sampling = f"; {limits.model}: {limits.sampling}" if limits is not None and limits.sampling else ""
        return (
            f"video {ref}: {header.duration:.1f} s long, over dataset.max_video_seconds={max_seconds:g}"
            f"{sampling}; raise the key or cut the video"
        )
    return None


def _images(n: int) -> str:
    return "one image" if n == 1 else f"{n} images"


def resolve_image_ref(ref: str, base_dir: Path) -> str:
    """Return a URL (or an image embedded in an Arrow file) unchanged, or a local path made absolute relative
    to base_dir."""
    if is_url(ref) or is_embedded(ref):
        return ref
    path = Path(ref).expanduser()
    if not path.is_absolute():
        path = Path(base_dir) / path
    return os.path.abspath(path)


def _json_type(value: object) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    if value is None:
        return "null"
    return next((name for kind, name in names.items() if isinstance(value, kind)), type(value).__name__)


def check_images(
    rows: list[Row],
    *,
    cache_dir: Path | None = None,
    workers: int | None = None,
) -> list[tuple[int, Problem]]:
    """Return (row index, problem) for every row whose image cannot be fetched or whose header is bad.

    One pass over every distinct image, local, URL or embedded in an Arrow file, however many rows use it
    (pipeline.data.image_check: headers only, in parallel, remembered by file identity across runs). URLs
    are downloaded, with a timeout, retries and a size cap, into the on-disk cache (``cache_dir``, default
    images.URL_CACHE_DIR) that training, evaluation and inference then read, so each is fetched once.
    """
    reasons = check_image_refs(
        (ref for row in rows for ref in row.images), cache_dir=cache_dir, workers=workers
    )
    return [
        (index, Problem(row.origin, reasons[ref]))
        for index, row in enumerate(rows)
        for ref in row.images
        if reasons.get(ref)
    ]


def check_lengths(
    rows: list[Row], count_tokens: Callable[[Row], int | None], max_length: int | None
) -> list[tuple[int, Problem]]:
    """Return (row index, problem) for rows that cannot be encoded or encode to over max_length tokens (the
    counter gives a row that cannot be kept under dataset.truncation its full length)."""
    found = []
    shown = tqdm(rows, desc="counting tokens", disable=len(rows) < 5000)
    for index, row in enumerate(shown):
        count = count_tokens(row)
        row.num_tokens = count  # kept: training cuts its token-budget micro-batches by it
        if count is None:
            found.append((index, Problem(row.origin, "row cannot be encoded with this model's template")))
        elif max_length is not None and count > max_length:
            reason = f"{count} tokens is over dataset.max_length={max_length}; raise it or shorten the row"
            found.append((index, Problem(row.origin, reason)))
    return found


def validate_rows(
    rows: list[Row],
    *,
    check_image_files: bool = True,
    cache_dir: Path | None = None,
    count_tokens: Callable[[Row], int | None] | None = None,
    max_length: int | None = None,
    on_error: str = "raise",
    workers: int | None = None,
) -> tuple[list[Row], list[Problem]]:
    """Return the rows that pass every check and the problems found; on_error="raise" raises DatasetError.

    Token lengths are counted only for rows whose images are fine, so ``count_tokens`` always sees a usable
    row. It is injected by the caller to keep this module independent of any tokenizer.
    """
    check_on_error(on_error)
    found: list[tuple[int, Problem]] = []
    if check_image_files:
        found += check_images(rows, cache_dir=cache_dir, workers=workers)
    if count_tokens is not None:
        bad = {index for index, _ in found}
        candidates = [index for index in range(len(rows)) if index not in bad]
        found += [
            (candidates[position], problem)
            for position, problem in check_lengths([rows[i] for i in candidates], count_tokens, max_length)
        ]
    return apply_on_error(rows, found, on_error)


def apply_on_error(
    rows: list[Row], found: Iterable[tuple[int, Problem]], on_error: str, earlier: Iterable[Problem] = ()
) -> tuple[list[Row], list[Problem]]:
    """Return the rows without problems plus all problems, or raise DatasetError when on_error is "raise".

    ``earlier`` holds problems of records that never became rows (bad JSON, wrong keys). Rows are only ever
    dropped, never replaced by other rows.
    """
    check_on_error(on_error)
    found = sorted(found, key=lambda item: item[0])
    problems = list(earlier) + [problem for _, problem in found]
    if problems and on_error == "raise":
        raise DatasetError(format_problems(problems))
    bad = {index for index, _ in found}
    kept = [row for index, row in enumerate(rows) if index not in bad]
    if problems:
        log.warning(
            "skipping %d row(s) with problems (on_error=skip); first: %s",
            len({problem.origin for problem in problems}),
            problems[0],
        )
    return kept, problems


def format_problems(problems: list[Problem], limit: int = MAX_LISTED) -> str:
    """Return a DatasetError message: the first problems as 'origin: reason' lines plus the total count."""
    lines = [f"{len(problems)} problem(s) in the dataset:"]
    lines += [f"  {problem}" for problem in problems[:limit]]
    if len(problems) > limit:
        lines.append(f"  ... and {len(problems) - limit} more")
    lines.append(
        "Fix these rows, or set the dataset's on_error: skip to drop them (they are then listed in "
        "the run folder)."
    )
    return "\n".join(lines)


def write_problems(problems: Iterable[Problem], path: Path) -> Path:
    """Return path after writing one JSON object {origin, reason} per line there, atomically."""
    text = "".join(
        json.dumps({"origin": p.origin, "reason": p.reason}, ensure_ascii=False) + "\n" for p in problems
    )
    return atomic_write_text(path, text)
