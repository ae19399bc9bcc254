"""The one Chat and the one serve worker over every family's tiny twin (on the CPU), through the family
interface only: greedy answers equal the family's own batched generation (generate_batch), streamed or whole,
turn after turn; seeded sampling repeats; the worker batches requests exactly where the family says it does
(capabilities.batches_requests) and answers each request as it would be answered alone.

The transformers-native twins' weights are redrawn larger (tests.conftest.build_varied_twin), so that their
answers depend on the prompt and the image.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.apps.chat import Chat
from pipeline.apps.serve.worker import Decoding, Event, Job, Worker
from pipeline.families import FAMILIES, get_family
from pipeline.families.base import FamilyError
from pipeline.families.generation_settings import GenerationSettings
from tests.helpers import build_varied_twin

MAX_TOKENS = 6
QUESTIONS = ["Describe the image.", "What colour is it?", "How many shapes are there?"]


def picture(seed: int) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 255, (56, 56, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("every-family")


@pytest.fixture(scope="module", params=list(FAMILIES))
def loaded(request, root: Path):
    """Returns (family, bundle) of one family's twin, on the CPU."""
    family = get_family(request.param)
    folder = root / request.param
    if request.param == "minicpm_v2":
        family.build_tiny(folder)  # its random twin already answers each prompt differently
    else:
        build_varied_twin(family, folder)
    return family, family.load_bundle(folder)


def reference(family, bundle, messages: list[dict], images: list[Image.Image]) -> str:
    """Returns the family's own greedy answer (its batched generation, one prompt)."""
    settings = GenerationSettings(max_new_tokens=MAX_TOKENS)
    limit = family.prompt_limit(bundle, MAX_TOKENS)
    (answer,) = family.generate_batch(bundle, [family.encode_chat(bundle, messages, images, limit)], settings)
    return answer


def tagged(query: str, images: int, placement: str) -> str:
    """Returns the query as the chat gives it to the family: inline images tagged before it."""
    return ("<image>" * images if placement == "inline" else "") + query


def test_the_chat_answers_as_the_familys_batched_generation(loaded):
    family, bundle = loaded
    placement = family.capabilities.image_placement
    chat = Chat(family, bundle, generation={"max_new_tokens": MAX_TOKENS})
    assert chat.max_images == family.capabilities.max_images
    first, history = chat.infer(QUESTIONS[0], images=[picture(0)])
    assert first == reference(
        family, bundle, [{"role": "user", "content": tagged(QUESTIONS[0], 1, placement)}], [picture(0)]
    )
    second, history = chat.infer(QUESTIONS[1], history=history)  # the image stays with the conversation
    conversation = [
        {"role": "user", "content": tagged(QUESTIONS[0], 1, placement)},
        {"role": "assistant", "content": first},
        {"role": "user", "content": QUESTIONS[1]},
    ]
    assert second == reference(family, bundle, conversation, [picture(0)])
    assert history == [[QUESTIONS[0], first], [QUESTIONS[1], second]]
    # streamed, the answer grows to the same whole
    steps = [text for text, _ in chat.infer_stream(QUESTIONS[0], images=[picture(0)])]
    assert steps[-1] == first and all(len(a) < len(b) for a, b in zip(steps, steps[1:], strict=False))


def test_the_chat_refuses_more_images_than_the_family_takes_naming_it(loaded):
    family, bundle = loaded
    chat = Chat(family, bundle, generation={"max_new_tokens": MAX_TOKENS})
    limit = family.capabilities.max_images
    display = family.capabilities.display_name
    with pytest.raises(
        ValueError, match=rf"{display} .*takes .*{'one image' if limit == 1 else limit}.* per conversation"
    ):
        chat.infer("Look.", images=[picture(k) for k in range(limit + 1)])


def test_seeded_chat_sampling_repeats(loaded):
    family, bundle = loaded
    settings = {"do_sample": True, "temperature": 1.5, "top_p": 1.0, "top_k": 0, "max_new_tokens": MAX_TOKENS}
    answers = [
        Chat(family, bundle, generation=settings, seed=3).infer(QUESTIONS[0], images=[picture(0)])[0]
        for _ in range(2)
    ]
    assert answers[0] == answers[1]


async def _answers(worker: Worker, prompts: list, decoding: Decoding, seed: int | None = None) -> list[str]:
    """Returns the worker's answers to `prompts`, all queued before the worker takes any of them."""
    loop = asyncio.get_running_loop()
    jobs = [Job(prompt, decoding, MAX_TOKENS, [], seed, loop, asyncio.Queue()) for prompt in prompts]
    with worker._wake:  # the worker thread waits for this lock: it sees every job at once
        for job in jobs:
            worker.submit(job)
    texts = []
    for job in jobs:
        parts = []
        while True:
            event: Event = await job.events.get()
            assert event.error is None, event.error
            parts.append(event.delta)
            if event.finish_reason is not None:
                assert event.completion_tokens == len(job.ids) <= MAX_TOKENS
                break
        texts.append("".join(parts))
    return texts


def test_the_one_worker_batches_where_the_family_does_and_answers_as_alone(loaded):
    family, bundle = loaded
    placement = family.capabilities.image_placement
    limit = family.prompt_limit(bundle, MAX_TOKENS)
    conversations = [
        (
            [{"role": "user", "content": tagged(q, 1 if k != 1 else 0, placement)}],
            [picture(k)] if k != 1 else [],
        )
        for k, q in enumerate(QUESTIONS)
    ]
    prompts = [family.encode_chat(bundle, messages, images, limit) for messages, images in conversations]
    alone = [reference(family, bundle, messages, images) for messages, images in conversations]
    worker = Worker(family, bundle, max_batch_size=8, seed=0)
    try:
        assert asyncio.run(_answers(worker, prompts, Decoding())) == alone
        expected = [len(prompts)] if family.capabilities.batches_requests else [1] * len(prompts)
        assert worker.batches == expected
        # a request's seed repeats its sampled answer
        sampling = Decoding(do_sample=True, temperature=1.5, top_p=1.0)
        first = asyncio.run(_answers(worker, prompts[:1], sampling, seed=7))
        assert asyncio.run(_answers(worker, prompts[:1], sampling, seed=7)) == first
    finally:
        worker.close()


def test_a_family_without_the_capability_has_no_batch_decoder(loaded):
    family, bundle = loaded
    if family.capabilities.batches_requests:
        assert family.batch_decoder(bundle) is not None
    else:
        with pytest.raises(FamilyError, match=f"model.family={family.name}.* does not batch requests"):
            family.batch_decoder(bundle)


def test_stream_tokens_ends_right_after_the_token_stop_was_set_in(loaded):
    family, bundle = loaded
    placement = family.capabilities.image_placement
    messages = [{"role": "user", "content": tagged(QUESTIONS[0], 1, placement)}]
    prompt = family.encode_chat(bundle, messages, [picture(0)], family.prompt_limit(bundle, 20))
    whole: list[int] = []
    family.stream_tokens(bundle, prompt, GenerationSettings(max_new_tokens=20), whole.append)
    end_ids = family.end_ids(bundle)
    assert 1 <= len(whole) <= 20 and all(token not in end_ids for token in whole[:-1])
    # greedy: its first MAX_TOKENS tokens are the family's batched answer
    kept = [token for token in whole[:MAX_TOKENS] if token not in end_ids]
    assert family.decode(bundle, kept) == reference(family, bundle, messages, [picture(0)])
    stop = threading.Event()
    tokens: list[int] = []

    def on_token(token: int) -> None:
        tokens.append(token)
        if len(tokens) == 2:
            stop.set()

    family.stream_tokens(bundle, prompt, GenerationSettings(max_new_tokens=20), on_token, stop)
    assert tokens == whole[:2]
