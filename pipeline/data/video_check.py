"""The up-front video check: every distinct video's stream header, in parallel, remembered by file identity.

Each video is opened far enough to read its container and stream headers (pipeline.data.videos: frame count,
frame rate, duration, frame size), never decoded. The header, or why there is none, is kept under
VIDEO_CHECK_DIR with the identity of the file it came from, as pipeline.data.image_check keeps image checks
(the same shards and rules): a second run over the same files opens none of them again. Limits that depend on
the run (the longest video, the videos a family takes) are applied to the remembered headers afterwards.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

from tqdm import tqdm

from pipeline.data.image_check import recall, remember
from pipeline.data.images import DATA_CACHE_DIR
from pipeline.data.rows import is_url
from pipeline.data.videos import MAX_FRAME_PIXELS, VideoLoadError, read_video_header
from pipeline.families.base import VideoInfo

log = logging.getLogger(__name__)

VIDEO_CHECK_DIR = DATA_CACHE_DIR / "video_checks"
VERSION = f"video-header-1:{MAX_FRAME_PIXELS}"


def video_headers(
    refs: Iterable[str],
    *,
    cache_dir: Path | None = None,
    workers: int | None = None,
    check_cache: Path | None = None,
) -> dict[str, VideoInfo | str]:
    """Returns {video reference: its header, or why it cannot be read} for every distinct reference.

    URLs are downloaded into the URL cache (``cache_dir``) first, as training reads them from there.
    ``check_cache`` is the folder of remembered headers (default VIDEO_CHECK_DIR)."""
    refs = sorted(set(refs))
    if not refs:
        return {}
    folder = Path(check_cache) if check_cache is not None else VIDEO_CHECK_DIR
    remembered, todo = recall(folder, refs, cache_dir, VERSION)
    found: dict[str, VideoInfo | str] = {
        ref: VideoInfo(**entry) if isinstance(entry, dict) else str(entry)
        for ref, entry in remembered.items()
    }
    urls = sum(is_url(ref) for ref in todo)
    workers = workers or (8 if urls else min(4, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        outcomes = list(
            tqdm(
                pool.map(lambda ref: _header(ref, cache_dir), todo),
                total=len(todo),
                desc="reading video headers",
                disable=len(todo) < 100,
            )
        )
    checked = dict(zip(todo, outcomes, strict=True))
    found.update(checked)
    remember(
        folder,
        {ref: asdict(v) if isinstance(v, VideoInfo) else v for ref, v in checked.items()},
        cache_dir,
        VERSION,
    )
    log.info(
        "videos: %d distinct, %d checked, %d remembered from earlier runs",
        len(refs),
        len(todo),
        len(refs) - len(todo),
    )
    return found


def _header(ref: str, cache_dir: Path | None) -> VideoInfo | str:
    try:
        return read_video_header(ref, cache_dir)
    except VideoLoadError as exc:
        return f"video {exc}"
