"""Reading videos: a stream's header (frames, fps, duration, size) and the frames a family's sampling picks.

Frames are decoded by PyAV (`av`), FFmpeg's Python binding: its manylinux wheels bundle FFmpeg, so a plain
`pip install` decodes every common container and codec with nothing else on the machine. torchcodec was the
other maintained choice; its wheels are built against one torch release each and load the system's FFmpeg
libraries, which a machine may not have. transformers' own video loaders are not used: the families hand
their processors the frames decoded here (`do_sample_frames=False`, with the stream's metadata), so only the
sampled frames are ever held in memory, and a header is read once, up front, for the check and the sampling.

A video reference is a local path or an http(s) URL; a URL is downloaded once into the same cache as image
URLs (pipeline.data.images), with a larger size cap.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pipeline.data.images import ImageLoadError, fetch_url_to_cache, url_cache_dir
from pipeline.data.rows import is_url
from pipeline.families.base import VideoInfo

MAX_VIDEO_BYTES = 2 * 1024**3  # a URL's download cap (local files are read as they are)
# a frame over this many pixels is refused (8K is 33 Mpx); its sampled frames are all held in memory
MAX_FRAME_PIXELS = 40_000_000


class VideoLoadError(ImageLoadError):
    """A video reference cannot be read; the message names the path or URL and why."""


def video_file(ref: str, cache_dir: Path | None = None) -> Path:
    """Returns the local file of a video reference (a URL downloaded into the cache first); raises
    VideoLoadError naming it when there is none."""
    if is_url(ref):
        try:
            return fetch_url_to_cache(ref, url_cache_dir(cache_dir), max_bytes=MAX_VIDEO_BYTES)
        except ImageLoadError as exc:
            raise VideoLoadError(str(exc)) from exc
    path = Path(ref).expanduser()
    if not path.is_file():
        what = "is a folder, not a video file" if path.is_dir() else "video file not found"
        raise VideoLoadError(f"{ref}: {what}")
    return path


def _open(ref: str, path: Path):
    import av

    try:
        container = av.open(str(path), metadata_errors="ignore")
    except (av.FFmpegError, OSError, UnicodeDecodeError) as exc:
        raise VideoLoadError(f"{ref}: not a readable video ({_reason(exc)})") from exc
    if not container.streams.video:
        container.close()
        raise VideoLoadError(f"{ref}: the file holds no video stream")
    return container


def _reason(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def read_video_header(ref: str, cache_dir: Path | None = None) -> VideoInfo:
    """Returns the video's header: its frame count, frame rate, duration and frame size, from the container
    and stream headers (a stream that states no frame count is counted by demuxing, not decoding); raises
    VideoLoadError naming the reference when it cannot be read or holds no frame."""
    import av

    path = video_file(ref, cache_dir)
    container = _open(ref, path)
    try:
        stream = container.streams.video[0]
        codec = stream.codec_context
        width, height = int(codec.width or 0), int(codec.height or 0)
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        fps = float(rate) if rate else 0.0
        frames = int(stream.frames or 0)
        duration = float(stream.duration * stream.time_base) if stream.duration and stream.time_base else 0.0
        if not duration and container.duration:
            duration = container.duration / av.time_base
        if frames <= 0:  # some containers (webm, some avi) state none: count the packets holding frames
            frames = sum(1 for packet in container.demux(stream) if packet.size)
        if not fps and duration:
            fps = frames / duration
        if not duration and fps:
            duration = frames / fps
    except av.FFmpegError as exc:
        raise VideoLoadError(f"{ref}: not a readable video ({_reason(exc)})") from exc
    finally:
        container.close()
    if frames <= 0 or width <= 0 or height <= 0 or fps <= 0:
        raise VideoLoadError(
            f"{ref}: the video stream states no usable frames ({frames} frames, {width}x{height}, {fps:g} fps)"
        )
    if width * height > MAX_FRAME_PIXELS:
        raise VideoLoadError(
            f"{ref}: frames of {width}x{height} are over the {MAX_FRAME_PIXELS}-pixel limit; downscale the video"
        )
    return VideoInfo(frames=frames, fps=fps, duration=duration, width=width, height=height)


def decode_frames(ref: str, indices: Sequence[int], cache_dir: Path | None = None) -> np.ndarray:
    """Returns the frames at `indices` (their order, repeats allowed) as uint8 RGB (T, H, W, 3), decoding the
    stream once from its start up to the last frame asked for; a frame past the stream's end (a header that
    overstated the count) is the last decoded one. Raises VideoLoadError naming the reference."""
    import av

    if not len(indices):
        raise VideoLoadError(f"{ref}: no frame asked for")
    wanted = set(int(i) for i in indices)
    last = max(wanted)
    path = video_file(ref, cache_dir)
    container = _open(ref, path)
    picked: dict[int, np.ndarray] = {}
    previous = None
    try:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for number, frame in enumerate(container.decode(stream)):
            if number in wanted:
                picked[number] = frame.to_ndarray(format="rgb24")
            previous = frame
            if number >= last:
                break
        if previous is None:
            raise VideoLoadError(f"{ref}: no frame could be decoded")
        missing = [i for i in wanted if i not in picked]
        if missing:
            filler = picked[max(picked)] if picked else previous.to_ndarray(format="rgb24")
            picked.update({i: filler for i in missing})
    except av.FFmpegError as exc:
        raise VideoLoadError(f"{ref}: cannot be decoded ({_reason(exc)})") from exc
    finally:
        container.close()
    return np.stack([picked[int(i)] for i in indices])
