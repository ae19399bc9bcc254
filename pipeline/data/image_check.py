"""The up-front image check: every distinct image's header, in parallel, remembered by file identity.

Each image is opened far enough to read its size (against the pixel limit) and its last bytes (a JPEG's or
PNG's end marker: a cut-off file fails there), never decoded: on two cores that is tens of thousands of
images a second, where decoding them all took hours on large sets. The outcome is kept per image under
CHECK_CACHE_DIR, with the identity (size, mtime, inode) of the file it came from (the image file, a URL's
cached copy, or the Arrow file an embedded image is in), so a second run over the same files checks none of
them again, and a changed file is checked anew. The cache is 16 JSON shards, each replaced whole
(write-then-rename): never half-written; two runs writing at once can only lose each other's entries.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from tqdm import tqdm

from pipeline.data.arrow_images import file_of, is_embedded
from pipeline.data.images import (
    DATA_CACHE_DIR,
    MAX_BYTES,
    MAX_PIXELS,
    TRAILER_BYTES,
    ImageLoadError,
    read_image_header,
    url_cache_dir,
    url_cache_path,
)
from pipeline.data.rows import is_url
from pipeline.utils.io import atomic_write_json

log = logging.getLogger(__name__)

CHECK_CACHE_DIR = DATA_CACHE_DIR / "image_checks"
SHARDS = 16
# an entry is valid only for the limits it was checked against
VERSION = f"header-1:{MAX_PIXELS}:{MAX_BYTES}:{TRAILER_BYTES}"

Identity = list[int]  # [size, mtime_ns, inode] of the file an image is read from


def check_image_refs(
    refs: Iterable[str],
    *,
    cache_dir: Path | None = None,
    workers: int | None = None,
    check_cache: Path | None = None,
) -> dict[str, str | None]:
    """Returns {image reference: why it cannot be used, or None} for every distinct reference.

    URLs are downloaded into the URL cache (``cache_dir``) first, as training reads them from there.
    ``check_cache`` is the folder of remembered outcomes (default CHECK_CACHE_DIR).
    """
    refs = sorted(set(refs))
    folder = Path(check_cache) if check_cache is not None else CHECK_CACHE_DIR
    reasons, todo = recall(folder, refs, cache_dir, VERSION)
    urls = sum(is_url(ref) for ref in todo)
    workers = workers or (16 if urls else min(8, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        bar = tqdm(
            pool.map(lambda ref: _reason(ref, cache_dir), todo),
            total=len(todo),
            desc="fetching and checking images" if urls else "checking image headers",
            disable=len(todo) < 1000 and urls < 20,
        )
        found = dict(zip(todo, bar, strict=True))
    reasons.update(found)
    remember(folder, found, cache_dir, VERSION)
    log.info(
        "images: %d distinct, %d checked, %d remembered from earlier runs (%s)",
        len(refs),
        len(todo),
        len(refs) - len(todo),
        folder,
    )
    return reasons


def _reason(ref: str, cache_dir: Path | None) -> str | None:
    try:
        read_image_header(ref, cache_dir=cache_dir)
    except ImageLoadError as exc:
        return f"image {exc}"
    return None


def recall(
    folder: Path, refs: Sequence[str], cache_dir: Path | None, version: str
) -> tuple[dict[str, Any], list[str]]:
    """Returns ({reference: its remembered outcome} for the references whose file is the one it was checked
    from, the other references: the ones to check now), from the shards in `folder` of `version`."""
    stats: dict[str, Identity | None] = {}
    shards = _load_shards(folder, refs, version)
    found: dict[str, Any] = {}
    todo = []
    for ref in refs:
        identity = _identity(ref, cache_dir, stats)
        entry = shards[_shard_of(ref)].get(ref)
        if identity is not None and entry is not None and entry[:3] == identity:
            found[ref] = entry[3]
        else:
            todo.append(ref)
    return found, todo


def remember(folder: Path, outcomes: dict[str, Any], cache_dir: Path | None, version: str) -> None:
    """Keeps the outcomes (JSON values) just checked in `folder`'s shards of `version`, each under the
    identity of its file as it is now (a URL's cached copy now exists)."""
    if outcomes:
        stats: dict[str, Identity | None] = {}
        _store(folder, outcomes, {ref: _identity(ref, cache_dir, stats) for ref in outcomes}, version)


def _identity(ref: str, cache_dir: Path | None, stats: dict[str, Identity | None]) -> Identity | None:
    """Returns the identity of the file an image is read from, None when there is none (yet)."""
    if is_embedded(ref):
        path = str(file_of(ref))
    elif is_url(ref):
        path = str(url_cache_path(ref, url_cache_dir(cache_dir)))
    else:
        path = os.path.expanduser(ref)
    if path not in stats:
        try:
            st = os.stat(path)
            stats[path] = [st.st_size, st.st_mtime_ns, st.st_ino]
        except OSError:
            stats[path] = None
    return stats[path]


def _shard_of(ref: str) -> int:
    return int(hashlib.sha1(ref.encode()).hexdigest()[0], 16) % SHARDS


def _shard_path(folder: Path, shard: int) -> Path:
    return folder / f"{shard:02d}.json"


def _read_shard(path: Path, version: str = VERSION) -> dict[str, list]:
    """Returns a shard's entries; an unreadable or other-version shard counts as empty (it is rewritten)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("version") != version:
        return {}
    entries = data.get("entries")
    return entries if isinstance(entries, dict) else {}


def _load_shards(folder: Path, refs: Sequence[str], version: str = VERSION) -> dict[int, dict[str, list]]:
    needed = {_shard_of(ref) for ref in refs}
    return {
        shard: _read_shard(_shard_path(folder, shard), version) if shard in needed else {}
        for shard in range(SHARDS)
    }


def _store(
    folder: Path,
    reasons: dict[str, Any],
    identities: dict[str, Identity | None],
    version: str = VERSION,
) -> None:
    """Adds the outcomes (JSON values) of files that have an identity to their shards, each rewritten whole."""
    by_shard: dict[int, dict[str, list]] = {}
    for ref, reason in reasons.items():
        identity = identities.get(ref)
        if identity is not None:
            by_shard.setdefault(_shard_of(ref), {})[ref] = [*identity, reason]
    for shard, entries in by_shard.items():
        path = _shard_path(folder, shard)
        merged = {
            **_read_shard(path, version),
            **entries,
        }  # read again: another run may have written meanwhile
        try:
            atomic_write_json(path, {"version": version, "entries": merged}, indent=None)
        except OSError as exc:  # a read-only cache costs a re-check next time, nothing else
            log.warning("cannot remember image checks in %s (%s)", path, exc)
            return
