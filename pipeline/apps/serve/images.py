"""Turning a request's `image_url` into a decoded RGB image: a data: URL, an http(s) URL, or (when allowed) a
local file, each refused with a clear message when it is not a usable image. With a request's PixelBudget
(limits.py) an image's pixels are read from its header and counted before it is decoded.

http(s) URLs come from whoever can send a request, so they are fetched with care (RequestImages):
- only from public addresses unless serve.allow_private_urls or serve.allowed_url_hosts says otherwise, the
  host resolved here and the checked address connected to, again on every redirect (pipeline.data.images);
- within one deadline for the whole fetch, serve.url_timeout, however slowly the bytes come;
- on their own serve.url_fetch_workers threads, so slow sources cannot hold the threads that encode prompts
  (text-only requests never wait for them);
- refused with one message whatever went wrong (refused address, no answer, timeout, not an image), naming
  only the image's index: which hosts and ports answer, and how, is not for a client to learn. The reason
  goes to the server's log.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import io
import logging
import re
import urllib.parse
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from fastapi.concurrency import run_in_threadpool
from PIL import Image

from pipeline.data.images import ImageLoadError, UrlPolicy, decode_image, fetch_url, load_image
from pipeline.data.rows import is_url

from .limits import PixelBudget, check_image_header
from .schema import RequestError

log = logging.getLogger(__name__)
T = TypeVar("T")

_DATA_URL = re.compile(
    r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,"
)


@dataclass(frozen=True)
class ImageLimits:
    """The serve.* keys on request images."""

    max_bytes: int
    url_timeout: float  # seconds for the whole fetch of one image URL: connect, headers and body
    allow_local_files: bool
    allowed_url_hosts: tuple[str, ...] = ()  # empty: any host at a public address
    allow_private_urls: bool = False  # true: any address (a trusted network)
    url_fetch_workers: int = 4  # image URLs fetched at once

    @property
    def url_policy(self) -> UrlPolicy:
        return UrlPolicy(allow_private=self.allow_private_urls, allowed_hosts=tuple(self.allowed_url_hosts))


def url_refused(index: int, kind: str = "image") -> RequestError:
    """The one answer to an image (video) URL that could not be used, whatever the reason (the log has it)."""
    return RequestError(
        f"{kind}_url {index}: the {kind} could not be fetched (the request's {kind}s count from 0; this server "
        f"fetches http(s) {kind}s from the hosts it allows, within serve.url_timeout and serve.max_{kind}_bytes)",
        param=f"{kind}_url",
        code=f"{kind}_url_unavailable",
    )


def _without_buffer(exc: ImageLoadError) -> str:
    # PIL names the buffer it read by its memory address, which tells a client nothing
    return re.sub(r" <_io.BytesIO object at 0x[0-9a-f]+>", "", str(exc))


def _refused(exc: ImageLoadError) -> RequestError:
    return RequestError(f"image_url: {_without_buffer(exc)}", param="image_url")


def short_url(url: str) -> str:
    return url if len(url) <= 80 else url[:60] + "..." + url[-12:]


def data_url_bytes(url: str, kind: str, max_bytes: int, limit_key: str) -> tuple[str, bytes]:
    """Returns (the MIME type, the bytes) of a `data:<kind>/...;base64,` URL; raises RequestError (param
    `<kind>_url`) when it is not one of that kind, or holds more than `max_bytes` (the `limit_key` setting),
    refused from the base64's length before it is decoded."""
    param = f"{kind}_url"
    example = "png" if kind == "image" else "mp4"
    match = _DATA_URL.match(url)
    if match is None or not match.group("b64"):
        raise RequestError(
            f"{param}: a data URL must look like data:{kind}/{example};base64,<base64 data>", param=param
        )
    mime = match.group("mime") or ""
    if not mime.startswith(f"{kind}/"):
        article = "an" if kind[0] in "aeiou" else "a"
        raise RequestError(
            f"{param}: a data URL of type {mime or 'none'!r} is not {article} {kind}", param=param
        )
    payload = url[match.end() :]
    # 4 base64 characters hold 3 bytes
    if len(payload) * 3 // 4 > max_bytes + 3:
        raise RequestError(
            f"{param}: the {kind} is about {len(payload) * 3 // 4} bytes, over this server's {max_bytes}-byte "
            f"limit ({limit_key})",
            status=413,
            param=param,
        )
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise RequestError(
            f"{param}: the data URL's base64 is invalid or truncated ({exc})", param=param
        ) from None
    if len(data) > max_bytes:
        raise RequestError(
            f"{param}: the {kind} is {len(data)} bytes, over this server's {max_bytes}-byte limit ({limit_key})",
            status=413,
            param=param,
        )
    return mime, data


def decode_data_url(url: str, limits: ImageLimits, budget: PixelBudget | None = None) -> Image.Image:
    """Returns the image of a `data:image/...;base64,` URL (its header counted against `budget` before it is
    decoded); raises RequestError when it is not one, or is over a limit."""
    mime, data = data_url_bytes(url, "image", limits.max_bytes, "serve.max_image_bytes")
    name = f"the {mime} data URL"
    if budget is not None:
        check_image_header(data, name, budget)
    try:
        return decode_image(io.BytesIO(data), name=name)
    except ImageLoadError as exc:
        raise _refused(exc) from None


def allowed_local_path(url: str, kind: str, limits: ImageLimits) -> Path:
    """Returns the local file a request's `kind` URL (image, video) names, a path or a file:// URL; raises
    RequestError for another scheme, and (403) when the server reads no local files
    (serve.allow_local_files=false)."""
    param = f"{kind}_url"
    scheme = urllib.parse.urlparse(url).scheme
    if scheme not in ("", "file") and not re.match(r"^[A-Za-z]:[\\/]", url):
        raise RequestError(
            f"{param}: unsupported URL scheme {scheme!r}; use a data:{kind}/...;base64, URL or an http(s) URL",
            param=param,
        )
    if not limits.allow_local_files:
        raise RequestError(
            f"{param}: {short_url(url)} is a local file, and this server does not read local files "
            f"(serve.allow_local_files=false); send the {kind} as a data:{kind}/...;base64, URL or an "
            "http(s) URL",
            status=403,
            param=param,
        )
    if url.startswith("file:"):
        return Path(urllib.parse.unquote(urllib.parse.urlparse(url).path))
    return Path(url)


def fetch_request_url(url: str, limits: ImageLimits, max_bytes: int) -> bytes:
    """Returns the body of a request's http(s) URL under the server's rules: one try, within
    serve.url_timeout for the whole fetch, at most `max_bytes`, from the hosts and addresses the config
    allows (limits.url_policy); raises what pipeline.data.images.fetch_url raises."""
    return fetch_url(
        url,
        timeout=limits.url_timeout,
        deadline=limits.url_timeout,
        max_bytes=max_bytes,
        retries=0,
        policy=limits.url_policy,
    )


def fetch_url_image(
    url: str, limits: ImageLimits, index: int = 0, budget: PixelBudget | None = None
) -> Image.Image:
    """Returns the decoded RGB image at an http(s) URL, its pixels counted against `budget` from its header
    before it is decoded; raises url_refused(index) when it cannot be had, and logs why."""
    try:
        data = fetch_request_url(url, limits, limits.max_bytes)
    except ImageLoadError as exc:
        log.warning("image_url %d refused: %s", index, _without_buffer(exc))
        raise url_refused(index) from None
    except Exception as exc:  # a URL http.client cannot send, say: the client gets the same answer
        log.warning("image_url %d refused: %s: %s: %s", index, short_url(url), type(exc).__name__, exc)
        raise url_refused(index) from None
    if budget is not None:
        try:  # a body that is no image gets the one answer every unusable URL gets
            Image.open(io.BytesIO(data)).close()
        except Image.DecompressionBombError:
            pass  # an image, too large: the budget names the limit
        except Exception as exc:
            log.warning("image_url %d refused: %s: cannot decode image (%s)", index, short_url(url), exc)
            raise url_refused(index) from None
        # fetched and an image: over a pixel limit is the request's to know (a RequestError naming the key)
        check_image_header(data, f"image_url {index}", budget)
    try:
        return decode_image(io.BytesIO(data), name=short_url(url))
    except ImageLoadError as exc:
        log.warning("image_url %d refused: %s", index, _without_buffer(exc))
    raise url_refused(index)


def load_request_image(
    url: str, limits: ImageLimits, budget: PixelBudget | None = None, index: int = 0
) -> Image.Image:
    """Returns the decoded RGB image that a request's image_url names, its pixels counted against `budget`
    from its header before it is decoded; raises RequestError otherwise."""
    if url.startswith("data:"):
        return decode_data_url(url, limits, budget)
    if is_url(url):
        return fetch_url_image(url, limits, index, budget)
    path = allowed_local_path(url, "image", limits)
    if budget is not None and path.is_file():  # a missing file is load_image's to report
        check_image_header(path, short_url(url), budget)
    try:
        return load_image(path, max_bytes=limits.max_bytes)
    except ImageLoadError as exc:
        raise RequestError(f"image_url: {exc}", param="image_url") from None


class RequestImages:
    """Loads a request's images: http(s) URLs on a pool of limits.url_fetch_workers threads of their own,
    data: URLs and local files on the server's shared threads as before (they wait on no one).

    A URL waits at most serve.url_timeout for a free fetcher, then gets a 503: when slow sources hold every
    fetcher, requests with URLs are turned away, and the others go on as if nothing happened.
    """

    def __init__(self, limits: ImageLimits) -> None:
        self.limits = limits
        self._pool = ThreadPoolExecutor(limits.url_fetch_workers, thread_name_prefix="image-url")
        self._free: asyncio.Semaphore | None = None  # made on the event loop, at the first URL

    async def load(self, urls: list[str], budget: PixelBudget | None = None) -> list[Image.Image]:
        """Returns the images of `urls` in order, their pixels counted against the request's `budget`;
        raises RequestError for the first that cannot be used."""
        images = []
        for index, url in enumerate(urls):
            if is_url(url):
                images.append(await self._fetch(url, index, budget))
            else:
                images.append(await run_in_threadpool(load_request_image, url, self.limits, budget, index))
        return images

    async def _fetch(self, url: str, index: int, budget: PixelBudget | None) -> Image.Image:
        return await self.on_fetcher(index, "image", fetch_url_image, url, self.limits, index, budget)

    async def on_fetcher(self, index: int, kind: str, fetch: Callable[..., T], *args: Any) -> T:
        """Returns `fetch(*args)` run on a URL fetcher's thread: the request's `index`-th `kind` URL (image,
        video) waits at most serve.url_timeout for a free fetcher (503 past it), and for the fetch itself
        (url_refused past it)."""
        loop = asyncio.get_running_loop()
        if self._free is None:
            self._free = asyncio.Semaphore(self.limits.url_fetch_workers)
        free = self._free
        param = f"{kind}_url"
        try:
            await asyncio.wait_for(free.acquire(), timeout=self.limits.url_timeout)
        except asyncio.TimeoutError:
            log.warning(
                "%s %d refused: all %d URL fetchers stayed busy for %g s (serve.url_fetch_workers)",
                param,
                index,
                self.limits.url_fetch_workers,
                self.limits.url_timeout,
            )
            example = "image/..." if kind == "image" else "video/..."
            raise RequestError(
                f"every {kind} URL fetcher of this server is busy; try again shortly, or send the {kind} as a "
                f"data:{example};base64, URL",
                status=503,
                param=param,
                code=f"{param}_fetchers_busy",
            ) from None
        try:
            future = self._pool.submit(fetch, *args)
        except BaseException:
            free.release()
            raise
        # the fetcher is free again when its thread is done, even if this request has gone
        future.add_done_callback(lambda _: _release_on(loop, free))
        # the fetch keeps its own deadline; this bound only keeps a client from waiting past it
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), timeout=self.limits.url_timeout + 1.0)
        except asyncio.TimeoutError:
            log.warning("%s %d refused: its fetch ran past serve.url_timeout", param, index)
            raise url_refused(index, kind) from None


def _release_on(loop: asyncio.AbstractEventLoop, slots: asyncio.Semaphore) -> None:
    with contextlib.suppress(RuntimeError):  # the loop has closed: the server has stopped
        loop.call_soon_threadsafe(slots.release)
