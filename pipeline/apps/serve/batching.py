"""The batching worker: one thread owns the model and generates for every waiting request that can share a
batch, up to the batch limit, streaming each request's text back to it as it grows.

Requests share a batch when they decode alike (greedy, or sampling with the same temperature and top_p);
each keeps its own max_tokens, stop strings and seed. A batch is left-padded and decoded by the model's
batched `generate` (on a GPU over the static cache and its CUDA graph), so a greedy answer is the one the
request gets served alone. Generation stops as soon as every request of the batch is finished or gone.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

import torch

from pipeline.families.minicpm_v2.bundle import ModelBundle
from pipeline.families.minicpm_v2.collate import collate_for_generation
from pipeline.families.minicpm_v2.generation import GenerationSettings, generate

log = logging.getLogger(__name__)

_REPLACEMENT_CHAR = "\ufffd"  # what a partly generated multi-byte character decodes to


@dataclass(frozen=True)
class Decoding:
    """How a request picks tokens; requests with equal Decoding share a batch."""

    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0

    def settings(self, max_new_tokens: int) -> GenerationSettings:
        """Returns the generation settings of this decoding (top_k and the rest at their defaults)."""
        return GenerationSettings(
            max_new_tokens=max_new_tokens,
            do_sample=self.do_sample,
            temperature=self.temperature,
            top_p=self.top_p,
        )


@dataclass
class Event:
    """What the worker tells a request: new text (`delta`), or the end (`finish_reason` set, or `error`)."""

    delta: str = ""
    finish_reason: str | None = None
    completion_tokens: int = 0
    error: str | None = None


@dataclass
class Job:
    """One request waiting for, or in, generation. Events go to `events` on the request's event loop.
    `sample` is the encoded prompt: a MiniCPM-V-2 Sample, or a family's EncodedSample."""

    sample: Any
    decoding: Decoding
    max_new_tokens: int
    stop: list[str]
    seed: int | None
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    cancelled: threading.Event = field(default_factory=threading.Event)
    # filled in by the worker
    ids: list[int] = field(default_factory=list)
    sent: int = 0  # characters of the text already sent
    done: bool = False

    def emit(self, event: Event) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class _BatchFinished(Exception):
    """Raised from the step callback when every request of the batch has its answer (or has gone)."""


def _held_back(text: str, stops: list[str]) -> int:
    """Returns how many trailing characters of `text` could be the start of a stop string (not sent yet)."""
    keep = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), keep, -1):
            if text.endswith(stop[:n]):
                keep = n
                break
    return keep


class ModelThread:
    """One thread that owns the model: `submit` queues a job, which then receives its Events; a subclass
    says how jobs are taken (`_take`), answered (`_answer`) and logged (`_answered`), and starts the thread
    (`_start`) once it is set up."""

    def __init__(self, device: torch.device, seed: int) -> None:
        self.device = device
        self._seeds = torch.Generator().manual_seed(seed)  # seeds of the requests that give none
        self._pending: deque[Job] = deque()
        self._wake = threading.Condition()
        self._stopping = False
        self._threads = torch.get_num_threads()
        self._thread = threading.Thread(target=self._run, name="serve-generate", daemon=True)

    def _seed_of(self, job: Job) -> int:
        """Returns the seed a sampling request draws with: its own, else the next of the server's."""
        return job.seed if job.seed is not None else int(torch.randint(2**62, (1,), generator=self._seeds))

    def _start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> None:
        with self._wake:
            if self._stopping:
                raise RuntimeError("the server is shutting down")
            self._pending.append(job)
            self._wake.notify()

    def close(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout=30)

    # ----- the worker thread
    def _wait(self) -> bool:
        """Waits (holding `_wake`) for a job or the stop; returns whether there are jobs to take."""
        while not self._pending and not self._stopping:
            self._wake.wait()
        return not self._stopping

    def _take(self) -> list[Job] | None:
        """Returns the next jobs to answer together ([] when none is left to answer), None at the stop."""
        raise NotImplementedError

    def _answer(self, jobs: list[Job]) -> None:
        raise NotImplementedError

    def _answered(self, jobs: list[Job], seconds: float) -> None:
        """Logs what was answered (and keeps what tests and logs read)."""

    def _run(self) -> None:
        # a new thread starts with OpenMP's default team size, not the caller's setting
        torch.set_num_threads(self._threads)
        while True:
            jobs = self._take()
            if jobs is None:
                return
            if not jobs:
                continue
            started = time.perf_counter()
            try:
                self._answer(jobs)
            except Exception as exc:  # these requests fail; the server goes on
                log.exception("generation failed for %d request(s)", len(jobs))
                for job in jobs:
                    if not job.done:
                        job.done = True
                        job.emit(Event(error=f"generation failed: {type(exc).__name__}: {exc}"))
            self._answered(jobs, time.perf_counter() - started)


class BatchingWorker(ModelThread):
    """MiniCPM-V-2's worker: concurrent requests that decode alike are generated together."""

    def __init__(self, bundle: ModelBundle, max_batch_size: int, seed: int = 0) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        super().__init__(bundle.core.llm.lm_head.weight.device, seed)
        self.bundle = bundle
        self.max_batch_size = max_batch_size
        self.batches: list[int] = []  # the size of every batch generated (for logs and tests)
        self._start()

    # ----- the worker thread
    def _take(self) -> list[Job] | None:
        """Returns the oldest waiting job and the waiting jobs that decode like it, up to the batch limit."""
        with self._wake:
            if not self._wait():
                return None
            first = self._pending.popleft()
            batch = [first]
            rest: deque[Job] = deque()
            while self._pending:
                job = self._pending.popleft()
                if len(batch) < self.max_batch_size and job.decoding == first.decoding:
                    batch.append(job)
                else:
                    rest.append(job)
            self._pending = rest
        return [job for job in batch if not job.cancelled.is_set()]

    def _answer(self, jobs: list[Job]) -> None:
        self._generate(jobs)

    def _answered(self, jobs: list[Job], seconds: float) -> None:
        self.batches.append(len(jobs))
        log.info("batch of %d generated in %.2f s", len(jobs), seconds)

    def _generate(self, batch: list[Job]) -> None:
        tok = self.bundle.tokenizer
        inputs = collate_for_generation([job.sample for job in batch], tok.pad_id)
        decoding = batch[0].decoding
        settings = decoding.settings(max(job.max_new_tokens for job in batch))
        generators = None
        if decoding.do_sample:
            # one generator per request, so a seeded answer does not depend on its batch
            generators = [torch.Generator(self.device).manual_seed(self._seed_of(job)) for job in batch]

        def on_step(tokens: torch.Tensor) -> None:
            for job, token in zip(batch, tokens.tolist(), strict=True):
                if not job.done:
                    self._advance(job, int(token))
            if all(job.done for job in batch):
                raise _BatchFinished

        try:
            generate(
                self.bundle.core,
                inputs["input_ids"].to(self.device),
                inputs["attention_mask"].to(self.device),
                inputs["pixel_values"],
                inputs["image_bound"],
                settings=settings,
                eos_token_id=tok.eos_id,
                pad_token_id=tok.pad_id,
                on_step=on_step,
                generator=generators,
            )
        except _BatchFinished:
            pass
        for job in batch:
            if not job.done:  # the batch's longest max_tokens ran out first
                self._finish(job, "length")

    def _advance(self, job: Job, token: int) -> None:
        advance_job(job, token, (self.bundle.tokenizer.eos_id,), self.bundle.tokenizer.decode)

    def _finish(self, job: Job, reason: str, text: str | None = None) -> None:
        finish_job(job, reason, self.bundle.tokenizer.decode, text)


def advance_job(job: Job, token: int, eos_ids: Collection[int], decode: Callable[[list[int]], str]) -> None:
    """Adds one generated token to `job`, sending the text that became certain; finishes it when due
    (an end token: "stop"; a stop string: "stop", cut before it; max_new_tokens reached: "length")."""
    if job.cancelled.is_set():
        job.done = True
        return
    if token in eos_ids:
        finish_job(job, "stop", decode)
        return
    job.ids.append(token)
    # Decode all ids every step: a character split over several byte tokens only appears once whole.
    text = decode(job.ids)
    for stop in job.stop:
        at = text.find(stop)
        if at >= 0:
            finish_job(job, "stop", decode, text[:at])
            return
    if len(job.ids) >= job.max_new_tokens:
        finish_job(job, "length", decode, text)
        return
    if text.endswith(_REPLACEMENT_CHAR):
        return
    ready = len(text) - _held_back(text, job.stop)
    if ready > job.sent:
        job.emit(Event(delta=text[job.sent : ready]))
        job.sent = ready


def finish_job(job: Job, reason: str, decode: Callable[[list[int]], str], text: str | None = None) -> None:
    """Ends `job` with `reason`, sending the rest of its text (`text`, else its ids decoded)."""
    text = decode(job.ids) if text is None else text
    job.done = True
    job.emit(Event(delta=text[job.sent :], finish_reason=reason, completion_tokens=len(job.ids)))
    job.sent = len(text)
