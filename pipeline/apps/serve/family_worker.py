"""Serving a transformers-native family (Qwen2.5-VL, Qwen3-VL, MiniCPM-V 4.6): its prompt encoding and the
worker thread that answers one request at a time through the family's own `generate`.

The worker keeps BatchingWorker's interface (`submit`, `close`, Jobs receiving Events), so the routes are
the same for every family. A request's tokens are streamed as `generate` makes them (a streamer fed by
it); a stop string, max_tokens or a client that left ends generation at that token. Greedy unless the
request samples; a sampled answer with a `seed` is repeatable.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
from PIL import Image
from transformers.generation.streamers import BaseStreamer

from pipeline.families.base import EncodedSample, Family, FamilyError
from pipeline.families.hf_native import eos_token_ids, generate_options, seeded_sampling

from .batching import Job, ModelThread, advance_job, finish_job
from .schema import Conversation, RequestError

log = logging.getLogger(__name__)


def family_label(family: Family) -> str:
    """Returns how error messages name the served family."""
    return f"model.family={family.name}"


def encode_request(
    family: Family,
    processor: Any,
    conversation: Conversation,
    system: str | None,
    images: Sequence[Image.Image],
    max_new_tokens: int,
    positions: int | None,
) -> EncodedSample:
    """Returns the generation prompt of a request's conversation (system prompt first when given); raises
    RequestError when the family refuses it or the prompt leaves no room for max_new_tokens."""
    messages = ([{"role": "system", "content": system}] if system else []) + conversation.messages
    try:
        sample = family.encode(processor, messages, list(images), generation=True)
    except FamilyError as err:
        raise RequestError(
            f"messages: {err} (each image_url part is an <image> tag where it stands)", param="messages"
        ) from None
    if positions is not None and len(sample) + max_new_tokens > positions:
        raise RequestError(
            f"the conversation is too long: its prompt of {len(sample)} tokens and max_tokens={max_new_tokens} "
            f"exceed the model's {positions} positions; shorten the history, or lower max_tokens",
            param="messages",
            code="context_length_exceeded",
        )
    return sample


class _Answered(Exception):
    """Raised from the streamer once the request has its answer (or has gone): generation stops there."""


class _JobStreamer(BaseStreamer):
    """Hands each token `generate` makes to the job; the first call (the prompt) is skipped."""

    def __init__(self, job: Job, eos_ids: frozenset[int], decode) -> None:
        self.job = job
        self.eos_ids = eos_ids
        self.decode = decode
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for token in value.reshape(-1).tolist():
            advance_job(self.job, int(token), self.eos_ids, self.decode)
            if self.job.done:
                raise _Answered

    def end(self) -> None:
        pass


class FamilyWorker(ModelThread):
    """Owns a family's model on one thread; `submit` queues a job, answered in turn, one at a time."""

    def __init__(self, family: Family, bundle: Any, seed: int = 0) -> None:
        super().__init__(family.device_of(bundle), seed)
        self.family = family
        self.bundle = bundle
        tokenizer = bundle.processor.tokenizer
        self.decode = partial(tokenizer.decode, skip_special_tokens=True)  # as the family's generate decodes
        self.eos_ids = eos_token_ids(bundle.core)
        self._start()

    # ----- the worker thread
    def _take(self) -> list[Job] | None:
        with self._wake:
            if not self._wait():
                return None
            job = self._pending.popleft()
        return [] if job.cancelled.is_set() else [job]

    def _answer(self, jobs: list[Job]) -> None:
        self._generate(jobs[0])

    def _answered(self, jobs: list[Job], seconds: float) -> None:
        log.info("answered in %.2f s (%d tokens)", seconds, len(jobs[0].ids))

    def _generate(self, job: Job) -> None:
        processor = self.bundle.processor
        batch = self.family.collate_for_generation(processor, [job.sample])
        # top_k as the MiniCPM-V-2 path samples (GenerationSettings' default)
        options = generate_options(job.decoding.settings(job.max_new_tokens))
        seed = self._seed_of(job) if job.decoding.do_sample else None
        streamer = _JobStreamer(job, self.eos_ids, self.decode)
        try:
            with seeded_sampling(seed, self.device):
                self.family.generate(
                    self.bundle.model,
                    processor,
                    batch,
                    max_new_tokens=job.max_new_tokens,
                    streamer=streamer,
                    **options,
                )
        except _Answered:
            pass
        if not job.done:  # generate stopped on a limit of its own
            finish_job(job, "length", self.decode)
