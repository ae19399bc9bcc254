"""Batched generation for every family's twin (on the CPU), through the family interface: eval's and infer's
batches (left-padded rows of different lengths, with images or text only) answer as each row alone; the
server's batch decoder answers as alone too, in a batch formed at once and where requests join a running batch
between steps (MiniCPM-V-2's moving to a larger static decoder when they need it); a seeded sample is the same
alone and in any batch; and the worker lets requests that arrive mid-decode join the batch running.

The transformers-native twins' weights are redrawn larger (the `varied_twin` fixture), so that their answers
depend on the prompt and the images.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np
import pytest
from PIL import Image

from pipeline.apps.generation import generate_for_rows
from pipeline.apps.serve.worker import Decoding, Event, Job, Worker
from pipeline.data.rows import Row
from pipeline.families import FAMILIES, get_family
from pipeline.families.base import StepDecoder, messages_from_row
from pipeline.families.generation_settings import GenerationSettings

MAX_TOKENS = 8
GREEDY = GenerationSettings(max_new_tokens=MAX_TOKENS)
SAMPLING = GenerationSettings(max_new_tokens=MAX_TOKENS, do_sample=True, temperature=1.5, top_p=1.0, top_k=0)
TIMEOUT_S = 60


def picture(seed: int, side: int = 56) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 255, (side, side + 8, 3), dtype=np.uint8))


class Pictures:
    """An ImageSource over pictures made in memory, named "p<seed>-<side>"."""

    def load(self, ref: str) -> Image.Image:
        seed, side = ref[1:].split("-")
        return picture(int(seed), int(side))

    def size(self, ref: str) -> tuple[int, int]:
        return self.load(ref).size


@pytest.fixture(scope="module", params=list(FAMILIES))
def loaded(request, family_twin, varied_twin):
    """Returns (family, bundle) of one family's twin, on the CPU (the bundle's `folder` added)."""
    family = get_family(request.param)
    folder = family_twin(family.name) if family.name == "minicpm_v2" else varied_twin(family.name)
    bundle = family.load_bundle(folder)
    bundle.folder = folder
    return family, bundle


def rows_of(family) -> list[Row]:
    """Returns rows of different lengths: images of two sizes, text only, a history, a system prompt and, where
    the family takes them, two images."""
    two = ["p3-48", "p4-72"] if family.capabilities.max_images > 1 else ["p3-48"]
    return [
        Row("Describe the image.", "", [], ["p0-56"], None, "rows:1"),
        Row("What colour is it? Tell me all about it, at length, please.", "", [], [], None, "rows:2"),
        Row("And now?", "", [("How many shapes are there?", "Three.")], ["p2-96"], None, "rows:3"),
        Row("Compare them.", "", [], two, "You answer briefly.", "rows:4"),
    ]


def prompts_of(family, bundle) -> list:
    """Returns the rows' encoded generation prompts (as eval and infer encode them)."""
    limit = family.prompt_limit(bundle, MAX_TOKENS)
    images = Pictures()
    return [
        family.encode_row(bundle, row, [images.load(r) for r in row.images], limit) for row in rows_of(family)
    ]


def alone(family, bundle, prompts: Sequence) -> list[str]:
    """Returns each prompt's greedy answer, generated alone (eval's batch of one)."""
    return [family.generate_batch(bundle, [prompt], GREEDY)[0] for prompt in prompts]


def texts(family, bundle, tokens: dict[int, list[int]], order: Sequence[int]) -> list[str]:
    """Returns the decoded answers of the rows in `order` from their tokens (end ids left out)."""
    end = family.end_ids(bundle)
    return [family.decode(bundle, [t for t in tokens[row] if t not in end]) for row in order]


def run_joining(
    decoder: StepDecoder,
    prompts: Sequence,
    settings: GenerationSettings,
    seeds: Sequence[int | None],
    at: dict,
) -> list[list[int]]:
    """Returns each prompt's tokens from a running batch that prompt k joins before step `at[k]` (prompts
    joining at the same step join together)."""
    decoder.start(settings)
    tokens: dict[int, list[int]] = {}
    rows: dict[int, int] = {}  # prompt index -> row id
    step = 0
    while len(rows) < len(prompts) or decoder.rows:
        joining = [k for k in range(len(prompts)) if at[k] == step]
        if joining:
            ids = decoder.add(
                [prompts[k] for k in joining],
                [settings.max_new_tokens] * len(joining),
                [seeds[k] for k in joining],
            )
            rows.update(zip(joining, ids, strict=True))
        for row, token in decoder.step().items():
            tokens.setdefault(row, []).append(token)
        step += 1
    return [tokens.get(rows[k], []) for k in range(len(prompts))]


# ----- eval and infer
def test_eval_and_infer_batches_are_left_padded_and_answer_as_each_row_alone(loaded):
    family, bundle = loaded
    rows = rows_of(family)
    images = Pictures()
    _, processor = family.load(
        bundle.folder
    )  # the processor `encode` takes (MiniCPM-V-2's has its tokenizer)
    prompts = [
        family.encode(
            processor,
            messages_from_row(row.query, None, row.history, row.system),
            [images.load(ref) for ref in row.images],
            generation=True,
        )
        for row in rows
    ]
    batch = family.collate_for_generation(processor, prompts)
    length = batch["input_ids"].shape[1]
    for i, prompt in enumerate(prompts):
        n = len(prompt.input_ids)
        assert batch["attention_mask"][i].tolist() == [0] * (length - n) + [1] * n
        assert batch["input_ids"][i, length - n :].tolist() == list(prompt.input_ids)
    assert len({len(prompt.input_ids) for prompt in prompts}) == len(prompts)  # every row padded differently
    one_by_one = generate_for_rows(family, bundle, rows, GREEDY, batch_size=1, images=Pictures())
    together = generate_for_rows(family, bundle, rows, GREEDY, batch_size=len(rows), images=Pictures())
    assert together == one_by_one
    assert len(set(together)) >= 3, together  # the answers tell the rows apart


def test_the_static_cache_answers_as_the_growing_one_a_short_last_batch_too(loaded):
    """model.decode=static (on the CPU: the preallocated cache, uncompiled): the batches, and the shorter
    last one (filled with copies of its last row by the HF-native families, to reuse the compiled step),
    answer as model.decode=dynamic does."""
    family, bundle = loaded
    rows = rows_of(family)
    answers = {}
    for mode in ("dynamic", "static"):
        configured = get_family(family.name, decode=mode)
        answers[mode] = generate_for_rows(
            configured, bundle, rows, GREEDY, batch_size=len(rows) - 1, images=Pictures()
        )
    assert answers["static"] == answers["dynamic"]
    assert len(set(answers["static"])) >= 3, answers


# ----- serve: the batch decoder
def test_served_prompts_answer_as_alone_in_a_batch_and_joining_one_mid_decode(loaded):
    family, bundle = loaded
    prompts = prompts_of(family, bundle)
    expected = alone(family, bundle, prompts)
    assert family.capabilities.batches_requests
    decoder = family.batch_decoder(bundle)
    steps: list[list[int]] = []

    def on_step(tokens: list[int]) -> bool:
        steps.append(tokens)
        return True

    decoder.decode(prompts, GREEDY, None, on_step)  # one batch formed at once
    tokens = {k: [step[k] for step in steps] for k in range(len(prompts))}
    end = family.end_ids(bundle)
    for k in tokens:  # a row that has ended gets padding after its end id
        ended = next((i for i, t in enumerate(tokens[k]) if t in end), len(tokens[k]))
        tokens[k] = tokens[k][: ended + 1]
    assert texts(family, bundle, tokens, range(len(prompts))) == expected
    if not family.capabilities.continuous_batching:
        return
    assert isinstance(decoder, StepDecoder)
    # the first alone, the next two together a step later, the last (the longest) two steps after them
    joined = run_joining(decoder, prompts, GREEDY, [None] * 4, {0: 0, 1: 1, 2: 1, 3: 3})
    assert texts(family, bundle, dict(enumerate(joined)), range(4)) == expected
    assert decoder.rows == []


def test_the_running_batch_puts_one_position_a_row_through_the_head(loaded):
    """The server's running batch reads each row's last logits only, and its head computes only those: at
    prefill, where a prompt is hundreds of positions (MiniCPM-V 4.6's forward has no logits_to_keep, so its
    head is hooked; its full prefill logits are 248,320 words a position), and at every step."""
    family, bundle = loaded
    if not family.capabilities.continuous_batching or family.name == "minicpm_v2":
        pytest.skip("MiniCPM-V-2's static decoder computes its own head (its own tests)")
    decoder = family.batch_decoder(bundle)
    prompts = prompts_of(family, bundle)
    seen: list[tuple[int, int]] = []
    head = bundle.model.get_output_embeddings()
    handle = head.register_forward_hook(lambda module, args, out: seen.append(tuple(out.shape[:2])))
    try:
        steps: list[list[int]] = []
        decoder.decode(prompts, GREEDY, None, lambda tokens: steps.append(tokens) or True)
    finally:
        handle.remove()
    assert seen[0] == (len(prompts), 1) and max(len(p.input_ids) for p in prompts) > 1
    assert all(positions == 1 for _, positions in seen) and len(seen) >= len(steps)


def test_a_seeded_sample_is_the_same_alone_and_in_any_batch(loaded):
    family, bundle = loaded
    prompts = prompts_of(family, bundle)
    decoder = family.batch_decoder(bundle)

    def sampled(batch: Sequence, seeds: list[int]) -> list[list[int]]:
        steps: list[list[int]] = []
        decoder.decode(batch, SAMPLING, seeds, lambda tokens: steps.append(tokens) or True)
        return [[step[k] for step in steps] for k in range(len(batch))]

    def answer(tokens: list[int]) -> list[int]:
        end = family.end_ids(bundle)
        ended = next((i for i, t in enumerate(tokens) if t in end), len(tokens))
        return tokens[: ended + 1]

    (first,) = sampled(prompts[:1], [5])
    assert answer(sampled(prompts[:1], [5])[0]) == answer(first)
    assert answer(sampled([prompts[1], prompts[0], prompts[2]], [1, 5, 2])[1]) == answer(first)
    assert answer(sampled(prompts[:1], [6])[0]) != answer(first)  # it does sample
    if family.capabilities.continuous_batching:
        joined = run_joining(decoder, [prompts[1], prompts[0]], SAMPLING, [1, 5], {0: 0, 1: 2})
        assert joined[1] == answer(first)


# ----- serve: the worker
class _Events:
    """Stands in for a request's asyncio queue: collects the worker's events; `on_first` runs at the first."""

    def __init__(self, on_first=None) -> None:
        self.events: list[Event] = []
        self.done = threading.Event()
        self.on_first = on_first

    def put_nowait(self, event: Event) -> None:
        self.events.append(event)
        if self.on_first is not None:
            self.on_first, on_first = None, self.on_first
            on_first()
        if event.error is not None or event.finish_reason is not None:
            self.done.set()

    def text(self) -> str:
        assert self.done.wait(TIMEOUT_S)
        assert self.events[-1].error is None, self.events[-1].error
        return "".join(event.delta for event in self.events)


class _ImmediateLoop:
    def call_soon_threadsafe(self, fn, *args) -> None:
        fn(*args)


def test_requests_that_come_mid_decode_join_the_running_batch(loaded):
    family, bundle = loaded
    if not family.capabilities.continuous_batching:
        pytest.skip(f"{family.name} forms a batch at once (its batch decoder runs to the end)")
    prompts = prompts_of(family, bundle)
    expected = alone(family, bundle, prompts[:2])
    worker = Worker(family, bundle, max_batch_size=8)

    def job(k: int, events: _Events, max_tokens: int = MAX_TOKENS) -> Job:
        return Job(prompts[k], Decoding(), max_tokens, [], None, _ImmediateLoop(), events)

    later = [_Events(), _Events()]

    def submit_later() -> None:  # in the worker's thread, between two of the first request's steps
        for k, events in enumerate(later, start=1):
            worker.submit(job(k, events, MAX_TOKENS if k == 1 else 3))

    first = _Events(on_first=submit_later)
    try:
        worker.submit(job(0, first))
        answers = [first.text(), later[0].text(), later[1].text()]
    finally:
        worker.close()
    assert first.events[0].finish_reason is None  # the first request was still decoding when they came
    assert worker.batches == [1, 2]  # and the two joined its batch together
    assert answers[:2] == expected[:2]
    short = GenerationSettings(max_new_tokens=3)
    assert answers[2] == family.generate_batch(bundle, [prompts[2]], short)[0]  # its own max_tokens


def test_minicpm_v2s_running_batch_moves_to_a_larger_decoder_and_answers_as_alone(family_twin):
    """Requests that need more rows and a longer cache than the running batch's decoder join it: the rows move
    to a larger decoder mid-decode, each at its own slot and position, and every answer is the one alone."""
    family = get_family("minicpm_v2")
    bundle = family.load_bundle(family_twin("minicpm_v2"))
    prompts = prompts_of(family, bundle)[:3]
    budgets = [MAX_TOKENS, 70, 70]  # the later two need a cache past the first's 64 slots
    expected = [
        family.generate_batch(bundle, [p], GenerationSettings(max_new_tokens=n))[0]
        for p, n in zip(prompts, budgets, strict=True)
    ]
    decoder = family.batch_decoder(bundle)
    assert isinstance(decoder, StepDecoder)
    decoder.start(GREEDY)
    tokens: dict[int, list[int]] = {}
    (first,) = decoder.add(prompts[:1], budgets[:1], [None])
    small = decoder._decoder
    for _ in range(3):
        for row, token in decoder.step().items():
            tokens.setdefault(row, []).append(token)
    later = decoder.add(prompts[1:], budgets[1:], [None, None])
    large = decoder._decoder
    assert (small.mask.shape[0], large.mask.shape[0]) == (1, 4)  # rows in powers of two
    assert large.cache.max_length > small.cache.max_length == 64
    while decoder.rows:
        for row, token in decoder.step().items():
            tokens.setdefault(row, []).append(token)
    assert texts(family, bundle, tokens, [first, *later]) == expected
