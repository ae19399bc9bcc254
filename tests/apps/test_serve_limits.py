"""The server's limits before work (pipeline/apps/serve/limits.py), with the default settings, on MiniCPM-V-2's
tiny twin over loopback: the attack set refused with its 4xx while ordinary concurrent requests are answered
and the process holds less than MEMORY_BOUND more than before; each bad value refused alone with a message
naming its limit; a full server answering 429 with Retry-After; a request that fails in the worker failing
alone, in a batch too.

The server runs in this process (a uvicorn thread), so the process's RSS is the server's, plus the test's own
payloads, built before the baseline is taken.
"""

from __future__ import annotations

import base64
import copy
import io
import json
import select
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
import pytest
from PIL import Image

from pipeline.apps.generation import load_inference_bundle
from pipeline.apps.serve.app import ServerThread, create_app
from pipeline.apps.serve.limits import (
    CHAT_PATH,
    PIL_OPEN_LIMIT,
    PixelBudget,
    ServeLimits,
    check_image_header,
    check_prompt_text,
)
from pipeline.apps.serve.schema import ChatCompletionRequest, RequestError
from pipeline.apps.serve.worker import Decoding, Event, Job, Worker
from pipeline.families import get_family
from tests.apps.test_serve import options, png_data_url
from tests.helpers import copy_twin, free_port

MODEL = "minicpm_v2_tiny"
MAX_TOKENS = 4
MEMORY_BOUND = (
    1 << 30
)  # what one request may add to the server's memory with the default limits (ServeConfig)
LIMITS = ServeLimits()  # the defaults
TIMEOUT_S = 60  # a guard against a hang, not a measure


@pytest.fixture(scope="module")
def loaded(tmp_path_factory, tiny_twin):
    """Returns (bundle, family) of MiniCPM-V-2's twin (batches requests: the batched path)."""
    folder = copy_twin(tiny_twin, tmp_path_factory.mktemp("serve-limits") / "tiny")
    return load_inference_bundle(str(folder), device="cpu")


@pytest.fixture(scope="module")
def server(loaded):
    bundle, family = loaded
    running = ServerThread(
        create_app(bundle, options(max_new_tokens=MAX_TOKENS), MODEL, family), "127.0.0.1", free_port()
    )
    yield running
    running.stop()


def user(content, **fields) -> dict:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": MAX_TOKENS,
        **fields,
    }


def with_image(url: str, text: str = "What is it?") -> dict:
    return user([{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": url}}])


def one_colour_png(size: tuple[int, int], mode: str = "1") -> str:
    """A data URL of a PNG of one colour: many pixels in a few kB."""
    buffer = io.BytesIO()
    Image.new(mode, size, 0).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def post(server, body, content_type: str | None = "application/json") -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"content-type": content_type} if content_type else {}
    return httpx.post(f"{server.url}{CHAT_PATH}", content=content, headers=headers, timeout=TIMEOUT_S)


# ----- raw HTTP: a body the client sends only while the server has not answered
def raw_exchange(server, head: dict[str, str], body: Iterable[bytes] = ()) -> tuple[int, dict, bytes, int]:
    """Sends a POST's head, then `body`'s pieces as they are, stopping once the server answers or closes.
    Returns (status, headers, body of the answer, body bytes sent)."""
    host, port = server.url.removeprefix("http://").split(":")
    lines = [f"POST {CHAT_PATH} HTTP/1.1", f"Host: {host}:{port}"] + [f"{k}: {v}" for k, v in head.items()]
    sent = 0
    with socket.create_connection((host, int(port)), timeout=TIMEOUT_S) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        for piece in body:
            if select.select([sock], [], [], 0)[0]:
                break  # the server has answered (or closed): no more is sent
            try:
                sock.sendall(piece)
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(piece)
        answer = b""
        while True:
            try:
                data = sock.recv(65536)
            except ConnectionResetError:
                break
            if not data:
                break
            answer += data
            head_end = answer.find(b"\r\n\r\n")
            if head_end >= 0:
                headers = _headers(answer[:head_end])
                if len(answer) - head_end - 4 >= int(headers.get("content-length", 1 << 62)):
                    break
    head_end = answer.find(b"\r\n\r\n")
    assert head_end >= 0, f"no answer after {sent} bytes sent: {answer[:200]!r}"
    status = int(answer.split(b" ", 2)[1])
    return status, _headers(answer[:head_end]), answer[head_end + 4 :], sent


def _headers(head: bytes) -> dict[str, str]:
    pairs = [line.split(":", 1) for line in head.decode("latin-1").split("\r\n")[1:] if ":" in line]
    return {k.strip().lower(): v.strip() for k, v in pairs}


def chunked(total: int, piece: int = 1 << 20) -> Iterator[bytes]:
    """A chunked body (no Content-Length) of `total` bytes in chunks of `piece`: a JSON text that never ends."""
    start = b'{"messages": [{"role": "user", "content": "'
    yield f"{len(start):x}\r\n".encode() + start + b"\r\n"
    block = f"{piece:x}\r\n".encode() + b"a" * piece + b"\r\n"
    for _ in range(total // piece):
        yield block


def error_of(status: int, body: bytes) -> str:
    return json.loads(body)["error"]["message"]


# ----- memory
class PeakRSS:
    """Samples this process's resident memory on a thread; `peak` is the highest seen."""

    def __init__(self) -> None:
        self.process = psutil.Process()
        self.peak = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.005)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def ordinary(server, i: int) -> httpx.Response:
    """One of the ordinary requests: text, a small image, a sampled answer with its seed, streamed or not."""
    body = user(f"Client {i}: what is {i} plus {i}?")
    if i % 3 == 1:
        body = with_image(png_data_url((20 * i % 255, 90, 200)))
    if i % 2:
        body = {**body, "temperature": 1.2, "seed": 1000 + i}
    if i % 4 == 3:
        body = {**body, "stream": True}
    return post(server, body)


def answered(reply: httpx.Response) -> bool:
    """Returns True for a 200 with a whole answer (for a stream: chunks without an error, then [DONE])."""
    assert reply.status_code == 200, reply.text
    if not reply.headers["content-type"].startswith("text/event-stream"):
        return reply.json()["choices"][0]["finish_reason"] in ("stop", "length")
    lines = [line[6:] for line in reply.text.split("\n") if line.startswith("data: ")]
    return lines[-1] == "[DONE]" and all("error" not in json.loads(line) for line in lines[:-1])


def test_the_attack_set_is_refused_while_ordinary_requests_are_answered_in_bounded_memory(server):
    prompt_bytes = 30 * 1024 * 1024  # under the body cap: the text bound refuses it
    huge_prompt = json.dumps(user("word " * (prompt_bytes // 5))).encode()
    bomb = one_colour_png((8000, 8000))  # 64 Mpx in a few kB
    large = one_colour_png((4500, 4500), mode="RGB")  # 20 Mpx, within the limits: decoded
    attacks: dict[str, Callable[[], tuple[int, str]]] = {
        "Content-Length over the cap": lambda: _raw(server, {"Content-Length": str(10**10)}),
        "chunked body over the cap": lambda: _raw(
            server, {"Transfer-Encoding": "chunked", "Content-Type": "application/json"}, chunked(3 << 30)
        ),
        "huge prompt text": lambda: _http(post(server, huge_prompt)),
        "64 Mpx PNG": lambda: _http(post(server, with_image(bomb))),
        "seed over 64 bits": lambda: _http(post(server, user("Hi", temperature=1.0, seed=2**70))),
        "lone surrogate": lambda: _http(
            post(server, b'{"messages": [{"role": "user", "content": "a\\ud800"}]}')
        ),
        "not JSON": lambda: _http(post(server, b"messages=hello", "application/x-www-form-urlencoded")),
        # the server's own port on loopback: refused on its resolved address, before any connection
        "loopback image URL": lambda: _http(post(server, with_image(f"{server.url}/health"))),
        "link-local image URL": lambda: _http(
            post(server, with_image("http://169.254.169.254/latest/meta-data/x.png"))
        ),
    }
    expected = {
        "Content-Length over the cap": (413, "serve.max_body_bytes"),
        "chunked body over the cap": (413, "serve.max_body_bytes"),
        "huge prompt text": (400, "prompt positions"),
        "64 Mpx PNG": (400, "serve.max_image_pixels"),
        "seed over 64 bits": (400, "64-bit range"),
        "lone surrogate": (400, "lone surrogate"),
        "not JSON": (400, "Content-Type: application/json"),
        "loopback image URL": (400, "the image could not be fetched"),
        "link-local image URL": (400, "the image could not be fetched"),
    }
    for i in range(4):  # warm up: the first requests allocate what every later one reuses
        assert ordinary(server, i).status_code == 200
    assert post(server, with_image(large)).status_code == 200
    baseline = psutil.Process().memory_info().rss
    with PeakRSS() as rss, ThreadPoolExecutor(16) as pool:
        good = [pool.submit(ordinary, server, i) for i in range(24)]
        good.append(pool.submit(post, server, with_image(large)))
        refused = {name: pool.submit(attack) for name, attack in attacks.items()}
        for i, future in enumerate(good):
            assert answered(future.result()), i
        for name, future in refused.items():
            status, message = future.result()
            assert (status, expected[name][1] in message) == (expected[name][0], True), (
                name,
                status,
                message,
            )
    growth = rss.peak - baseline
    print(f"peak RSS growth under the attack set: {growth / 2**20:.0f} MiB")
    assert growth < MEMORY_BOUND, f"the server grew by {growth / 2**20:.0f} MiB"
    assert ordinary(server, 0).status_code == 200  # and it serves on


def _raw(server, head: dict[str, str], body: Iterable[bytes] = ()) -> tuple[int, str]:
    status, _, answer, sent = raw_exchange(server, head, body)
    assert sent <= 2 * LIMITS.max_body_bytes, f"the server read on to {sent} bytes"
    return status, error_of(status, answer)


def _http(reply: httpx.Response) -> tuple[int, str]:
    return reply.status_code, reply.json()["error"]["message"]


# ----- each bad value alone: its own status and a message naming the limit
LONG_TEXT = "x" * (2048 * 32 + 1)  # more bytes than the twin's 2048 positions x 32 can hold

BAD_VALUES = {
    "seed too large": (user("Hi", seed=2**64), 400, "seed=18446744073709551616 is outside the 64-bit range"),
    "seed too small": (user("Hi", seed=-(2**63) - 1), 400, "outside the 64-bit range"),
    "surrogate in a text part": (
        b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\udc00"}]}]}',
        400,
        "messages[0].content[0].text: the text holds a lone surrogate (U+DC00",
    ),
    "surrogate in the system message": (
        b'{"messages": [{"role": "system", "content": "\\ud800"}, {"role": "user", "content": "hi"}]}',
        400,
        "messages[0].content: the text holds a lone surrogate",
    ),
    "text longer than the positions hold": (user(LONG_TEXT), 400, "prompt positions"),
    "image over the pixel limit": (with_image(one_colour_png((6000, 6000))), 400, "serve.max_image_pixels"),
    "not an image": (
        with_image("data:image/png;base64," + base64.b64encode(b"no").decode()),
        400,
        "cannot decode",
    ),
    "JSON as text/plain": (json.dumps(user("Hi")).encode(), 400, "Content-Type: text/plain"),
    "a JSON list": (b"[1, 2]", 400, "a list, not a JSON object"),
    "an empty body": (b"", 400, "the request body is empty"),
}


@pytest.mark.parametrize("name", list(BAD_VALUES))
def test_a_bad_value_gets_its_own_4xx_naming_the_limit(server, name):
    body, status, message = BAD_VALUES[name]
    reply = post(server, body, "text/plain" if name == "JSON as text/plain" else "application/json")
    assert reply.status_code == status, reply.text
    assert message in reply.json()["error"]["message"], reply.json()
    assert post(server, user("Still there?")).status_code == 200


def test_a_surrogate_pair_is_a_character_not_an_error(server):
    reply = post(
        server, b'{"messages": [{"role": "user", "content": "smile \\ud83d\\ude00"}], "max_tokens": 2}'
    )
    assert reply.status_code == 200, reply.text


# ----- the requests held
def test_a_full_server_answers_429_with_retry_after_and_health_says_saturated(loaded):
    bundle, family = loaded
    limits = ServeLimits(max_queue=2)
    app = create_app(
        bundle, options(max_new_tokens=MAX_TOKENS, max_batch_size=1, limits=limits), MODEL, family
    )
    running = ServerThread(app, "127.0.0.1", free_port())
    host, port = running.url.removeprefix("http://").split(":")
    held = []
    try:
        assert httpx.get(f"{running.url}/health").json()["status"] == "ok"
        for _ in range(3):  # one generated and two waiting: requests whose body never ends
            sock = socket.create_connection((host, int(port)))
            sock.sendall(f"POST {CHAT_PATH} HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{{".encode())
            held.append(sock)
        health = _health_until(running, 503)
        assert health.status_code == 503 and health.json()["status"] == "saturated", health.text
        assert health.headers["retry-after"].isdigit()
        busy = post(running, user("Hi"))
        assert busy.status_code == 429 and busy.headers["retry-after"].isdigit(), busy.text
        assert "serve.max_queue=2" in busy.json()["error"]["message"]
        for sock in held:
            sock.close()
        held.clear()
        assert _health_until(running, 200).json()["requests"] == 0
        assert post(running, user("Hi")).status_code == 200
    finally:
        for sock in held:
            sock.close()
        running.stop()


def _health_until(server, status: int) -> httpx.Response:
    """Returns /health's answer once it has `status` (the held requests arrive, or leave, asynchronously)."""
    deadline = time.monotonic() + TIMEOUT_S
    while (health := httpx.get(f"{server.url}/health")).status_code != status and time.monotonic() < deadline:
        time.sleep(0.02)
    return health


# ----- the worker: a request that fails fails alone
def _job(prompt, seed: int | None = None, sample: bool = False) -> Job:
    loop = _LOOP
    decoding = Decoding(do_sample=True, temperature=1.0) if sample else Decoding()
    return Job(prompt, decoding, MAX_TOKENS, [], seed, loop, _Events())


class _Events:
    """Stands in for a request's asyncio queue: collects the worker's events."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.done = threading.Event()

    def put_nowait(self, event: Event) -> None:
        self.events.append(event)
        if event.error is not None or event.finish_reason is not None:
            self.done.set()


class _ImmediateLoop:
    def call_soon_threadsafe(self, fn, *args) -> None:
        fn(*args)


_LOOP = _ImmediateLoop()


def _answer_together(worker: Worker, jobs: list[Job]) -> list[Event]:
    """Queues `jobs` at once (so that they can share a batch) and returns each one's last event."""
    with worker._wake:  # reentrant: the worker takes none of them before all are queued
        for job in jobs:
            worker.submit(job)
    for job in jobs:
        assert job.events.done.wait(TIMEOUT_S)
    return [job.events.events[-1] for job in jobs]


def _prompts(loaded, n: int) -> list:
    bundle, family = loaded
    limit = family.prompt_limit(bundle, MAX_TOKENS)
    return [
        family.encode_chat(bundle, [{"role": "user", "content": f"Question {i}?"}], [], limit)
        for i in range(n)
    ]


def test_a_bad_seed_in_a_batch_fails_alone(loaded):
    bundle, family = loaded
    worker = Worker(family, bundle, max_batch_size=8)
    try:
        prompts = _prompts(loaded, 4)
        jobs = [_job(p, seed=7 + i, sample=True) for i, p in enumerate(prompts)]
        jobs[1].seed = 2**70  # past the route's check: the worker's own
        last = _answer_together(worker, jobs)
        assert worker.batches[0] == 4
        assert last[1].error is not None and last[1].status == 400 and "seed=" in last[1].error
        assert all(event.finish_reason in ("stop", "length") for i, event in enumerate(last) if i != 1), last
    finally:
        worker.close()


def test_a_bad_seed_fails_alone_where_requests_join_a_running_batch(family_twin):
    family = get_family("qwen2_5_vl")
    bundle = family.load_bundle(str(family_twin("qwen2_5_vl")))
    worker = Worker(family, bundle, max_batch_size=8)
    try:
        assert family.capabilities.continuous_batching and worker.max_batch_size == 8
        prompts = _prompts((bundle, family), 3)
        jobs = [_job(p, seed=seed, sample=True) for p, seed in zip(prompts, (3, -(2**70), 4), strict=True)]
        last = _answer_together(worker, jobs)
        assert worker.batches[0] == 3
        assert last[1].error is not None and last[1].status == 400 and "seed=" in last[1].error
        assert [event.finish_reason in ("stop", "length") for event in (last[0], last[2])] == [True, True], (
            last
        )
    finally:
        worker.close()


def test_a_batch_that_fails_is_answered_one_request_at_a_time(loaded):
    bundle, family = loaded
    worker = Worker(family, bundle, max_batch_size=8)
    try:
        prompts = _prompts(loaded, 3)
        broken = copy.copy(prompts[2])
        broken.input_ids = [10**7] * len(broken.input_ids)  # no such token: the batch's forward fails
        jobs = [_job(p) for p in (*prompts[:2], broken)]
        last = _answer_together(worker, jobs)
        assert worker.batches[0] == 3 and worker.batches[1:] == [1, 1, 1], worker.batches
        assert last[2].error is not None and last[2].status == 500
        assert [event.finish_reason in ("stop", "length") for event in last[:2]] == [True, True], last
    finally:
        worker.close()


# ----- the header check the URL fetcher calls too
def _png(size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("1", size, 0).save(buffer, format="PNG")
    return buffer.getvalue()


def test_pixels_are_counted_from_headers_per_image_and_per_request(tmp_path: Path):
    budget = PixelBudget(ServeLimits(max_image_pixels=1000, max_request_pixels=2500))
    assert check_image_header(_png((40, 25)), "a", budget) == (40, 25)
    path = tmp_path / "b.png"
    path.write_bytes(_png((30, 30)))
    assert check_image_header(path, "b", budget) == (30, 30)
    with pytest.raises(
        RequestError, match=r"50x50 = 2500 pixels, over this server's 1000-pixel limit per image"
    ):
        check_image_header(_png((50, 50)), "c", budget)
    with pytest.raises(RequestError, match=r"2700 pixels, over this server's 2500-pixel limit per request"):
        check_image_header(_png((20, 40)), "d", budget)
    assert budget.used == 1900
    with pytest.raises(RequestError, match=rf"more than {PIL_OPEN_LIMIT} pixels.*serve.max_image_pixels"):
        check_image_header(_png((20000, 10000)), "bomb", budget)  # PIL refuses it before its size is known


def test_the_prompt_text_is_bounded_by_the_positions_and_by_serve_max_prompt_bytes():
    def request(text: str) -> ChatCompletionRequest:
        return ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": text}]})

    limits = ServeLimits(max_prompt_bytes=1000)
    assert check_prompt_text(request("é" * 50), "ab", 10, limits) == 102  # UTF-8 bytes, the system's too
    assert check_prompt_text(request("x" * 320), None, 10, limits) == 320  # 10 tokens x 32 bytes may fit
    with pytest.raises(RequestError, match="321 bytes .UTF-8., over what the model's 10 prompt positions"):
        check_prompt_text(request("x" * 321), None, 10, limits)
    with pytest.raises(
        RequestError,
        match=r"1001 bytes .UTF-8., over this server's 1000-byte limit "
        r"\(serve.max_prompt_bytes\)",
    ):
        check_prompt_text(request("x" * 1001), None, 1000, limits)
