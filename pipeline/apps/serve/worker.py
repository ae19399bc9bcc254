"""The worker: one thread owns the model and answers every request, for every family, streaming each request's
text back to it as it grows.

A family that batches served requests (capabilities.batches_requests) gets every waiting request that can
share a batch, up to serve.max_batch_size, decoded together step by step by its BatchDecoder. Where the family
batches continuously (capabilities.continuous_batching: every family built in, each over its own cache, a
static one replayed as a CUDA graph where the family has it), requests that arrive while a batch runs join it
between two steps, and a request leaves it as soon as it ends, freeing its place; otherwise a batch runs until
every request in it is finished or gone, and the requests that came meanwhile form the next one. After each
step the worker hands each request its token. Requests share a batch when they decode alike (greedy, or
sampling with the same temperature and top_p); each keeps its own max_tokens, stop strings and seed, so a
greedy answer is the one the request gets served alone. A family without a batch decoder answers one request
at a time through its streaming generate (Family.stream_tokens), stopped at the token that finishes the
request.

Requests are isolated: one whose own setup fails (its seed) gets its own error and leaves its batch; when a
batch (or a group of requests joining one) fails before any of its requests has a token, each of them is tried
alone, so that only the request at fault fails.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from functools import partial

import torch

from pipeline.families.base import BatchDecoder, Bundle, EncodedPrompt, Family, StepDecoder
from pipeline.families.generation_settings import GenerationSettings

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
    status: int = 500  # the HTTP status of an error: 4xx when the request itself is at fault


@dataclass
class Job:
    """One request waiting for, or in, generation. Events go to `events` on the request's event loop.
    `prompt` is the family's encoded prompt (Family.encode_chat)."""

    prompt: EncodedPrompt
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


def _held_back(text: str, stops: list[str]) -> int:
    """Returns how many trailing characters of `text` could be the start of a stop string (not sent yet)."""
    keep = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), keep, -1):
            if text.endswith(stop[:n]):
                keep = n
                break
    return keep


def advance_job(job: Job, token: int, end_ids: Collection[int], decode: Callable[[list[int]], str]) -> None:
    """Adds one generated token to `job`, sending the text that became certain; finishes it when due
    (an end token: "stop"; a stop string: "stop", cut before it; max_new_tokens reached: "length")."""
    if job.cancelled.is_set():
        job.done = True
        return
    if token in end_ids:
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


def _fail(job: Job, message: str, status: int = 500) -> None:
    """Ends `job` with an error (unless it has ended already)."""
    if not job.done:
        job.done = True
        job.emit(Event(error=message, status=status))


def finish_job(job: Job, reason: str, decode: Callable[[list[int]], str], text: str | None = None) -> None:
    """Ends `job` with `reason`, sending the rest of its text (`text`, else its ids decoded)."""
    text = decode(job.ids) if text is None else text
    job.done = True
    job.emit(Event(delta=text[job.sent :], finish_reason=reason, completion_tokens=len(job.ids)))
    job.sent = len(text)


class Worker:
    """The thread that owns the model: `submit` queues a job, which then receives its Events; `close` stops
    the thread. Jobs are answered in batches of up to `max_batch_size` where the family batches requests
    (its BatchDecoder), else one at a time (its stream_tokens)."""

    def __init__(self, family: Family, bundle: Bundle, max_batch_size: int, seed: int = 0) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.family = family
        self.bundle = bundle
        self.device = family.device_of(bundle)
        self.decoder: BatchDecoder | None = (
            family.batch_decoder(bundle) if family.capabilities.batches_requests else None
        )
        self.max_batch_size = max_batch_size if self.decoder is not None else 1
        self.end_ids = family.end_ids(bundle)
        self.decode: Callable[[list[int]], str] = partial(family.decode, bundle)
        # the number of requests taken together each time: a batch, or a group joining a running batch
        # (for logs and tests)
        self.batches: list[int] = []
        self._seeds = torch.Generator().manual_seed(seed)  # seeds of the requests that give none
        self._pending: deque[Job] = deque()
        self._wake = threading.Condition()
        self._stopping = False
        self._threads = torch.get_num_threads()
        self._thread = threading.Thread(target=self._run, name="serve-generate", daemon=True)
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

    def _seed_of(self, job: Job) -> int:
        """Returns the seed a sampling request draws with: its own, else the next of the server's; raises
        ValueError (RuntimeError from torch) for a seed torch's generators do not take."""
        if job.seed is None:
            return int(torch.randint(2**62, (1,), generator=self._seeds))
        torch.Generator().manual_seed(job.seed)  # the check: the server checks seeds, but callers may not
        return job.seed

    # ----- the worker thread
    def _take(self) -> list[Job] | None:
        """Returns the oldest waiting job and the waiting jobs that decode like it, up to the batch limit
        ([] when none of them is left to answer), or None at the stop."""
        with self._wake:
            while not self._pending and not self._stopping:
                self._wake.wait()
            if self._stopping:
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

    def _take_joining(self, decoding: Decoding, room: int) -> list[Job]:
        """Returns the waiting jobs that can join a running batch of `decoding` now, oldest first, up to
        `room`: those before the first waiting job that decodes otherwise (it starts the next batch, so that
        a stream of alike requests does not keep it waiting)."""
        taken: list[Job] = []
        with self._wake:
            while self._pending and len(taken) < room and self._pending[0].decoding == decoding:
                taken.append(self._pending.popleft())
        return [job for job in taken if not job.cancelled.is_set()]

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
            if isinstance(self.decoder, StepDecoder) and self.family.capabilities.continuous_batching:
                answered = self._run_batch(self.decoder, jobs)
            else:
                self.batches.append(len(jobs))  # before answering: a request's last event may end a wait
                self._answer_isolated(jobs)
                answered = jobs
            log.info(
                "%d request(s) answered in %.2f s (%d tokens)",
                len(answered),
                time.perf_counter() - started,
                sum(len(job.ids) for job in answered),
            )

    # ----- continuous batching: requests join and leave a running batch between steps
    def _run_batch(self, decoder: StepDecoder, first: list[Job]) -> list[Job]:
        """Runs one batch from `first` until no request is left in it, letting waiting requests that decode
        alike join between steps; returns every request it answered."""
        decoding = first[0].decoding
        # the settings' max_new_tokens is unused: each row brings its own
        decoder.start(decoding.settings(max(job.max_new_tokens for job in first)))
        active: dict[int, Job] = {}
        answered: list[Job] = []
        joining = first
        try:
            while joining or active:
                if joining:
                    self.batches.append(len(joining))
                    answered += joining
                    self._join(decoder, joining, active)
                if not active:
                    break
                try:
                    chosen = decoder.step()
                except Exception as exc:
                    log.exception("generation failed for %d request(s)", len(active))
                    for job in active.values():
                        _fail(job, f"generation failed: {type(exc).__name__}: {exc}")
                    return answered
                for row, token in chosen.items():
                    if not active[row].done:
                        advance_job(active[row], token, self.end_ids, self.decode)
                in_batch = set(decoder.rows)
                for row, job in list(active.items()):
                    if row not in in_batch and not job.done:  # the decoder ended it at its max_new_tokens
                        finish_job(job, "length", self.decode)
                    if job.done:
                        del active[row]
                decoder.drop([row for row in in_batch if row not in active])
                joining = (
                    [] if self._stopping else self._take_joining(decoding, self.max_batch_size - len(active))
                )
        finally:
            decoder.start(decoding.settings(1))  # the cache goes with the rows
        return answered

    def _join(self, decoder: StepDecoder, jobs: list[Job], active: dict[int, Job]) -> None:
        """Adds `jobs` to the running batch (each in `active` under its row id); when they fail to join
        together, each is tried alone, and a request that fails alone gets its own error."""
        seeds: list[int | None] = [None] * len(jobs)
        if jobs[0].decoding.do_sample:
            jobs, sampled = self._seeded(jobs)
            seeds = list(sampled)
            if not jobs:
                return
        try:
            rows = decoder.add([job.prompt for job in jobs], [job.max_new_tokens for job in jobs], seeds)
        except Exception as exc:
            if len(jobs) > 1:
                log.warning("%d requests failed to join the batch (%s); adding each alone", len(jobs), exc)
                for job, seed in zip(jobs, seeds, strict=True):
                    self._join_alone(decoder, job, seed, active)
                return
            log.exception("a request failed to join the batch")
            _fail(jobs[0], f"generation failed: {type(exc).__name__}: {exc}")
            return
        active.update(zip(rows, jobs, strict=True))

    def _join_alone(self, decoder: StepDecoder, job: Job, seed: int | None, active: dict[int, Job]) -> None:
        self.batches.append(1)
        try:
            (row,) = decoder.add([job.prompt], [job.max_new_tokens], [seed])
        except Exception as exc:
            log.exception("a request failed to join the batch")
            _fail(job, f"generation failed: {type(exc).__name__}: {exc}")
            return
        active[row] = job

    # ----- batches that run to their end

    def _answer_isolated(self, jobs: list[Job]) -> None:
        """Answers `jobs`, failing only the requests at fault: a batch that fails before any of its requests
        got a token is answered again one request at a time."""
        try:
            self._answer(jobs)
        except Exception as exc:
            pending = [job for job in jobs if not job.done]
            if len(pending) > 1 and not any(job.ids for job in jobs):  # no request has seen a token yet
                log.warning("a batch of %d requests failed (%s); answering each alone", len(jobs), exc)
                for job in pending:
                    self.batches.append(1)
                    self._answer_isolated([job])
                return
            log.exception("generation failed for %d request(s)", len(jobs))
            for job in jobs:
                _fail(job, f"generation failed: {type(exc).__name__}: {exc}")

    def _seeded(self, jobs: list[Job]) -> tuple[list[Job], list[int]]:
        """Returns the jobs whose seed torch takes and their seeds (one per request, so that a seeded answer
        does not depend on its batch); each other job fails alone with a 400."""
        kept, seeds = [], []
        for job in jobs:
            try:
                seeds.append(self._seed_of(job))
            except (ValueError, RuntimeError, OverflowError) as exc:
                _fail(job, f"seed={job.seed} cannot seed a generator: {exc}", status=400)
                continue
            kept.append(job)
        return kept, seeds

    def _answer(self, jobs: list[Job]) -> None:
        """Generates for `jobs` (one batch, or one job), handing each its tokens as they come."""
        decoding = jobs[0].decoding
        seeds = None
        if decoding.do_sample:
            jobs, seeds = self._seeded(jobs)
            if not jobs:
                return
        settings = decoding.settings(max(job.max_new_tokens for job in jobs))

        def on_step(tokens: Sequence[int]) -> bool:
            for job, token in zip(jobs, tokens, strict=True):
                if not job.done:
                    advance_job(job, int(token), self.end_ids, self.decode)
            return not all(job.done for job in jobs)

        if self.decoder is not None:
            self.decoder.decode([job.prompt for job in jobs], settings, seeds, on_step)
        else:
            (job,) = jobs
            stop = threading.Event()

            def on_token(token: int) -> None:
                if not on_step([token]):
                    stop.set()

            seed = seeds[0] if seeds is not None else None
            self.family.stream_tokens(self.bundle, job.prompt, settings, on_token, stop, seed)
        for job in jobs:
            if not job.done:  # the batch's longest max_tokens ran out first
                finish_job(job, "length", self.decode)
