"""Videos in served requests (`{"type": "video_url", ...}` parts, as vLLM's server takes them), on Qwen2.5-VL's
tiny twin: the answer equals the family's own greedy generation of the same sampled frames, from a data URL, an
http(s) URL the config allows and a local file where allowed; the byte cap, the pixel budget of the sampled
frames, a body that is no video, a public-only server and a family without video are refused, naming the key.
"""

from __future__ import annotations

import base64
from pathlib import Path

import httpx
import pytest

from pipeline.apps.serve.app import ServerThread, create_app
from pipeline.data.images import ImageFiles
from pipeline.families import get_family
from pipeline.families.base import load_video
from pipeline.stages import serve
from tests.apps.test_serve import options
from tests.helpers import FileServer, compose_config, free_port, run_stage, write_test_video

MODEL = "qwen2_5_vl_tiny"
MAX_TOKENS = 8
QUESTION = "What happens?"
UNAVAILABLE = (
    "video_url 0: the video could not be fetched (the request's videos count from 0; this server fetches "
    "http(s) videos from the hosts it allows, within serve.url_timeout and serve.max_video_bytes)"
)


@pytest.fixture(scope="module")
def family():
    return get_family("qwen2_5_vl")


@pytest.fixture(scope="module")
def bundle(family, varied_twin):
    return family.load_bundle(str(varied_twin(family.name)))


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("serve-videos")
    return {
        "a": write_test_video(root / "a.mp4", frames=8, seed=0),
        "b": write_test_video(root / "b.mp4", frames=12, seed=5),
    }


def serving(family, bundle, **overrides) -> ServerThread:
    return ServerThread(
        create_app(bundle, options(max_new_tokens=MAX_TOKENS, **overrides), MODEL, family),
        "127.0.0.1",
        free_port(),
    )


@pytest.fixture(scope="module")
def server(family, bundle):
    running = serving(family, bundle, allow_private_urls=True)
    yield running
    running.stop()


def data_url(path: Path) -> str:
    return "data:video/mp4;base64," + base64.b64encode(path.read_bytes()).decode()


def ask(server, url: str, model: str = MODEL) -> httpx.Response:
    content = [{"type": "text", "text": QUESTION}, {"type": "video_url", "video_url": {"url": url}}]
    body = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": MAX_TOKENS}
    return httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=120)


def reference(family, bundle, clip: Path, tmp_path: Path) -> tuple[str, int]:
    """The family's own greedy answer to the question with the video's sampled frames after it, and the
    prompt's length."""
    video = load_video(str(clip), ImageFiles(tmp_path / "cache"), family.video_frame_picker(bundle.processor))
    messages = [{"role": "user", "content": QUESTION + "<video>"}]
    sample = family.encode(bundle.processor, messages, [], generation=True, videos=[video])
    batch = family.collate_for_generation(bundle.processor, [sample])
    (answer,) = family.generate(bundle.model, bundle.processor, batch, max_new_tokens=MAX_TOKENS)
    return answer, len(sample)


def test_a_video_answer_equals_the_familys_own_generation_from_a_data_url_and_a_url(
    family, bundle, server, clips, tmp_path
):
    expected, prompt = reference(family, bundle, clips["a"], tmp_path)
    reply = ask(server, data_url(clips["a"]))
    assert reply.status_code == 200, reply.text
    answer = reply.json()
    assert answer["choices"][0]["message"]["content"] == expected and expected.strip()
    assert answer["usage"]["prompt_tokens"] == prompt
    files = FileServer({"/a.mp4": clips["a"].read_bytes(), "/page.html": b"<html>no video</html>"})
    try:
        fetched = ask(server, f"{files.url}/a.mp4")
        assert fetched.status_code == 200, fetched.text
        assert fetched.json()["choices"][0]["message"]["content"] == expected
        # a body that is no video gets the one answer every unusable URL gets
        refused = ask(server, f"{files.url}/page.html")
    finally:
        files.close()
    assert refused.status_code == 400, refused.text
    assert refused.json()["error"]["message"] == UNAVAILABLE
    # a data URL that is no video: named as such, without the server's temporary file
    garbage = ask(server, "data:video/mp4;base64," + base64.b64encode(b"not a video at all").decode())
    message = garbage.json()["error"]["message"]
    assert message.startswith("video_url: the video/mp4 data URL: not a readable video"), message
    assert "/tmp" not in message and garbage.json()["error"]["param"] == "video_url"
    # the frames are read: another video gives another answer
    other = ask(server, data_url(clips["b"]))
    assert other.json()["choices"][0]["message"]["content"] != expected
    listed = httpx.get(f"{server.url}/v1/models").json()["data"][0]
    assert listed["max_videos"] == family.capabilities.max_videos > 0


def test_the_limits_name_their_keys(family, bundle, clips, tmp_path):
    """serve.max_video_bytes (a data URL refused from its length), serve.max_request_pixels over the sampled
    frames, a public-only server's refusal of a loopback URL (one answer), a local file refused unless
    allowed, and a data URL that is not a video."""
    size = clips["a"].stat().st_size
    small = serving(family, bundle, max_video_bytes=size // 2)
    files = FileServer({"/a.mp4": clips["a"].read_bytes()})
    try:
        reply = ask(small, data_url(clips["a"]))
        assert reply.status_code == 413 and "(serve.max_video_bytes)" in reply.json()["error"]["message"]
        fetched = ask(small, f"{files.url}/a.mp4")  # public addresses only: loopback is refused
        assert fetched.status_code == 400
        assert fetched.json()["error"]["message"] == UNAVAILABLE
        local = ask(small, str(clips["a"]))
        assert (
            local.status_code == 403 and "serve.allow_local_files=false" in local.json()["error"]["message"]
        )
        wrong = ask(small, "data:image/png;base64,AAAA")
        assert wrong.json()["error"]["message"] == "video_url: a data URL of type 'image/png' is not a video"
    finally:
        small.stop()
        files.close()
    limits = options().limits.__class__(max_request_pixels=3 * 64 * 48)
    few = serving(family, bundle, limits=limits, allow_local_files=True)
    try:
        expected, _ = reference(family, bundle, clips["a"], tmp_path)
        over = ask(few, str(clips["a"]))
        assert over.status_code == 400, over.text
        assert "sampled frames of 64x48" in over.json()["error"]["message"]
        assert "(serve.max_request_pixels)" in over.json()["error"]["message"]
    finally:
        few.stop()
    local_ok = serving(family, bundle, allow_local_files=True)
    try:
        assert ask(local_ok, str(clips["a"])).json()["choices"][0]["message"]["content"] == expected
    finally:
        local_ok.stop()


def test_a_family_without_video_refuses_one_naming_the_limit(tiny_twin, clips):
    v2 = get_family("minicpm_v2")
    bundle = v2.load_bundle(str(tiny_twin))
    running = ServerThread(
        create_app(bundle, options(max_new_tokens=4), "minicpm_v2_tiny", v2), "127.0.0.1", free_port()
    )
    try:
        reply = ask(running, data_url(clips["a"]), model="minicpm_v2_tiny")
        listed = httpx.get(f"{running.url}/v1/models").json()["data"][0]
    finally:
        running.stop()
    assert reply.status_code == 400
    error = reply.json()["error"]
    assert error["code"] == "too_many_videos"
    assert error["message"] == (
        "MiniCPM-V-2 (model.family=minicpm_v2) takes no video per conversation; the messages hold 1 video(s)"
    )
    assert listed["max_videos"] == 0


def test_the_serve_stage_serves_videos_within_its_byte_cap(varied_twin, clips, monkeypatch, tmp_path):
    """Through the serve stage: a video within serve.max_video_bytes is answered, one over it refused."""
    size = clips["a"].stat().st_size
    cfg = compose_config(
        [
            "model=qwen2_5_vl_tiny",
            f"model.path={varied_twin('qwen2_5_vl')}",
            "stages=[serve]",
            "ckpt=base",
            "device=cpu",
            f"serve.port={free_port()}",
            f"serve.max_video_bytes={(size + clips['b'].stat().st_size) // 2}",
            f"serve.max_new_tokens={MAX_TOKENS}",
        ]
    )
    small, large = sorted(clips.values(), key=lambda path: path.stat().st_size)
    assert small.stat().st_size < large.stat().st_size
    seen = {}

    def serve_once(app, host, port):  # two requests instead of serving until Ctrl-C
        running = ServerThread(app, host, port)
        try:
            seen["within"] = ask(running, data_url(small))
            seen["over"] = ask(running, data_url(large))
        finally:
            running.stop()

    monkeypatch.setattr("pipeline.apps.serve.app.run_server", serve_once)
    run_stage(serve, cfg, tmp_path / "run", ckpt=None)
    assert seen["within"].status_code == 200, seen["within"].text
    assert seen["within"].json()["usage"]["completion_tokens"] > 0
    assert seen["over"].status_code == 413 and "(serve.max_video_bytes)" in seen["over"].text


def test_the_page_sends_a_video_and_learns_the_video_limit(server, clips):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from tests.apps.test_serve_page import ask_on_page, headless_chrome

    browser = headless_chrome()
    limit = get_family("qwen2_5_vl").capabilities.max_videos
    try:
        browser.get(server.url + "/")
        WebDriverWait(browser, 10).until(lambda d: d.find_element(By.ID, "model").text == MODEL)
        assert browser.execute_script("return maxVideos") == limit
        assert browser.find_element(By.ID, "file").get_attribute("accept") == "image/*,video/*"
        browser.find_element(By.ID, "file").send_keys(str(clips["a"]))
        WebDriverWait(browser, 10).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#thumbs video"))
        shown = ask_on_page(browser, QUESTION)
        sent = browser.find_element(By.CSS_SELECTOR, ".msg.user video").get_attribute("src")
        assert sent == data_url(clips["a"])
        # the page puts the attachments before the question
        content = [{"type": "video_url", "video_url": {"url": sent}}, {"type": "text", "text": QUESTION}]
        body = {"model": MODEL, "messages": [{"role": "user", "content": content}]}
        reply = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=120)
        expected = reply.json()["choices"][0]["message"]["content"]
        assert shown == expected.strip() and shown
        # one sent: three more fit the conversation, the next one is refused naming the limit
        browser.find_element(By.ID, "file").send_keys("\n".join([str(clips["b"])] * (limit - 1)))
        WebDriverWait(browser, 10).until(
            lambda d: len(d.find_elements(By.CSS_SELECTOR, "#thumbs video")) == limit - 1
        )
        browser.find_element(By.ID, "file").send_keys(str(clips["b"]))
        error = WebDriverWait(browser, 10).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.error"))
        assert f"at most {limit} videos per conversation" in error[0].text
    finally:
        browser.quit()


@pytest.mark.parametrize("name", ["qwen3_vl", "minicpm_v4_6"])
def test_every_video_family_serves_the_frames_it_samples(name, varied_twin, clips, tmp_path):
    """The other families that take videos answer a video request with their own greedy generation of the
    same sampled frames (each its own video prompt: Qwen3-VL's timestamps, MiniCPM-V 4.6's frames)."""
    other = get_family(name)
    loaded = other.load_bundle(str(varied_twin(name)))
    expected, prompt = reference(other, loaded, clips["a"], tmp_path)
    running = ServerThread(
        create_app(loaded, options(max_new_tokens=MAX_TOKENS), f"{name}_tiny", other),
        "127.0.0.1",
        free_port(),
    )
    try:
        reply = ask(running, data_url(clips["a"]), model=f"{name}_tiny")
    finally:
        running.stop()
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["message"]["content"] == expected and expected.strip()
    assert reply.json()["usage"]["prompt_tokens"] == prompt
