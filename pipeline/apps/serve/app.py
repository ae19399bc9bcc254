"""The HTTP server: OpenAI's chat-completions API, /v1/models, /health and the web chat page, over the one
worker that owns the model (worker.py), for every family through its interface.

    bundle, family = load_inference_bundle(model_path, ckpt)
    app = create_app(bundle, ServeOptions(...), model_id="checkpoint-40", family=family)
    server = ServerThread(app, "127.0.0.1", 8000)   # or run_server(app, host, port) in the foreground

What differs between families comes from the family: its name in errors (Family.label), its images and
videos per conversation and where they go (capabilities; videos.py samples a video's frames as the family does), the prompt (Family.encode_chat within Family.prompt_limit),
whether requests decode together (capabilities.batches_requests).

Every refusal is a JSON body in OpenAI's shape, {"error": {"message", "type", "param", "code"}}, with a 4xx
status; checks that need no model (fields, roles, images, the prompt's length) run before a request waits
for the worker, and the limits of limits.py (the body, the requests held, the seed, the prompt's text, the
images' pixels) before the work they protect.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hmac
import json
import logging
import secrets
import signal
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import uvicorn
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from pipeline.families.base import Bundle, ContextLengthError, EncodedPrompt, Family, FamilyError, Video

from .images import ImageLimits, RequestImages
from .limits import (
    RETRY_AFTER_S,
    Admission,
    PixelBudget,
    RequestGuard,
    ServeLimits,
    check_prompt_text,
    check_seed,
)
from .schema import (
    ChatCompletionRequest,
    Conversation,
    RequestError,
    describe_validation_errors,
    error_body,
    stop_sequences,
    to_conversation,
)
from .videos import RequestVideos, VideoSource
from .worker import Decoding, Event, Job, Worker

log = logging.getLogger(__name__)

PAGE = Path(__file__).parent / "static" / "index.html"
OPEN_PATHS = ("/health",)  # answered without the API key
ROUTES = ("GET /", "GET /health", "GET /v1/models", "POST /v1/chat/completions")
ENCODING_AT_ONCE = 2  # requests encoded at the same time (each holds its images' pixels as tensors meanwhile)


@dataclass(frozen=True)
class ServeOptions:
    """What the server enforces: the `serve` config section less where it listens."""

    api_key: str | None
    max_batch_size: int
    max_new_tokens: int
    max_image_bytes: int
    url_timeout: float
    allow_local_files: bool
    system: str | None = None  # the system prompt of a request that sends none
    seed: int = 0
    limits: ServeLimits = ServeLimits()  # the body, the requests held, the prompt's text, the images' pixels
    allowed_url_hosts: tuple[str, ...] = ()  # image URL hosts (any public host when empty)
    allow_private_urls: bool = False  # image URLs at private addresses too (a trusted network)
    url_fetch_workers: int = 4  # image URLs fetched at once
    max_video_bytes: int = 64 * 1024 * 1024  # a video_url's bytes


def _error(
    message: str, status: int, param: str | None = None, code: str | None = None, **headers
) -> JSONResponse:
    return JSONResponse(error_body(message, status, param, code), status_code=status, headers=headers or None)


def _authorized(header: str | None, key: str | None) -> bool:
    """Returns True for `Bearer <key>`, or HTTP Basic with the key as password (what a browser sends).

    An empty or absent credential never passes, nor does any credential when the key itself is empty (the
    config refuses one; this holds for any caller of create_app). The comparison takes the same time
    wherever the credential first differs from the key.
    """
    if not header or not key:
        return False
    scheme, _, value = header.partition(" ")
    value = value.strip()
    if scheme.lower() == "bearer":
        given = value
    elif scheme.lower() == "basic":
        try:
            _, _, given = base64.b64decode(value, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
    else:
        return False
    return bool(given) and hmac.compare_digest(given.encode(), key.encode())


def encode_request(
    family: Family,
    bundle: Bundle,
    conversation: Conversation,
    system: str | None,
    images: list,
    max_new_tokens: int,
    videos: Sequence[Video] = (),
) -> EncodedPrompt:
    """Returns the generation prompt of a request's conversation (system prompt first when given) with its
    images and videos; raises RequestError when the family refuses it (its processor too: a ValueError, such
    as an image's shape), or when the prompt leaves no room for max_new_tokens (code
    context_length_exceeded)."""
    placement = family.capabilities.image_placement
    messages = conversation.chat_messages(system, placement)
    try:
        limit = family.prompt_limit(bundle, max_new_tokens)
        if videos:  # only the families that take videos (capabilities.max_videos) encode them
            return family.encode_chat(bundle, messages, images, limit, videos=videos)
        return family.encode_chat(bundle, messages, images, limit)
    except ContextLengthError as err:
        raise RequestError(str(err), param="messages", code="context_length_exceeded") from None
    except FamilyError as err:
        hint = " (each image_url part is an <image> tag where it stands)" if placement == "inline" else ""
        raise RequestError(f"messages: {err}{hint}", param="messages") from None
    except ValueError as err:  # what the family's processor refuses in this request (an image's shape)
        log.warning("a request the family cannot encode: %s", err)
        raise RequestError(
            f"messages: {family.label} cannot encode this request: {err}", param="messages"
        ) from None


def create_app(bundle: Bundle, options: ServeOptions, model_id: str, family: Family) -> FastAPI:
    """Returns the ASGI app serving `bundle` (a model of `family`) under the name `model_id`; its worker
    starts with the app."""
    max_images = family.max_images
    limits = ImageLimits(
        options.max_image_bytes,
        options.url_timeout,
        options.allow_local_files,
        tuple(options.allowed_url_hosts),
        options.allow_private_urls,
        options.url_fetch_workers,
    )
    request_images = RequestImages(limits)  # URLs on their own threads, so slow ones hold no one else
    max_videos = family.capabilities.max_videos
    request_videos = (
        RequestVideos(
            VideoSource(limits, options.max_video_bytes, family.video_frame_picker(bundle.processor)),
            request_images,
        )
        if max_videos
        else None
    )
    generating = options.max_batch_size if family.capabilities.batches_requests else 1
    admission = Admission(generating, options.limits.max_queue)
    encoding = asyncio.Semaphore(ENCODING_AT_ONCE)
    state: dict = {}
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state["worker"] = Worker(family, bundle, options.max_batch_size, seed=options.seed)
        app.state.worker = state["worker"]
        try:
            yield
        finally:
            state["worker"].close()

    app = FastAPI(title="pipeline serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    # added before the key check below, so it runs after it: a request without the key is refused unread
    app.add_middleware(RequestGuard, max_body_bytes=options.limits.max_body_bytes, admission=admission)

    @app.middleware("http")
    async def check_key(request: Request, call_next):
        if options.api_key is not None and request.url.path not in OPEN_PATHS:
            if not _authorized(request.headers.get("authorization"), options.api_key):
                if request.url.path.startswith("/v1/"):
                    return _error(
                        "missing or wrong API key: send the header 'Authorization: Bearer <serve.api_key>'",
                        401,
                        code="invalid_api_key",
                        **{"WWW-Authenticate": "Bearer"},
                    )
                # a browser asks for the key (as the password, any user name) and then sends it on each call
                return _error(
                    "this server needs its API key: sign in with any user name and the key as the password",
                    401,
                    code="invalid_api_key",
                    **{"WWW-Authenticate": 'Basic realm="pipeline serve"'},
                )
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = describe_validation_errors(list(exc.errors()), request.headers.get("content-type"))
        return _error(message, 400, param)

    @app.exception_handler(RequestError)
    async def refused_request(request: Request, exc: RequestError) -> JSONResponse:
        return _error(str(exc), exc.status, exc.param, exc.code)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = str(exc.detail)
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}; routes: {', '.join(ROUTES)}"
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
        return _error(message, exc.status_code)

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("request %s %s failed", request.method, request.url.path)
        return _error(f"internal error: {type(exc).__name__}: {exc}", 500)

    @app.get("/health")
    async def health():
        held = {"model": model_id, "requests": admission.active, "max_requests": admission.capacity}
        if admission.full:  # new chat requests get 429 now
            return JSONResponse(
                {"status": "saturated", **held}, status_code=503, headers={"Retry-After": str(RETRY_AFTER_S)}
            )
        return {"status": "ok", **held}

    @app.get("/v1/models")
    async def models() -> dict:
        return {
            "object": "list",
            "data": [
                {
                    "id": model_id,
                    "object": "model",
                    "created": created,
                    "owned_by": "pipeline",
                    "max_images": max_images,  # images per conversation (the page reads it)
                    "max_videos": max_videos,  # videos per conversation (0: the model takes none)
                }
            ],
        }

    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest):
        if body.model not in (None, model_id):
            raise RequestError(
                f"model {body.model!r} is not served here; this server serves {model_id!r} (GET /v1/models)",
                status=404,
                param="model",
                code="model_not_found",
            )
        conversation = to_conversation(body, max_images, family.label, max_videos)
        stop = stop_sequences(body)
        max_tokens = body.max_completion_tokens or body.max_tokens or options.max_new_tokens
        if max_tokens > options.max_new_tokens:
            raise RequestError(
                f"max_tokens={max_tokens} is over this server's limit serve.max_new_tokens="
                f"{options.max_new_tokens}",
                param="max_tokens",
            )
        temperature = body.temperature or 0.0  # omitted or 0: greedy
        decoding = (
            Decoding(do_sample=True, temperature=temperature, top_p=body.top_p or 1.0)
            if temperature > 0
            else Decoding()
        )
        check_seed(body.seed)
        system = conversation.system if conversation.system is not None else options.system
        try:
            token_limit = family.prompt_limit(bundle, max_tokens)
        except ContextLengthError as err:
            raise RequestError(str(err), param="max_tokens", code="context_length_exceeded") from None
        server_system = options.system if conversation.system is None else None  # the request's is in body
        check_prompt_text(body, server_system, token_limit, options.limits)
        budget = PixelBudget(options.limits)
        images = await request_images.load(conversation.image_urls, budget)
        videos = await request_videos.load(conversation.video_urls, budget) if conversation.video_urls else []
        async with encoding:
            prompt = await run_in_threadpool(
                encode_request, family, bundle, conversation, system, images, max_tokens, videos
            )
        loop = asyncio.get_running_loop()
        job = Job(prompt, decoding, max_tokens, stop, body.seed, loop, asyncio.Queue())
        state["worker"].submit(job)
        reply = _Reply(model_id, len(prompt.input_ids))
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(
                _stream(job, reply, include_usage),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        text = []
        try:
            while True:
                event: Event = await job.events.get()
                if event.error is not None:
                    return _error(event.error, event.status)
                text.append(event.delta)
                if event.finish_reason is not None:
                    return reply.completion("".join(text), event)
        finally:
            job.cancelled.set()

    return app


class _Reply:
    """Builds one request's answer in OpenAI's shapes (a whole completion, or its stream's chunks)."""

    def __init__(self, model_id: str, prompt_tokens: int) -> None:
        self.id = f"chatcmpl-{secrets.token_hex(12)}"
        self.created = int(time.time())
        self.model = model_id
        self.prompt_tokens = prompt_tokens

    def usage(self, completion_tokens: int) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": self.prompt_tokens + completion_tokens,
        }

    def completion(self, text: str, last: Event) -> dict:
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": None,
                    "finish_reason": last.finish_reason,
                }
            ],
            "usage": self.usage(last.completion_tokens),
        }

    def chunk(self, delta: dict, finish_reason: str | None = None, usage: dict | None = None) -> str:
        body = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": []
            if usage
            else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
        }
        if usage:
            body["usage"] = usage
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


async def _stream(job: Job, reply: _Reply, include_usage: bool) -> AsyncIterator[str]:
    """Yields the server-sent events of one answer as OpenAI sends them, ending with `data: [DONE]`."""
    try:
        yield reply.chunk({"role": "assistant", "content": ""})
        while True:
            event: Event = await job.events.get()
            if event.error is not None:
                yield f"data: {json.dumps(error_body(event.error, event.status))}\n\n"
                break
            if event.delta:
                yield reply.chunk({"content": event.delta})
            if event.finish_reason is not None:
                yield reply.chunk({}, event.finish_reason)
                if include_usage:
                    yield reply.chunk({}, usage=reply.usage(event.completion_tokens))
                break
        yield "data: [DONE]\n\n"
    finally:
        job.cancelled.set()  # a client that left stops costing generation steps


def _uvicorn_config(app: FastAPI, host: str, port: int, log_level: str) -> uvicorn.Config:
    # log_config=None: uvicorn's records go to the run's own logging (console and run.log) like every stage's
    return uvicorn.Config(
        app, host=host, port=port, log_level=log_level, access_log=log_level == "info", log_config=None
    )


class _Server(uvicorn.Server):
    """uvicorn's server, except that Ctrl-C or SIGTERM end it as its normal way to stop: after the graceful
    shutdown the signal is not raised again (the run is then recorded as finished, not as failed)."""

    stopped_by: str | None = None

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        captured = getattr(self, "_captured_signals", [])
        if captured:
            self.stopped_by = signal.Signals(captured[0]).name


def run_server(app: FastAPI, host: str, port: int) -> str | None:
    """Returns the signal that stopped the server (SIGINT for Ctrl-C, or SIGTERM) after serving host:port."""
    server = _Server(_uvicorn_config(app, host, port, "info"))
    server.run()
    return server.stopped_by


class ServerThread:
    """A server running on a background thread (tests, benchmarks); `stop()` ends it."""

    def __init__(self, app: FastAPI, host: str, port: int, log_level: str = "warning") -> None:
        self.app = app
        self.server = uvicorn.Server(_uvicorn_config(app, host, port, log_level))
        self.url = f"http://{host}:{port}"
        self.thread = threading.Thread(target=self.server.run, name="serve-http", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server on {self.url} did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
