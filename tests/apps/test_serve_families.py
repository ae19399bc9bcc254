"""The server for a transformers-native family (Qwen2.5-VL's tiny twin on the CPU): answers equal to the
family's own greedy generation, streamed or not, max_tokens and stop strings, several images placed where they
stand, the family's image limit, and the serve stage running it.

The twin's weights are redrawn larger once (its own small initialisation answers "\\n" to everything), so an
answer depends on the prompt and on each image.
"""

from __future__ import annotations

import base64
import io
import logging

import httpx
import numpy as np
import openai
import pytest
import torch
from PIL import Image

from pipeline.apps.serve.app import ServerThread, create_app
from pipeline.config import validate
from pipeline.families import get_family
from pipeline.stages import serve
from tests.apps.test_serve import options
from tests.helpers import compose_config, free_port, run_stage

MODEL = "qwen2_5_vl_tiny"
MAX_TOKENS = 10
LIMIT = 16  # Qwen2.5-VL's images per conversation


def picture(seed: int) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 255, (40, 56, 3), dtype=np.uint8))


def data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def image_part(seed: int) -> dict:
    return image_part_of(picture(seed))


def image_part_of(image: Image.Image) -> dict:
    return {"type": "image_url", "image_url": {"url": data_url(image)}}


def text(value: str) -> dict:
    return {"type": "text", "text": value}


@pytest.fixture(scope="module")
def family():
    return get_family("qwen2_5_vl")


@pytest.fixture(scope="module")
def bundle(family, varied_twin):
    return family.load_bundle(str(varied_twin(family.name)))


@pytest.fixture(scope="module")
def server(family, bundle):
    running = ServerThread(
        create_app(bundle, options(max_new_tokens=MAX_TOKENS), MODEL, family), "127.0.0.1", free_port()
    )
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


def reference(family, bundle, messages, images, max_new_tokens=MAX_TOKENS) -> tuple[str, int, int]:
    """Returns the family's own greedy answer to `messages` (tagged), its token count (the end token left
    out) and the prompt's length."""
    sample = family.encode(bundle.processor, messages, images, generation=True)
    batch = family.collate_for_generation(bundle.processor, [sample])
    (answer,) = family.generate(bundle.model, bundle.processor, batch, max_new_tokens=max_new_tokens)
    with torch.no_grad():
        ids = bundle.model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)[0, len(sample) :]
    eos = bundle.core.generation_config.eos_token_id
    tokens = ids.tolist()
    tokens = tokens[: tokens.index(eos)] if eos in tokens else tokens
    return answer, len(tokens), len(sample)


def chat(client, messages, **kwargs):
    return client.chat.completions.create(
        model=MODEL, messages=messages, **{"max_tokens": MAX_TOKENS, **kwargs}
    )


CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": [text("What is in the picture?"), image_part(0)]},
    {"role": "assistant", "content": "A square."},
    {"role": "user", "content": "And its colour?"},
]
TAGGED = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is in the picture?<image>"},
    {"role": "assistant", "content": "A square."},
    {"role": "user", "content": "And its colour?"},
]


def test_an_answer_equals_the_familys_own_greedy_generation(family, bundle, client):
    expected, tokens, prompt = reference(family, bundle, TAGGED, [picture(0)])
    answer = chat(client, CONVERSATION)
    assert answer.choices[0].message.content == expected and expected.strip()
    assert answer.model == MODEL and answer.choices[0].finish_reason == (
        "length" if tokens == MAX_TOKENS else "stop"
    )
    assert answer.usage.prompt_tokens == prompt
    assert answer.usage.completion_tokens == tokens
    assert answer.usage.total_tokens == prompt + tokens
    # the image is read: another one gives another answer
    other = [CONVERSATION[0], {"role": "user", "content": [text("What is in the picture?"), image_part(1)]}]
    assert chat(client, other + CONVERSATION[2:]).choices[0].message.content != expected


def test_stream_deltas_add_up_to_the_whole_answer(client):
    whole = chat(client, CONVERSATION)
    chunks = list(chat(client, CONVERSATION, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert sum(1 for d in deltas if d) > 1  # streamed piece by piece, not in one go
    assert "".join(deltas) == whole.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_max_tokens_ends_with_length_and_a_stop_string_cuts_the_answer(family, bundle, client):
    full, tokens, _ = reference(family, bundle, TAGGED, [picture(0)])
    assert tokens > 3, "the twin's answer must be long enough to cut"
    short, _, _ = reference(family, bundle, TAGGED, [picture(0)], max_new_tokens=3)
    cut = chat(client, CONVERSATION, max_tokens=3)
    assert cut.choices[0].finish_reason == "length" and cut.usage.completion_tokens == 3
    assert cut.choices[0].message.content == short
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    stopped = chat(client, CONVERSATION, stop=[stop])
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].message.content == full[: full.index(stop)]
    streamed = list(chat(client, CONVERSATION, stop=[stop], stream=True))
    assert (
        "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == full[: full.index(stop)]
    )


def test_several_images_go_where_they_stand(family, bundle, client):
    messages = [
        {"role": "user", "content": [image_part(1), text("Look.")]},
        {"role": "assistant", "content": "Yes."},
        {"role": "user", "content": [text("Compare"), image_part(2), text("with"), image_part(3)]},
    ]
    tagged = [
        {"role": "user", "content": "<image>Look."},
        {"role": "assistant", "content": "Yes."},
        {"role": "user", "content": "Compare<image>with<image>"},
    ]
    expected, _, prompt = reference(family, bundle, tagged, [picture(1), picture(2), picture(3)])
    answer = chat(client, messages)
    assert answer.choices[0].message.content == expected and answer.usage.prompt_tokens == prompt
    # the order is the request's: the last two images swapped give another answer
    swapped = messages[:2] + [
        {"role": "user", "content": [text("Compare"), image_part(3), text("with"), image_part(2)]}
    ]
    assert chat(client, swapped).choices[0].message.content != expected


def test_more_images_than_the_family_takes_are_refused_naming_the_limit(server, client):
    listed = httpx.get(f"{server.url}/v1/models").json()["data"]
    assert [(m["id"], m["max_images"]) for m in listed] == [(MODEL, LIMIT)]
    many = [{"role": "user", "content": [text("Count them.")] + [image_part(0)] * (LIMIT + 1)}]
    reply = httpx.post(
        f"{server.url}/v1/chat/completions", json={"model": MODEL, "messages": many}, timeout=60
    )
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["code"] == "too_many_images"
    assert error["message"] == (
        f"Qwen2.5-VL (model.family=qwen2_5_vl) takes at most {LIMIT} images per conversation; the messages hold "
        f"{LIMIT + 1} images"
    )
    # the limit itself is answered, each image in the prompt
    one = chat(client, [{"role": "user", "content": [text("Count them."), image_part(0)]}])
    full = chat(client, [{"role": "user", "content": [text("Count them.")] + [image_part(0)] * LIMIT}])
    image_tokens = (
        one.usage.prompt_tokens
        - chat(client, [{"role": "user", "content": "Count them."}]).usage.prompt_tokens
    )
    assert (
        image_tokens > 0 and full.usage.prompt_tokens == one.usage.prompt_tokens + (LIMIT - 1) * image_tokens
    )


def test_images_over_the_request_pixel_limit_are_refused_from_their_headers(server, client):
    """Sixteen PNGs of 16 Mpx and one colour in a body of a few kB: the third header passes the request's
    limit (serve.max_request_pixels), before it is decoded."""
    buffer = io.BytesIO()
    Image.new("1", (4000, 4000), 0).save(buffer, format="PNG")
    large = {
        "type": "image_url",
        "image_url": {"url": "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()},
    }
    many = [{"role": "user", "content": [text("Count them.")] + [large] * LIMIT}]
    reply = httpx.post(
        f"{server.url}/v1/chat/completions", json={"model": MODEL, "messages": many}, timeout=60
    )
    assert reply.status_code == 400, reply.text
    assert (
        "48000000 pixels, over this server's 32000000-pixel limit per request (serve.max_request_pixels)"
        in (reply.json()["error"]["message"])
    )
    assert chat(client, CONVERSATION).choices[0].message.content


def test_an_image_the_processor_refuses_gets_a_400_of_its_own(server, client):
    thin = [{"role": "user", "content": [text("What is it?"), image_part_of(Image.new("RGB", (2, 600)))]}]
    reply = httpx.post(
        f"{server.url}/v1/chat/completions", json={"model": MODEL, "messages": thin}, timeout=60
    )
    assert reply.status_code == 400, reply.text
    assert "cannot encode this request: absolute aspect ratio" in reply.json()["error"]["message"]
    assert chat(client, CONVERSATION).choices[0].message.content


def test_a_literal_image_tag_is_refused_and_a_seed_repeats_a_sampled_answer(server, client):
    reply = httpx.post(
        f"{server.url}/v1/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": "What is <image>?"}]},
        timeout=60,
    )
    assert reply.status_code == 400
    assert "1 <image> tag(s) but 0 image(s)" in reply.json()["error"]["message"]
    sampled = [
        chat(client, CONVERSATION, temperature=1.0, top_p=0.9, seed=7).choices[0].message.content
        for _ in range(2)
    ]
    assert sampled[0] == sampled[1]


def test_a_client_that_leaves_mid_stream_does_not_stop_the_server(server, client):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body) as reply:
        next(reply.iter_lines())
    assert chat(client, CONVERSATION).choices[0].message.content


def test_the_serve_stage_validates_and_serves_the_family(varied_twin, tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO)
    validate(compose_config(["model=qwen2_5_vl_tiny", "stages=[serve]", "ckpt=base"]))
    port = free_port()
    cfg = compose_config(
        [
            "model=qwen2_5_vl_tiny",
            f"model.path={varied_twin('qwen2_5_vl')}",
            "stages=[serve]",
            "ckpt=base",
            "device=cpu",
            f"serve.port={port}",
        ]
    )
    validate(cfg)
    seen = {}

    def serve_once(app, host, port):  # one request instead of serving until Ctrl-C
        running = ServerThread(app, host, port)
        try:
            client = openai.OpenAI(base_url=f"{running.url}/v1", api_key="x", max_retries=0)
            seen["models"] = [(m.id, m.max_images) for m in client.models.list()]
            seen["answer"] = client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": [image_part(0), text("Hi")]}], max_tokens=3
            )
        finally:
            running.stop()

    monkeypatch.setattr("pipeline.apps.serve.app.run_server", serve_once)
    assert run_stage(serve, cfg, tmp_path / "run", ckpt=None) == {"serve": f"http://127.0.0.1:{port}"}
    assert seen["models"] == [(MODEL, LIMIT)]
    assert seen["answer"].usage.completion_tokens == 3
    assert "decodes up to 8 requests together; new ones join between steps" in caplog.text


def test_the_page_learns_the_limit_and_sends_several_images(server, client, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from tests.apps.test_serve_page import ask_on_page, headless_chrome

    browser = headless_chrome()
    try:
        paths = []
        for seed in (4, 5):
            paths.append(tmp_path / f"{seed}.png")
            picture(seed).save(paths[-1])
        browser.get(server.url + "/")
        WebDriverWait(browser, 10).until(lambda d: d.find_element(By.ID, "model").text == MODEL)
        assert browser.execute_script("return maxImages") == LIMIT
        browser.find_element(By.ID, "file").send_keys("\n".join(str(p) for p in paths))
        WebDriverWait(browser, 10).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#thumbs img")) == 2)
        ask_on_page(browser, "Which differs?")
        shown = browser.find_elements(By.CSS_SELECTOR, ".msg.assistant.done span")[-1]
        expected = chat(
            client, [{"role": "user", "content": [image_part(4), image_part(5), text("Which differs?")]}]
        )
        assert shown.get_attribute("textContent") == expected.choices[0].message.content
        assert len(browser.find_elements(By.CSS_SELECTOR, ".msg.user img")) == 2
        # two sent: fourteen more fit the conversation, the next one is refused naming the limit
        browser.find_element(By.ID, "file").send_keys("\n".join([str(paths[0])] * (LIMIT - 2)))
        WebDriverWait(browser, 10).until(
            lambda d: len(d.find_elements(By.CSS_SELECTOR, "#thumbs img")) == LIMIT - 2
        )
        assert not browser.find_elements(By.CSS_SELECTOR, ".msg.error")
        browser.find_element(By.ID, "file").send_keys(str(paths[1]))
        error = WebDriverWait(browser, 10).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.error"))
        assert f"at most {LIMIT} images per conversation" in error[0].text
    finally:
        browser.quit()
