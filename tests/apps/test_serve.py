"""The HTTP server: the official openai client streamed and not, batching, every bad input, and the API key.

One server (the tiny twin on the CPU, a background uvicorn thread) serves the whole module.
"""

from __future__ import annotations

import base64
import io
import json
import os
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from PIL import Image

from pipeline.apps.generation import load_inference_bundle
from pipeline.apps.serve.app import ServeOptions, ServerThread, create_app
from tests.helpers import copy_twin, free_port

MODEL = "minicpm_v2_tiny"
MAX_TOKENS = 6
KEY = "test-key"


def png_data_url(color=(230, 200, 30), size=(112, 112), mode="RGB") -> str:
    buffer = io.BytesIO()
    Image.new(mode, size, color).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def options(**overrides) -> ServeOptions:
    values = dict(
        api_key=None,
        max_batch_size=8,
        max_new_tokens=MAX_TOKENS,
        max_image_bytes=200_000,
        url_timeout=0.5,
        allow_local_files=False,
    )
    return ServeOptions(**{**values, **overrides})


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_twin) -> Path:
    root = tmp_path_factory.mktemp("serve")
    copy_twin(tiny_twin, root / "tiny")
    Image.new("RGB", (112, 112), (30, 90, 200)).save(root / "blue.png")
    return root


@pytest.fixture(scope="module")
def loaded(workdir: Path):
    """Returns (bundle, family) of the twin."""
    return load_inference_bundle(str(workdir / "tiny"), device="cpu")


@pytest.fixture(scope="module")
def server(loaded):
    bundle, family = loaded
    app = create_app(bundle, options(), MODEL, family)
    running = ServerThread(app, "127.0.0.1", free_port())
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


def ask(client: openai.OpenAI, text: str, image: str | None = None, **kwargs):
    content = [{"type": "text", "text": text}]
    if image is not None:
        content.append({"type": "image_url", "image_url": {"url": image}})
    return client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": content}], max_tokens=MAX_TOKENS, **kwargs
    )


def post(server, body, headers=None) -> httpx.Response:
    if isinstance(body, (dict, list)):
        return httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=headers, timeout=60)
    return httpx.post(
        f"{server.url}/v1/chat/completions",
        content=body,
        headers={"content-type": "application/json", **(headers or {})},
        timeout=60,
    )


def user(content) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": MAX_TOKENS}


# ----- the openai client
def test_openai_client_gets_an_answer_with_usage(client):
    answer = ask(client, "What colour is the square?", png_data_url())
    choice = answer.choices[0]
    assert answer.object == "chat.completion" and answer.model == MODEL
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    usage = answer.usage
    assert usage.prompt_tokens > 16  # the image's 16 query tokens and their markers are in the prompt
    assert 1 <= usage.completion_tokens <= MAX_TOKENS
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_openai_client_stream_adds_up_to_the_whole_answer(client):
    whole = ask(client, "Describe the image.", png_data_url())
    chunks = list(
        ask(
            client, "Describe the image.", png_data_url(), stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content  # greedy: the same answer streamed or not
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_stream_is_server_sent_events_ending_with_done(server):
    with httpx.stream(
        "POST", f"{server.url}/v1/chat/completions", json={**user("Hello"), "stream": True}
    ) as reply:
        assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in reply.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and "delta" in c["choices"][0] for c in chunks)
    assert len({c["id"] for c in chunks}) == 1


def test_system_history_stop_max_tokens_and_seed(client):
    messages = [
        {"role": "system", "content": "Answer briefly."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is this?"},
                {"type": "image_url", "image_url": {"url": png_data_url()}},
            ],
        },
        {"role": "assistant", "content": "A square."},
        {"role": "user", "content": "What colour?"},
    ]
    full = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=MAX_TOKENS)
    text = full.choices[0].message.content
    assert full.usage.completion_tokens == MAX_TOKENS or full.choices[0].finish_reason == "stop"
    short = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2)
    assert short.usage.completion_tokens <= 2 and text.startswith(short.choices[0].message.content)
    assert len(text) >= 4, text
    stop = text[2:4]  # a stop string cuts the answer before it, streamed or not
    cut = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=MAX_TOKENS, stop=[stop])
    assert cut.choices[0].message.content == text[: text.find(stop)]
    assert cut.choices[0].finish_reason == "stop"
    chunks = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=MAX_TOKENS, stop=stop, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text[: text.find(stop)]
    sampled = [
        client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=MAX_TOKENS, temperature=1.5, seed=7
        )
        .choices[0]
        .message.content
        for _ in range(2)
    ]
    assert sampled[0] == sampled[1]  # a seed makes sampling repeatable


def test_models_and_health(server):
    listed = httpx.get(f"{server.url}/v1/models").json()
    assert [(m["id"], m["max_images"]) for m in listed["data"]] == [(MODEL, 1)]  # the page reads max_images
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"


def test_a_client_that_leaves_mid_stream_does_not_stop_the_server(server, client):
    with httpx.stream(
        "POST", f"{server.url}/v1/chat/completions", json={**user("Hi"), "stream": True}
    ) as reply:
        next(reply.iter_lines())
    assert ask(client, "Still there?").choices[0].message.content is not None


# ----- batching
def test_greedy_answer_is_the_same_alone_and_in_a_batch(server, client):
    """Eight different requests (some with images) sent at once are batched; each answer equals its lone one."""
    words = "red blue green cat dog house tree river count seven twelve square circle sum minus".split()
    questions = [" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(1 + i)) + "?" for i in range(8)]
    images = [png_data_url((40 * i, 255 - 30 * i, 90)) if i % 3 else None for i in range(8)]
    alone = [ask(client, q, im).choices[0].message.content for q, im in zip(questions, images, strict=True)]
    assert len(set(alone)) >= 4, alone  # the answers tell the requests apart
    batches = server.app.state.worker.batches
    batches.clear()
    with ThreadPoolExecutor(8) as pool:
        together = list(
            pool.map(lambda i: ask(client, questions[i], images[i]).choices[0].message.content, range(8))
        )
    assert max(batches) > 1, f"the requests were never batched: {batches}"
    assert together == alone


def test_32_concurrent_clients_each_get_their_own_answer(server, client):
    """32 clients at once, half streamed: each gets exactly the answer it gets alone.

    Each samples with its own seed, so every answer is distinct and a mix-up could not pass unnoticed.
    """
    questions = [f"Client {i} asks: what is {i} times {i + 3}?" for i in range(32)]

    def one(i: int, stream: bool) -> str:
        kwargs = {"temperature": 1.5, "seed": 1000 + i}
        if stream:
            chunks = ask(client, questions[i], stream=True, **kwargs)
            return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        return ask(client, questions[i], **kwargs).choices[0].message.content

    alone = [one(i, stream=False) for i in range(32)]
    assert len(set(alone)) >= 28, alone  # the answers tell the clients apart
    batches = server.app.state.worker.batches
    batches.clear()
    with ThreadPoolExecutor(32) as pool:
        together = list(pool.map(lambda i: one(i, stream=i % 2 == 1), range(32)))
    assert together == alone
    assert max(batches) > 1, f"the requests were never batched: {batches}"
    assert ask(client, questions[0]).choices[0].message.content is not None  # and it serves on


# ----- bad input: a 4xx JSON error naming the problem, and the server keeps serving
def _hanging_server() -> tuple[str, socket.socket]:
    """Returns the URL of a server that accepts connections and never answers."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    return f"http://127.0.0.1:{sock.getsockname()[1]}/cat.png", sock


def _bomb_data_url() -> str:
    buffer = io.BytesIO()
    Image.new("1", (9000, 9000), 0).save(buffer, format="PNG")  # 81 Mpx in a few kB
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _noise_png_url(side: int) -> str:
    """A PNG of random pixels: it does not compress, so it is about 3 * side**2 bytes."""
    buffer = io.BytesIO()
    Image.frombytes("RGB", (side, side), os.urandom(3 * side * side)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _truncated_png_url() -> str:
    payload = png_data_url(size=(64, 64)).split(",", 1)[1]
    return "data:image/png;base64," + payload[: (len(payload) // 2) // 4 * 4]


def image_request(url: str) -> dict:
    return user([{"type": "text", "text": "What is it?"}, {"type": "image_url", "image_url": {"url": url}}])


BAD_REQUESTS = {
    "malformed JSON": (b'{"model": "x", "messages": [', 400, "not valid JSON"),
    "not an object": ([1, 2], 400, "invalid request"),
    "messages missing": ({"model": MODEL}, 400, "messages: Field required"),
    "empty messages": ({"model": MODEL, "messages": []}, 400, "messages: List should have at least 1 item"),
    "wrong content type": (user(42), 400, "messages[0].content: must be a string or a list of parts"),
    "unknown part type": (user([{"type": "video"}]), 400, "does not match any of the expected tags"),
    "image part without url": (
        user([{"type": "image_url", "image_url": {"uri": "x"}}]),
        400,
        "messages[0].content[0].image_url.url: Field required",
    ),
    "wrong max_tokens type": (
        {**user("hi"), "max_tokens": "5"},
        400,
        "max_tokens: Input should be a valid integer",
    ),
    "wrong temperature type": ({**user("hi"), "temperature": "hot"}, 400, "temperature"),
    "unknown field": ({**user("hi"), "bogus": 1}, 400, "bogus: is not a known field"),
    "unknown role": (
        {"model": MODEL, "messages": [{"role": "robot", "content": "hi"}]},
        400,
        "messages[0].role",
    ),
    "ends with assistant": (
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
        },
        400,
        "the last message must be the user's",
    ),
    "max_tokens over the limit": ({**user("hi"), "max_tokens": MAX_TOKENS + 1}, 400, "serve.max_new_tokens"),
    "unknown model": ({**user("hi"), "model": "gpt-9"}, 404, "this server serves 'minicpm_v2_tiny'"),
    "base64 not an image": (
        image_request("data:image/png;base64," + base64.b64encode(b"hello, not a picture").decode()),
        400,
        "cannot decode image",
    ),
    "base64 invalid": (image_request("data:image/png;base64,@@@@"), 400, "base64 is invalid or truncated"),
    "truncated image": (image_request(_truncated_png_url()), 400, "cannot decode image"),
    "image over the cap": (image_request(_noise_png_url(400)), 413, "serve.max_image_bytes"),
    "decompression bomb": (image_request(_bomb_data_url()), 400, "decompression bomb"),
    "file URL": (image_request("file:///etc/hostname"), 403, "serve.allow_local_files=false"),
    "local path": (image_request("/etc/hostname"), 403, "does not read local files"),
    "other scheme": (image_request("ftp://example.org/cat.png"), 400, "unsupported URL scheme 'ftp'"),
    "two images": (
        user(
            [
                {"type": "text", "text": "Compare."},
                {"type": "image_url", "image_url": {"url": png_data_url()}},
                {"type": "image_url", "image_url": {"url": png_data_url((1, 2, 3))}},
            ]
        ),
        400,
        "one image per conversation; the messages hold 2 images",
    ),
    "prompt over max_length": (user("word " * 3000), 400, "too long"),
}


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_bad_input_gets_a_clear_4xx_and_the_server_goes_on(server, client, name):
    body, status, message = BAD_REQUESTS[name]
    reply = post(server, body)
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert message in error["message"], error
    assert ask(client, "Still there?").choices[0].message.content is not None


def test_an_image_url_that_cannot_be_fetched_gets_a_400_that_names_only_its_index(server, client):
    url, sock = _hanging_server()  # on loopback: refused by default (tests/apps/test_serve_urls.py has more)
    try:
        reply = post(server, image_request(url))
    finally:
        sock.close()
    assert reply.status_code == 400
    error = reply.json()["error"]
    assert (
        error["message"].startswith("image_url 0: the image could not be fetched")
        and url not in error["message"]
    )
    assert error["code"] == "image_url_unavailable"
    assert ask(client, "Still there?").choices[0].message.content is not None


def test_the_openai_client_raises_on_a_bad_request(client):
    with pytest.raises(openai.BadRequestError, match="one image per conversation"):
        client.chat.completions.create(
            model=MODEL,
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "a"},
                        {"type": "image_url", "image_url": {"url": png_data_url()}},
                    ],
                },
                {"role": "assistant", "content": "b"},
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "c"},
                        {"type": "image_url", "image_url": {"url": png_data_url()}},
                    ],
                },
            ],
        )


def test_local_files_are_read_when_allowed(loaded, workdir):
    bundle, family = loaded
    app = create_app(bundle, options(allow_local_files=True), MODEL, family)
    running = ServerThread(app, "127.0.0.1", free_port())
    try:
        for ref in (str(workdir / "blue.png"), (workdir / "blue.png").as_uri()):
            assert post(running, image_request(ref)).status_code == 200
        missing = post(running, image_request(str(workdir / "missing.png")))
        assert missing.status_code == 400 and "file not found" in missing.json()["error"]["message"]
    finally:
        running.stop()


# ----- the API key
def test_api_key_is_needed_on_every_route_but_health(loaded):
    bundle, family = loaded
    app = create_app(bundle, options(api_key=KEY), MODEL, family)
    running = ServerThread(app, "127.0.0.1", free_port())
    try:
        url = running.url
        assert httpx.get(f"{url}/health").status_code == 200
        for method, path in (
            ("GET", "/v1/models"),
            ("POST", "/v1/chat/completions"),
            ("GET", "/"),
            ("GET", "/nowhere"),
        ):
            for headers in ({}, {"Authorization": "Bearer wrong"}):
                reply = httpx.request(method, f"{url}{path}", json=user("hi"), headers=headers)
                assert reply.status_code == 401, (method, path, headers)
                assert "API key" in reply.json()["error"]["message"]
        assert "Basic" in httpx.get(f"{url}/").headers["www-authenticate"]  # a browser asks for it
        good = {"Authorization": f"Bearer {KEY}"}
        assert httpx.get(f"{url}/v1/models", headers=good).status_code == 200
        assert httpx.get(f"{url}/", auth=("anyone", KEY)).status_code == 200
        keyed = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
        assert ask(keyed, "hi").choices[0].message.content is not None
        with pytest.raises(openai.AuthenticationError):
            ask(openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0), "hi")
    finally:
        running.stop()
