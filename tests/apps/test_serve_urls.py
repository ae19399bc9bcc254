"""Image URLs in served requests: fetched only from public addresses unless the config allows more, checked
again on every redirect, cut at one deadline however slowly the bytes come, on threads of their own, and
refused with one answer whatever went wrong.

Everything listens on loopback: the "public" server of a test is a loopback one the test lets through.
"""

from __future__ import annotations

import io
import logging
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import pytest
from PIL import Image

from pipeline.apps.generation import load_inference_bundle
from pipeline.apps.serve import images as serve_images
from pipeline.apps.serve.app import ServeOptions, ServerThread, create_app
from pipeline.data import images
from tests.helpers import FileServer, Trickle, copy_twin, free_port

MODEL = "minicpm_v2_tiny"
URL_TIMEOUT = 1.5
UNAVAILABLE = (
    "image_url 0: the image could not be fetched (the request's images count from 0; this server fetches "
    "http(s) images from the hosts it allows, within serve.url_timeout and serve.max_image_bytes)"
)
LOG = "pipeline.apps.serve.images"


def _png(color: str = "red") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), color).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def loaded(tmp_path_factory, tiny_twin):
    """(bundle, family) of the twin."""
    root = tmp_path_factory.mktemp("serve-urls")
    return load_inference_bundle(str(copy_twin(tiny_twin, root / "tiny")), device="cpu")


@contextmanager
def serving(loaded, **overrides):
    """A server of the twin with these ServeOptions on a free loopback port."""
    bundle, family = loaded
    values = dict(
        api_key=None,
        max_batch_size=4,
        max_new_tokens=4,
        max_image_bytes=200_000,
        url_timeout=URL_TIMEOUT,
        allow_local_files=False,
    )
    running = ServerThread(
        create_app(bundle, ServeOptions(**{**values, **overrides}), MODEL, family), "127.0.0.1", free_port()
    )
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def public_only(loaded):
    """The defaults: public addresses only."""
    with serving(loaded) as running:
        yield running


@pytest.fixture(scope="module")
def trusted(loaded):
    """serve.allow_private_urls=true."""
    with serving(loaded, allow_private_urls=True) as running:
        yield running


@pytest.fixture(scope="module")
def listed(loaded):
    """serve.allowed_url_hosts=[127.0.0.1]."""
    with serving(loaded, allowed_url_hosts=("127.0.0.1",)) as running:
        yield running


@pytest.fixture
def files():
    served = FileServer(
        {"/red.png": _png(), "/page.html": b"<html>not an image</html>", "/huge.png": _huge_png()},
        redirects={"/here": "/red.png"},
    )
    yield served
    served.close()


def _huge_png() -> bytes:
    """A one-colour PNG of 30 Mpx (a few KB): over serve.max_image_pixels' default of 24 Mpx."""
    from PIL import Image

    out = io.BytesIO()
    Image.new("L", (6000, 5000)).save(out, format="PNG")
    return out.getvalue()


def user(content) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 4}


def image_request(url: str) -> dict:
    return user([{"type": "text", "text": "What is it?"}, {"type": "image_url", "image_url": {"url": url}}])


def post(server, body: dict) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)


def refused(reply: httpx.Response) -> bool:
    return reply.status_code == 400 and reply.json()["error"]["message"] == UNAVAILABLE


# ----- where URLs may point
def test_a_loopback_url_is_refused_by_default_before_any_connection(public_only, files, caplog):
    with caplog.at_level(logging.WARNING, logger=LOG):
        reply = post(public_only, image_request(f"{files.url}/red.png"))
    assert refused(reply), reply.text
    assert files.hits == []  # refused on the resolved address, not after a connection
    assert "127.0.0.1, not a public address" in caplog.text  # the reason is in the server's log only


def test_a_loopback_url_is_fetched_on_a_trusted_network_and_from_a_listed_host(trusted, listed, files):
    for server in (trusted, listed):
        reply = post(server, image_request(f"{files.url}/red.png"))
        assert reply.status_code == 200, reply.text
        assert reply.json()["usage"]["prompt_tokens"] > 16  # the image's query tokens are in the prompt
    assert files.hits == ["/red.png", "/red.png"]


def test_a_host_off_the_list_is_refused_even_at_a_public_address(loaded, files, monkeypatch):
    monkeypatch.setattr(images, "is_public_address", lambda address: True)
    with serving(loaded, allowed_url_hosts=("images.example.org",)) as server:
        reply = post(server, image_request(f"{files.url}/red.png"))
    assert refused(reply), reply.text
    assert files.hits == []


def test_a_redirect_from_a_listed_host_to_another_is_refused(listed, files, caplog):
    port = files.url.rsplit(":", 1)[1]
    files.redirects["/away"] = f"http://localhost:{port}/red.png"  # the same server, under a name not listed
    assert post(listed, image_request(f"{files.url}/here")).status_code == 200  # a redirect on the same host
    with caplog.at_level(logging.WARNING, logger=LOG):
        reply = post(listed, image_request(f"{files.url}/away"))
    assert refused(reply), reply.text
    assert files.hits == ["/here", "/red.png", "/away"]
    assert "the host localhost is not on the list of allowed hosts" in caplog.text


def test_a_redirect_from_a_public_address_to_a_private_one_is_refused(files, monkeypatch):
    # the file server stands for a public one; the redirect points into the private network
    monkeypatch.setattr(images, "is_public_address", lambda address: address == "127.0.0.1")
    files.redirects["/inside"] = "http://10.0.0.7/admin.png"
    public = images.UrlPolicy(allow_private=False)
    assert images.fetch_url(f"{files.url}/here", retries=0, policy=public) == _png()
    with pytest.raises(
        images.UrlRefusedError, match=r"http://10.0.0.7/admin.png: 10.0.0.7 resolves to 10.0.0.7"
    ):
        images.fetch_url(f"{files.url}/inside", retries=0, policy=public)
    files.redirects["/file"] = "file:///etc/passwd"
    with pytest.raises(images.UrlRefusedError, match="only http and https URLs are fetched, not 'file'"):
        images.fetch_url(f"{files.url}/file", retries=0, policy=public)


def test_a_name_that_resolves_to_a_private_address_is_refused(
    public_only, trusted, files, monkeypatch, caplog
):
    real = socket.getaddrinfo
    port = int(files.url.rsplit(":", 1)[1])

    def resolve(host, *args, **kwargs):
        if host == "images.example.org":
            return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", ("127.0.0.1", port))]
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    url = f"http://images.example.org:{port}/red.png"
    with caplog.at_level(logging.WARNING, logger=LOG):
        assert refused(post(public_only, image_request(url)))
    assert "images.example.org resolves to 127.0.0.1, not a public address" in caplog.text
    assert files.hits == []
    # allowed, it is fetched from the address checked, under its own name
    assert post(trusted, image_request(url)).status_code == 200
    assert files.hits == ["/red.png"] and files.hosts == [f"images.example.org:{port}"]


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "100.64.0.1", "0.0.0.0",
        "224.0.0.1", "255.255.255.255", "::1", "::", "fe80::1", "fc00::1", "ff02::1", "::ffff:127.0.0.1",
        "::ffff:10.0.0.1", "2002:7f00:1::", "2002:a00:1::", "64:ff9b::7f00:1", "::7f00:1", "not an address",
    ],
)  # fmt: skip
def test_addresses_that_are_not_public(address):
    assert not images.is_public_address(address)


@pytest.mark.parametrize(
    "address", ["8.8.8.8", "93.184.216.34", "2a00:1450:4001::1", "::ffff:8.8.8.8", "2002:808:808::"]
)
def test_public_addresses(address):
    assert images.is_public_address(address)


# ----- one deadline, on threads of their own
@pytest.mark.parametrize(
    "lead", [b"", b"HTTP/1.0 200 OK\r\nContent-Type: image/png\r\n\r\n"], ids=["headers", "body"]
)
def test_a_trickling_source_is_cut_at_the_deadline(trusted, lead, caplog):
    source = Trickle(lead, every=0.5)  # one byte every 0.5 s: each read gets bytes well within the timeout
    try:
        start = time.monotonic()
        with caplog.at_level(logging.WARNING, logger=LOG):
            reply = post(trusted, image_request(source.url))
        took = time.monotonic() - start
    finally:
        source.close()
    assert refused(reply), reply.text
    assert took < URL_TIMEOUT + 3, f"took {took:.1f} s, the deadline is {URL_TIMEOUT} s"  # it drips for ever
    assert f"took over {URL_TIMEOUT:g} s" in caplog.text


def test_text_requests_are_answered_while_url_fetches_trickle(loaded, monkeypatch):
    fetching = {"now": 0, "most": 0}
    lock = threading.Lock()
    fetch = serve_images.fetch_url_image

    def counted(*args, **kwargs):
        with lock:
            fetching["now"] += 1
            fetching["most"] = max(fetching["most"], fetching["now"])
        try:
            return fetch(*args, **kwargs)
        finally:
            with lock:
                fetching["now"] -= 1

    monkeypatch.setattr(serve_images, "fetch_url_image", counted)
    source = Trickle(every=0.5)
    try:
        with serving(loaded, allow_private_urls=True, url_timeout=3.0, url_fetch_workers=2) as server:
            with ThreadPoolExecutor(6) as pool:
                slow = [pool.submit(post, server, image_request(source.url)) for _ in range(6)]
                deadline = time.monotonic() + 20
                while source.open < 2 and time.monotonic() < deadline:
                    time.sleep(0.02)
                assert source.open == 2  # both fetchers hold a trickling source
                text = post(server, user("Hello"))
                assert text.status_code == 200 and text.json()["choices"][0]["message"]["content"] is not None
                assert not all(f.done() for f in slow)  # answered while the fetches still trickled
                replies = [f.result() for f in slow]
    finally:
        source.close()
    assert fetching["most"] == 2  # never more fetches at once than serve.url_fetch_workers
    for reply in replies:
        busy = reply.status_code == 503 and reply.json()["error"]["code"] == "image_url_fetchers_busy"
        assert refused(reply) or busy, reply.text


# ----- one answer
def test_refused_unreachable_silent_and_not_an_image_get_the_same_answer(public_only, trusted, files, caplog):
    silent = socket.socket()  # accepts connections, never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(4)
    closed = free_port()  # nothing listens: the connection is refused
    cases = {
        "not a public address": (public_only, f"{files.url}/red.png"),
        "Connection refused": (trusted, f"http://127.0.0.1:{closed}/red.png"),
        f"took over {URL_TIMEOUT:g} s": (trusted, f"http://127.0.0.1:{silent.getsockname()[1]}/red.png"),
        "cannot decode image": (trusted, f"{files.url}/page.html"),
        "HTTP 404": (trusted, f"{files.url}/gone.png"),
    }
    try:
        with caplog.at_level(logging.WARNING, logger=LOG):
            replies = {reason: post(server, image_request(url)) for reason, (server, url) in cases.items()}
    finally:
        silent.close()
    assert {reason: refused(reply) for reason, reply in replies.items()} == dict.fromkeys(cases, True)
    assert len({reply.text for reply in replies.values()}) == 1
    for reason in cases:
        assert reason in caplog.text


def test_a_fetched_image_over_the_pixel_limit_is_refused_from_its_header_naming_the_key(trusted, files):
    reply = post(trusted, image_request(f"{files.url}/huge.png"))
    assert reply.status_code == 400, reply.text
    assert "serve.max_image_pixels" in reply.json()["error"]["message"]
