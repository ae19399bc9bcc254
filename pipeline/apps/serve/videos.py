"""Turning a request's `video_url` into the frames its family samples, for a family that takes videos
(capabilities.max_videos): a `data:video/...;base64,` URL, an http(s) URL, or (when allowed) a local file.

- At most serve.max_video_bytes: a data URL is refused from its base64's length, a URL's body is not read
  past the cap.
- http(s) URLs are fetched as image URLs are (images.py): public addresses only unless serve.allowed_url_hosts
  or serve.allow_private_urls says otherwise, within serve.url_timeout, on the URL fetchers' threads, and
  refused with one message whatever went wrong, a body that is no video included (the reason goes to the
  server's log).
- The frames the family samples (Family.video_frame_picker, under the model.video_* settings) are counted
  with the request's images against serve.max_image_pixels and serve.max_request_pixels from the stream's
  header, before any frame is decoded (PixelBudget.take_frames); only those frames are decoded.
- Fetched or sent bytes go to a temporary file that the decoder reads, removed once the frames are decoded.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from fastapi.concurrency import run_in_threadpool

from pipeline.data.images import ImageLoadError
from pipeline.data.rows import is_url
from pipeline.data.videos import decode_frames, read_video_header
from pipeline.families.base import Video, VideoInfo

from .images import (
    ImageLimits,
    RequestImages,
    allowed_local_path,
    data_url_bytes,
    fetch_request_url,
    short_url,
    url_refused,
)
from .limits import PixelBudget
from .schema import RequestError

log = logging.getLogger(__name__)

# the container suffix of a data URL's MIME type, for the temporary file the decoder reads (FFmpeg probes the
# content; the suffix only helps it pick first)
SUFFIXES = {"video/mp4": ".mp4", "video/webm": ".webm", "video/quicktime": ".mov", "video/x-matroska": ".mkv"}


@dataclass(frozen=True)
class VideoSource:
    """What loading a request's videos needs: the URL rules (ImageLimits: timeout, hosts, local files), the
    byte cap (serve.max_video_bytes) and the family's frame sampling."""

    limits: ImageLimits
    max_bytes: int
    pick: Callable[[VideoInfo], Sequence[int]]


def fetch_video_bytes(url: str, source: VideoSource, index: int) -> bytes:
    """Returns the body of an http(s) video URL; raises url_refused(index, "video") when it cannot be had, and
    logs why."""
    try:
        return fetch_request_url(url, source.limits, source.max_bytes)
    except Exception as exc:  # refused address, no answer, too large, a URL http.client cannot send
        log.warning("video_url %d refused: %s: %s: %s", index, short_url(url), type(exc).__name__, exc)
        raise url_refused(index, "video") from None


def decode_request_video(
    data: bytes | Path,
    name: str,
    source: VideoSource,
    budget: PixelBudget,
    suffix: str = ".mp4",
    fetched: int | None = None,
) -> Video:
    """Returns the frames the family samples from a video (its bytes, or a local file), counted against the
    request's `budget` from the stream's header before they are decoded; raises RequestError naming the
    video (`name`) when it is no readable video or is over a limit. A body fetched from the request's
    `fetched`-th video URL that is no readable video gets url_refused's one answer (what a host serves is
    not for a client to learn); over a limit, it is the request's to know."""
    if isinstance(data, Path):
        return _decoded(data, name, source, budget, fetched)
    handle, temporary = tempfile.mkstemp(prefix="video-url-", suffix=suffix)
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
        return _decoded(Path(temporary), name, source, budget, fetched)
    finally:
        Path(temporary).unlink(missing_ok=True)


def _decoded(path: Path, name: str, source: VideoSource, budget: PixelBudget, fetched: int | None) -> Video:
    try:
        info = read_video_header(str(path))
        indices = [int(i) for i in source.pick(info)]
        budget.take_frames(info.width, info.height, len(indices), name)
        frames = decode_frames(str(path), indices)
    except ImageLoadError as exc:  # VideoLoadError: the message names the file, which the client never saw
        reason = str(exc).replace(str(path), name)
        if fetched is not None:
            log.warning("video_url %d refused: %s", fetched, reason)
            raise url_refused(fetched, "video") from None
        raise RequestError(f"video_url: {reason}", param="video_url") from None
    return Video(frames, indices, info)


def load_request_video(url: str, source: VideoSource, budget: PixelBudget, index: int = 0) -> Video:
    """Returns the sampled frames of the video a request's video_url names (a data URL, or a local file where
    allowed); http(s) URLs come through RequestVideos, on the URL fetchers. Raises RequestError otherwise."""
    if url.startswith("data:"):
        mime, data = data_url_bytes(url, "video", source.max_bytes, "serve.max_video_bytes")
        return decode_request_video(data, f"the {mime} data URL", source, budget, SUFFIXES.get(mime, ".mp4"))
    path = allowed_local_path(url, "video", source.limits)
    if not path.is_file():
        raise RequestError(f"video_url: {short_url(url)}: video file not found", param="video_url")
    if path.stat().st_size > source.max_bytes:
        raise RequestError(
            f"video_url: {short_url(url)} is {path.stat().st_size} bytes, over this server's {source.max_bytes}-"
            "byte limit (serve.max_video_bytes)",
            status=413,
            param="video_url",
        )
    return decode_request_video(path, short_url(url), source, budget)


class RequestVideos:
    """Loads a request's videos: http(s) URLs fetched on the image URLs' fetcher threads (RequestImages, so
    one pool bounds every URL the server fetches), then decoded, like data URLs and local files, on the
    server's shared threads."""

    def __init__(self, source: VideoSource, fetchers: RequestImages) -> None:
        self.source = source
        self.fetchers = fetchers

    async def load(self, urls: list[str], budget: PixelBudget) -> list[Video]:
        """Returns the videos of `urls` in order (their sampled frames), counted with the request's images in
        `budget`; raises RequestError for the first that cannot be used."""
        videos = []
        for index, url in enumerate(urls):
            if is_url(url):
                data = await self.fetchers.on_fetcher(
                    index, "video", fetch_video_bytes, url, self.source, index
                )
                suffix = Path(urllib.parse.urlparse(url).path).suffix
                suffix = suffix if re.fullmatch(r"\.[A-Za-z0-9]{1,5}", suffix) else ".mp4"
                videos.append(
                    await run_in_threadpool(
                        decode_request_video, data, f"video_url {index}", self.source, budget, suffix, index
                    )
                )
            else:
                videos.append(await run_in_threadpool(load_request_video, url, self.source, budget, index))
        return videos
