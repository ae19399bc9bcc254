"""Loading images from local paths or URLs into fully decoded RGB PIL images, refusing broken files."""

from __future__ import annotations

import errno
import hashlib
import io
import os
import re
import time
import urllib.error
import urllib.request
import warnings
from pathlib import Path

from PIL import Image

from pipeline.data.rows import is_url
from pipeline.utils.io import atomic_write_bytes

MAX_BYTES = 32 * 1024 * 1024
# Downloads: seconds to connect and for each read (the whole body gets DEADLINE_READS times that), and how
# often a transient failure (timeout, reset, 5xx, 408, 429) is tried again.
TIMEOUT_S = 10.0
DEADLINE_READS = 6
RETRIES = 2
# Downloaded and extracted data live under DATA_CACHE_DIR; URL images in URL_CACHE_DIR, under the sha256 of
# the URL: the up-front check fills it, training, evaluation and inference read it.
DATA_CACHE_DIR = Path(__file__).resolve().parents[2] / "data" / "cache"
URL_CACHE_DIR = DATA_CACHE_DIR / "urls"
# 64 Mpx is far above any training image (the model resizes to about 448^2 per slice) and far below what
# would exhaust memory: a larger header is almost certainly a decompression bomb.
MAX_PIXELS = 64_000_000
_USER_AGENT = "pipeline-image-loader/1.0"


class ImageLoadError(OSError):
    """An image reference cannot be turned into pixels; the message names the path or URL and why."""


class _SlowBody(TimeoutError):
    """The server answered, but sent the body too slowly."""


def url_cache_dir(cache_dir: Path | None = None) -> Path:
    """Return the folder URL images are cached in: `cache_dir` when given, else URL_CACHE_DIR."""
    return Path(cache_dir) if cache_dir is not None else URL_CACHE_DIR


def local_image_file(ref: str, cache_dir: Path | None = None) -> Path | None:
    """Return the local file holding an image reference (a URL's cached copy), or None when there is none."""
    path = url_cache_path(ref, url_cache_dir(cache_dir)) if is_url(ref) else Path(ref).expanduser()
    return path if path.is_file() else None


def load_image(
    ref: str | os.PathLike,
    *,
    cache_dir: Path | None = None,
    timeout: float | None = None,
    max_bytes: int = MAX_BYTES,
    retries: int | None = None,
    max_pixels: int = MAX_PIXELS,
) -> Image.Image:
    """Return the image at a local path or http(s) URL, fully decoded and converted to RGB.

    Conversion is a plain ``convert("RGB")`` (alpha dropped, no EXIF rotation), as the official
    MiniCPM-V-2 code does, so training and inference see the same pixels. URLs are downloaded once, with a
    timeout, retries and a size cap, into ``cache_dir`` (default URL_CACHE_DIR) under the sha256 of the URL,
    and read from there afterwards.
    """
    ref = os.fspath(ref)
    if is_url(ref):
        path = fetch_url_to_cache(
            ref, url_cache_dir(cache_dir), timeout=timeout, max_bytes=max_bytes, retries=retries
        )
        try:
            return decode_image(path, name=ref, max_pixels=max_pixels)
        except ImageLoadError as exc:
            # what the server sent is no image (an error page?): fetch it again next time, not this copy
            path.unlink(missing_ok=True)
            raise ImageLoadError(f"{exc} (downloaded; the copy was dropped from the cache)") from exc
    path = Path(ref).expanduser()
    if not path.is_file():
        raise ImageLoadError(f"{ref}: {_not_a_file(path)}")
    size = path.stat().st_size
    if size > max_bytes:
        raise ImageLoadError(f"{ref}: file is {size} bytes, over the {max_bytes}-byte limit")
    return decode_image(path, name=ref, max_pixels=max_pixels, limit_key=_limit_key(max_pixels))


def _limit_key(max_pixels: int) -> str | None:
    """Returns what sets the data loader's pixel limit, for its refusals: MAX_PIXELS unless a caller chose."""
    return "MAX_PIXELS in pipeline/data/images.py" if max_pixels == MAX_PIXELS else None


def _not_a_file(path: Path) -> str:
    """Returns why a local image path is not a readable file: a folder, a symlink loop, a link to nothing, or
    nothing there (is_file() says False for all of them)."""
    if path.is_dir():
        return "is a folder, not an image file"
    try:
        os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "is a symlink loop (its links lead back to themselves); point the link at the image file"
        if path.is_symlink():
            return f"is a symbolic link to {os.readlink(path)}, which does not exist"
        if exc.errno != errno.ENOENT:
            return f"cannot be read ({exc.strerror})"
        return "file not found"
    return "is not a regular file"


def _over_pixel_limit(name: str, pixels: str, max_pixels: int, limit_key: str | None) -> str:
    """Returns the message for an image over the pixel limit: the project's limit (not PIL's) and, when
    given, the key or constant that sets it."""
    where = f" ({limit_key})" if limit_key else ""
    return (
        f"{name}: {pixels} pixels is over the {max_pixels}-pixel limit{where}; refused as a possible "
        "decompression bomb: downscale the image"
    )


def decode_image(
    source: Path | io.BytesIO, *, name: str, max_pixels: int = MAX_PIXELS, limit_key: str | None = None
) -> Image.Image:
    """Return the RGB image decoded from a file or buffer, after a header pixel check and a verify pass;
    `limit_key` names what sets max_pixels in the refusal."""
    try:
        with warnings.catch_warnings():
            # The pixel cap below replaces PIL's own bomb warning with an error that names the file.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(source) as probe:
                width, height = probe.size
                if width * height > max_pixels:
                    raise ImageLoadError(
                        _over_pixel_limit(name, f"{width}x{height} = {width * height}", max_pixels, limit_key)
                    )
                probe.verify()  # checks chunk CRCs and structure without decoding all pixels
            if isinstance(source, io.BytesIO):
                source.seek(0)
            with Image.open(source) as image:
                image.load()  # a truncated file fails here
                return image.convert("RGB")
    except ImageLoadError:
        raise
    except Image.DecompressionBombError as exc:  # PIL's own cap, far above the project's, refused first
        counted = re.search(r"\((\d+) pixels\)", str(exc))
        pixels = counted.group(1) if counted else f"over {Image.MAX_IMAGE_PIXELS * 2}"
        raise ImageLoadError(_over_pixel_limit(name, pixels, max_pixels, limit_key)) from exc
    except Exception as exc:  # PIL reports broken files through many exception types
        raise ImageLoadError(f"{name}: cannot decode image ({type(exc).__name__}: {exc})") from exc


def fetch_url(
    url: str, *, timeout: float | None = None, max_bytes: int = MAX_BYTES, retries: int | None = None
) -> bytes:
    """Return the body of an http(s) URL, retrying transient failures and refusing bodies over max_bytes."""
    timeout = TIMEOUT_S if timeout is None else timeout
    retries = RETRIES if retries is None else retries
    last_error: Exception | None = None
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(min(0.5 * 2 ** (attempt - 1), 4.0))
        try:
            return _fetch_once(url, timeout=timeout, max_bytes=max_bytes)
        except urllib.error.HTTPError as exc:
            last_error = exc
            if 400 <= exc.code < 500 and exc.code not in (408, 429):
                break  # the server answered definitively; retrying will not help
        except ImageLoadError:
            raise
        except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as exc:
            last_error = exc
    if isinstance(last_error, urllib.error.URLError) and isinstance(last_error.reason, TimeoutError):
        last_error = last_error.reason
    if isinstance(last_error, TimeoutError) and not isinstance(last_error, _SlowBody):
        last_error = f"no answer within {timeout:g} s ({last_error or 'timed out'})"
    raise ImageLoadError(f"{url}: download failed after {attempt + 1} attempt(s): {last_error}")


def _fetch_once(url: str, *, timeout: float, max_bytes: int) -> bytes:
    """Return the body; `timeout` bounds the connection and each read, DEADLINE_READS x it the whole body."""
    request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
    deadline = time.monotonic() + DEADLINE_READS * timeout
    chunks: list[bytes] = []
    size = 0
    with urllib.request.urlopen(request, timeout=timeout) as response:
        declared = response.headers.get("Content-Length")
        if declared is not None and declared.isdigit() and int(declared) > max_bytes:
            raise ImageLoadError(f"{url}: Content-Length {declared} is over the {max_bytes}-byte limit")
        while chunk := response.read(min(1 << 20, max_bytes + 1 - size)):
            chunks.append(chunk)
            size += len(chunk)
            if size > max_bytes:
                raise ImageLoadError(f"{url}: body is over the {max_bytes}-byte limit")
            if time.monotonic() > deadline:
                raise _SlowBody(f"the body took over {DEADLINE_READS * timeout:g} s")
    return b"".join(chunks)


def url_cache_path(url: str, cache_dir: Path) -> Path:
    """Return where a URL's body is cached: the sha256 of the URL, keeping a short file extension."""
    suffix = Path(url.split("?", 1)[0]).suffix.lower()
    if not (1 < len(suffix) <= 6 and suffix[1:].isalnum()):
        suffix = ""
    return Path(cache_dir) / f"{hashlib.sha256(url.encode()).hexdigest()}{suffix}"


def fetch_url_to_cache(
    url: str,
    cache_dir: Path,
    *,
    timeout: float | None = None,
    max_bytes: int = MAX_BYTES,
    retries: int | None = None,
) -> Path:
    """Return the local cached copy of a URL, downloading it first when absent.

    The file appears whole or not at all (written under a temporary name, then renamed), so an interrupted
    download never leaves a broken image in the cache.
    """
    path = url_cache_path(url, cache_dir)
    if path.is_file():
        return path
    data = fetch_url(url, timeout=timeout, max_bytes=max_bytes, retries=retries)
    atomic_write_bytes(path, data)
    return path


class ImageFiles:
    """The images of a run's rows, as the families read them (pipeline.families.base.ImageSource): local
    files and http(s) URLs, the URLs cached under `cache_dir` (default URL_CACHE_DIR)."""

    def __init__(self, cache_dir: Path | None = None) -> None:
        self.cache_dir = cache_dir

    def load(self, ref: str) -> Image.Image:
        """Returns the image, decoded to RGB; raises ImageLoadError naming the path or URL."""
        return load_image(ref, cache_dir=self.cache_dir)

    def size(self, ref: str) -> tuple[int, int] | None:
        """Returns (width, height) from the header of the local file (a URL's cached copy), None if absent."""
        local = local_image_file(ref, self.cache_dir)
        if local is None:
            return None
        with Image.open(local) as img:
            return img.size
