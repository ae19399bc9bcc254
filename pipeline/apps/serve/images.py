"""Turning a request's `image_url` into a decoded RGB image: a data: URL, an http(s) URL, or (when allowed) a
local file, each refused with a clear message when it is not a usable image. With a request's PixelBudget
(limits.py) an image's pixels are read from its header and counted before it is decoded."""

from __future__ import annotations

import base64
import binascii
import io
import re
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from pipeline.data.images import ImageLoadError, decode_image, fetch_url, load_image
from pipeline.data.rows import is_url

from .limits import PixelBudget, check_image_header
from .schema import RequestError

_DATA_URL = re.compile(
    r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,"
)


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int
    url_timeout: float
    allow_local_files: bool


def _refused(exc: ImageLoadError) -> RequestError:
    # PIL names the buffer it read by its memory address, which tells a client nothing
    return RequestError(
        f"image_url: {re.sub(r' <_io.BytesIO object at 0x[0-9a-f]+>', '', str(exc))}", param="image_url"
    )


def _short(url: str) -> str:
    return url if len(url) <= 80 else url[:60] + "..." + url[-12:]


def decode_data_url(url: str, limits: ImageLimits, budget: PixelBudget | None = None) -> Image.Image:
    """Returns the image of a `data:image/...;base64,` URL (its header counted against `budget` before it is
    decoded); raises RequestError when it is not one, or is over a limit."""
    match = _DATA_URL.match(url)
    if match is None or not match.group("b64"):
        raise RequestError(
            "image_url: a data URL must look like data:image/png;base64,<base64 data>", param="image_url"
        )
    mime = match.group("mime") or ""
    if not mime.startswith("image/"):
        raise RequestError(
            f"image_url: a data URL of type {mime or 'none'!r} is not an image", param="image_url"
        )
    payload = url[match.end() :]
    # 4 base64 characters hold 3 bytes: refuse an oversized image before decoding it
    if len(payload) * 3 // 4 > limits.max_bytes + 3:
        raise RequestError(
            f"image_url: the image is about {len(payload) * 3 // 4} bytes, over this server's "
            f"{limits.max_bytes}-byte limit (serve.max_image_bytes)",
            status=413,
            param="image_url",
        )
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise RequestError(
            f"image_url: the data URL's base64 is invalid or truncated ({exc})", param="image_url"
        ) from None
    if len(data) > limits.max_bytes:
        raise RequestError(
            f"image_url: the image is {len(data)} bytes, over this server's {limits.max_bytes}-byte "
            "limit (serve.max_image_bytes)",
            status=413,
            param="image_url",
        )
    name = f"the {mime} data URL"
    if budget is not None:
        check_image_header(data, name, budget)
    try:
        return decode_image(io.BytesIO(data), name=name)
    except ImageLoadError as exc:
        raise _refused(exc) from None


def _local_path(url: str) -> Path:
    if url.startswith("file:"):
        return Path(urllib.parse.unquote(urllib.parse.urlparse(url).path))
    return Path(url)


def load_request_image(url: str, limits: ImageLimits, budget: PixelBudget | None = None) -> Image.Image:
    """Returns the decoded RGB image that a request's image_url names, its pixels counted against `budget`
    from its header before it is decoded; raises RequestError otherwise."""
    if url.startswith("data:"):
        return decode_data_url(url, limits, budget)
    if is_url(url):
        try:
            data = fetch_url(url, timeout=limits.url_timeout, max_bytes=limits.max_bytes, retries=0)
        except ImageLoadError as exc:
            message = str(exc)
            if "timed out" in message:
                message = f"{_short(url)}: no answer within serve.url_timeout={limits.url_timeout:g} s"
            elif "over the" in message:
                raise RequestError(
                    f"image_url: {message} (serve.max_image_bytes)", status=413, param="image_url"
                ) from None
            raise RequestError(f"image_url: {message}", param="image_url") from None
        try:
            return decode_image(io.BytesIO(data), name=_short(url))
        except ImageLoadError as exc:
            raise _refused(exc) from None
    scheme = urllib.parse.urlparse(url).scheme
    if scheme not in ("", "file") and not re.match(r"^[A-Za-z]:[\\/]", url):
        raise RequestError(
            f"image_url: unsupported URL scheme {scheme!r}; use a data:image/...;base64, URL or an "
            "http(s) URL",
            param="image_url",
        )
    if not limits.allow_local_files:
        raise RequestError(
            f"image_url: {_short(url)} is a local file, and this server does not read local files "
            "(serve.allow_local_files=false); send the image as a data:image/...;base64, URL or an "
            "http(s) URL",
            status=403,
            param="image_url",
        )
    path = _local_path(url)
    if budget is not None and path.is_file():  # a missing file is load_image's to report
        check_image_header(path, _short(url), budget)
    try:
        return load_image(path, max_bytes=limits.max_bytes)
    except ImageLoadError as exc:
        raise RequestError(f"image_url: {exc}", param="image_url") from None
