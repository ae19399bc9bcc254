"""What the server refuses before it does any work for a request, and how many requests it holds at once.

Every limit is checked from what is cheap to read, before the costly step it protects:

- the body: at most `serve.max_body_bytes`, refused from its Content-Length, and counted while it arrives
  (a chunked body has none), so no more than the cap is ever read (`RequestGuard`, 413);
- the requests held: those being generated plus at most `serve.max_queue` waiting; one more gets 429 with
  Retry-After before its body is read (`RequestGuard`, `Admission`; /health says "saturated");
- the seed: torch's 64-bit range (`check_seed`, 400 before the request is queued);
- the prompt's text: valid Unicode, and no longer in UTF-8 bytes than `serve.max_prompt_bytes` or the
  model's prompt positions times BYTES_PER_TOKEN, before the conversation is encoded (`check_prompt_text`);
- images: their pixels read from the header alone, at most `serve.max_image_pixels` each and
  `serve.max_request_pixels` for the request, before any image is decoded (`check_image_header`);
- videos: at most `serve.max_video_bytes`, and the frames the family samples counted with the images'
  pixels from the stream's header, before any frame is decoded (`PixelBudget.take_frames`).
"""

from __future__ import annotations

import io
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pipeline.config import ServeConfig

from .schema import ChatCompletionRequest, RequestError, TextPart, error_body

CHAT_PATH = "/v1/chat/completions"
RETRY_AFTER_S = 2  # what a refused client is told to wait: about one short generation
# No token of these families' tokenizers stands for more than 32 bytes of text (text averages 3 to 5 bytes
# a token), so a prompt of more UTF-8 bytes than its token limit times this cannot fit
BYTES_PER_TOKEN = 32
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # the seeds torch's generators take
# PIL refuses to open an image of more pixels than this (Image.MAX_IMAGE_PIXELS twice) before we see its size
PIL_OPEN_LIMIT = 2 * 89_478_485
_BUFFER_NAME = re.compile(r" <_io.BytesIO object at 0x[0-9a-f]+>")


@dataclass(frozen=True)
class ServeLimits:
    """The request limits of the `serve` config section; the defaults are ServeConfig's, where they are
    explained (pipeline/config.py)."""

    max_body_bytes: int = ServeConfig.max_body_bytes
    max_queue: int = ServeConfig.max_queue
    max_image_pixels: int = ServeConfig.max_image_pixels
    max_request_pixels: int = ServeConfig.max_request_pixels
    max_prompt_bytes: int = ServeConfig.max_prompt_bytes

    @classmethod
    def from_config(cls, serve: Any) -> ServeLimits:
        """Returns the limits of a `serve` config node."""
        return cls(
            max_body_bytes=int(serve.max_body_bytes),
            max_queue=int(serve.max_queue),
            max_image_pixels=int(serve.max_image_pixels),
            max_request_pixels=int(serve.max_request_pixels),
            max_prompt_bytes=int(serve.max_prompt_bytes),
        )


# ----- the body and the requests held
class Admission:
    """Counts the chat requests the server holds (admitted, not yet answered) against its capacity: the
    `generating` requests a batch generates together plus `max_queue` waiting (serve.max_queue)."""

    def __init__(self, generating: int, max_queue: int) -> None:
        self.generating = generating
        self.max_queue = max_queue
        self.capacity = generating + max_queue
        self.active = 0

    @property
    def full(self) -> bool:
        return self.active >= self.capacity


def _json_error(message: str, status: int, code: str | None = None, **headers: str) -> JSONResponse:
    return JSONResponse(error_body(message, status, code=code), status_code=status, headers=headers or None)


class _BodyTooLarge(Exception):
    """Raised from `receive` once the body passes the cap (whoever reads it gets no more of it)."""


class RequestGuard:
    """ASGI middleware: refuses a body over `max_body_bytes` (413, on any route) and a chat request beyond
    what `admission` holds (429 with Retry-After), without reading more of the body than the cap."""

    def __init__(self, app: ASGIApp, max_body_bytes: int, admission: Admission) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.admission = admission

    def _too_large(self, size: str) -> JSONResponse:
        # Connection: close: the rest of the body is not read, so the connection cannot carry another request
        return _json_error(
            f"the request body is {size}, over this server's {self.max_body_bytes}-byte limit "
            "(serve.max_body_bytes)",
            413,
            code="request_too_large",
            Connection="close",
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_body_bytes:
            await self._too_large(f"{declared} bytes")(scope, receive, send)
            return
        gated = scope["method"] == "POST" and scope["path"] == CHAT_PATH
        if gated and self.admission.full:
            response = _json_error(
                f"the server is busy: it holds {self.admission.active} requests, the {self.admission.generating} "
                f"it generates at once and serve.max_queue={self.admission.max_queue} waiting; retry in "
                f"{RETRY_AFTER_S} s",
                429,
                code="server_busy",
                **{"Retry-After": str(RETRY_AFTER_S)},
            )
            await response(scope, receive, send)
            return
        if gated:
            self.admission.active += 1
        try:
            await self._limited(scope, receive, send)
        finally:
            if gated:
                self.admission.active -= 1

    async def _limited(self, scope: Scope, receive: Receive, send: Send) -> None:
        received = 0
        over = False
        started = False

        async def counted_receive() -> Message:
            nonlocal received, over
            if over:
                raise _BodyTooLarge
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    over = True
                    raise _BodyTooLarge
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if over:
                return  # what the app answers to the body it could not read; the 413 goes instead
            started = True
            await send(message)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except _BodyTooLarge:
            if started:
                raise
        if over and not started:
            await self._too_large(f"over {self.max_body_bytes} bytes")(scope, receive, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            return int(value) if value.isdigit() else None
    return None


# ----- the request's values
def check_seed(seed: int | None) -> None:
    """Raises RequestError (400) when a request's seed is outside what torch's generators take."""
    if seed is not None and not SEED_MIN <= seed <= SEED_MAX:
        raise RequestError(
            f"seed={seed} is outside the 64-bit range seeds take: -2**63 to 2**64-1", param="seed"
        )


def _utf8_size(text: str, where: str) -> int:
    try:
        return len(text.encode("utf-8"))
    except UnicodeEncodeError as err:
        code = ord(text[err.start])
        raise RequestError(
            f"{where}: the text holds a lone surrogate (U+{code:04X} at character {err.start}), which is not "
            "valid Unicode: send UTF-8 text (a character outside the BMP is a \\ud83d\\ude00-style pair in "
            "JSON, never half of one)",
            param=where,
        ) from None


def check_prompt_text(
    request: ChatCompletionRequest, system: str | None, token_limit: int, limits: ServeLimits
) -> int:
    """Returns the UTF-8 size of the request's text (and of the server's system prompt when the request sends
    none); raises RequestError (400) for text that is not valid Unicode, or that is longer than
    `limits.max_prompt_bytes` or than `token_limit` (the model's prompt positions) tokens could hold, before
    anything is encoded."""
    size = _utf8_size(system, "the server's system prompt (dataset.system)") if system else 0
    for i, message in enumerate(request.messages):
        where = f"messages[{i}].content"
        if isinstance(message.content, str):
            size += _utf8_size(message.content, where)
            continue
        for j, part in enumerate(message.content):
            if isinstance(part, TextPart):
                size += _utf8_size(part.text, f"{where}[{j}].text")
    by_positions = token_limit * BYTES_PER_TOKEN
    if size > min(by_positions, limits.max_prompt_bytes):
        if by_positions <= limits.max_prompt_bytes:
            limit = (
                f"what the model's {token_limit} prompt positions (its positions less max_tokens) can hold: "
                f"{by_positions} bytes at the most"
            )
        else:
            limit = f"this server's {limits.max_prompt_bytes}-byte limit (serve.max_prompt_bytes)"
        raise RequestError(
            f"messages: the conversation's text is {size} bytes (UTF-8), over {limit}; the conversation is "
            "too long: shorten it or start a new one",
            param="messages",
            code="context_length_exceeded",
        )
    return size


# ----- images
class PixelBudget:
    """The pixels a request's images may take, counted from their headers: `limits.max_image_pixels` each
    and `limits.max_request_pixels` in all."""

    def __init__(self, limits: ServeLimits) -> None:
        self.per_image = limits.max_image_pixels
        self.per_request = limits.max_request_pixels
        self.used = 0

    def take(self, width: int, height: int, name: str) -> None:
        """Counts an image of width x height; raises RequestError (400) when it is over either limit."""
        pixels = width * height
        if pixels > self.per_image:
            raise RequestError(
                f"image_url: {name} is {width}x{height} = {pixels} pixels, over this server's "
                f"{self.per_image}-pixel limit per image (serve.max_image_pixels); refused before decoding as "
                "a possible decompression bomb",
                param="image_url",
            )
        if self.used + pixels > self.per_request:
            raise RequestError(
                f"image_url: with {name} ({width}x{height}) the request's images hold {self.used + pixels} "
                f"pixels, over this server's {self.per_request}-pixel limit per request "
                "(serve.max_request_pixels); send fewer or smaller images",
                param="image_url",
            )
        self.used += pixels

    def take_frames(self, width: int, height: int, frames: int, name: str) -> None:
        """Counts a video's `frames` sampled frames of width x height (each held decoded while the prompt is
        encoded) with the request's images; raises RequestError (400) when a frame is over the per-image
        limit or all of them take the request over its limit."""
        pixels = width * height
        if pixels > self.per_image:
            raise RequestError(
                f"video_url: {name} has frames of {width}x{height} = {pixels} pixels, over this server's "
                f"{self.per_image}-pixel limit per image (serve.max_image_pixels)",
                param="video_url",
            )
        if self.used + frames * pixels > self.per_request:
            raise RequestError(
                f"video_url: {name}'s {frames} sampled frames of {width}x{height} take the request's images and "
                f"frames to {self.used + frames * pixels} pixels, over this server's {self.per_request}-pixel "
                "limit per request (serve.max_request_pixels); send a shorter or smaller video",
                param="video_url",
            )
        self.used += frames * pixels


def check_image_header(source: bytes | Path, name: str, budget: PixelBudget) -> tuple[int, int]:
    """Returns (width, height) of an image read from its header alone (nothing is decoded), counted against
    the request's `budget`; raises RequestError (400) when it is over a pixel limit or is no image PIL
    recognises. `name` says which image in the errors (a URL, "the image/png data URL")."""
    try:
        with warnings.catch_warnings():
            # the budget's limits replace PIL's own bomb warning
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as probe:
                width, height = probe.size
    except Image.DecompressionBombError:
        raise RequestError(
            f"image_url: {name} has more than {PIL_OPEN_LIMIT} pixels, over this server's "
            f"{budget.per_image}-pixel limit per image (serve.max_image_pixels); refused before decoding as a "
            "possible decompression bomb",
            param="image_url",
        ) from None
    except Exception as exc:  # PIL reports what it cannot read through many exception types
        reason = _BUFFER_NAME.sub(
            "", str(exc)
        )  # PIL names a buffer by its memory address: no help to a client
        raise RequestError(
            f"image_url: {name}: cannot decode image ({type(exc).__name__}: {reason})", param="image_url"
        ) from None
    budget.take(width, height, name)
    return width, height
