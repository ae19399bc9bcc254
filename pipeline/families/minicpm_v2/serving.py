"""MiniCPM-V-2's decoding for the chat and the server: a running batch that requests join and leave between
steps (the server's continuous batching), and one prompt's tokens handed on as they come (the chat, streamed).

The running batch holds rows of the static decoder of generation.py (on a GPU its CUDA graph): a request is
prefilled alone (with its images) into a cache of its own, then placed in a free row at the slots a batch of
its own would give it; every row writes at its own slot and position, so rows of any prompt length decode side
by side and a greedy answer is the one the request gets alone. A batch that needs more rows or a longer cache
moves to a larger decoder (rows in powers of two; a new graph), taking its rows along. The chat runs the
batched `generate` unchanged: a step callback hands each step's tokens on and ends generation, by an exception
of its own, once the caller has what it needs.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from pipeline.families.base import BatchDecoder, StepDecoder
from pipeline.families.sampling import next_tokens

from .bundle import ModelBundle
from .collate import Sample, collate_for_generation
from .generation import STATIC_LENGTH_MULTIPLE, GenerationSettings, StaticDecoder, generate
from .kv_cache import KVCache
from .modeling import positions_and_mask


class _Finished(Exception):
    """Raised from the step callback when the caller wants no more steps."""


class MiniCPMV2BatchDecoder(BatchDecoder):
    """Left-padded batches of MiniCPM-V-2 prompts decoded together by its batched `generate`."""

    def __init__(self, bundle: ModelBundle) -> None:
        self.bundle = bundle
        self.device = bundle.core.llm.lm_head.weight.device

    def decode(
        self,
        prompts: Sequence[Sample],
        settings: GenerationSettings,
        seeds: Sequence[int] | None,
        on_step: Callable[[list[int]], bool],
    ) -> None:
        tok = self.bundle.tokenizer
        inputs = collate_for_generation(list(prompts), tok.pad_id)
        generators = None
        if seeds is not None:
            # one generator per row, so that a seeded answer does not depend on its batch
            generators = [torch.Generator(self.device).manual_seed(int(seed)) for seed in seeds]

        def step(tokens: torch.Tensor) -> None:
            if not on_step(tokens.tolist()):
                raise _Finished

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
                on_step=step,
                generator=generators,
            )
        except _Finished:
            pass


@dataclass
class _Row:
    id: int
    slot: int  # its row in the static decoder
    max_new_tokens: int
    generator: torch.Generator | None
    seen: list[int]  # prompt and generated ids (the repetition penalty's)
    made: int = 0


class MiniCPMV2StepDecoder(StepDecoder):
    """The server's running batch over MiniCPM-V-2's static decoder: requests join between steps (prefilled
    alone, placed in a free row) and leave as they end (their row freed)."""

    def __init__(self, bundle: ModelBundle) -> None:
        super().__init__(bundle.tokenizer.pad_id)
        self.bundle = bundle
        self.core = bundle.core
        self.device = self.core.llm.lm_head.weight.device
        self.end_ids = frozenset([bundle.tokenizer.eos_id])
        self.settings = GenerationSettings()
        self._rows: list[_Row] = []
        self._next_id = 0
        self._decoder: StaticDecoder | None = None
        self._logits: torch.Tensor | None = None  # [decoder rows, V]: each row's next-token logits

    def start(self, settings: GenerationSettings) -> None:
        self.settings = settings
        self._rows = []
        self._logits = None
        self._decoder = None  # on a GPU the model keeps it (StaticDecoder.held) for the next batch

    @property
    def rows(self) -> list[int]:
        return [row.id for row in self._rows]

    @torch.no_grad()
    def add(
        self, prompts: Sequence[Sample], max_new_tokens: Sequence[int], seeds: Sequence[int | None]
    ) -> list[int]:
        inputs = collate_for_generation(list(prompts), self.pad_id)
        ids = inputs["input_ids"].to(self.device)
        mask = inputs["attention_mask"].to(self.device)
        n, t = ids.shape
        embeds = self.core.embed(ids, inputs["pixel_values"], inputs["image_bound"])
        length = -(-(t + max(max_new_tokens)) // STATIC_LENGTH_MULTIPLE) * STATIC_LENGTH_MULTIPLE
        decoder = self._decoder_for(len(self._rows) + n, length, embeds.dtype)
        cfg = self.core.config
        cache = KVCache(
            cfg.num_hidden_layers, n, cfg.num_key_value_heads, t, cfg.head_dim, embeds.dtype, self.device
        )
        positions, attention = positions_and_mask(mask, t, embeds.dtype)
        hidden = self.core.llm.model(embeds, positions.to(self.device), attention, cache)
        logits = self.core.llm.logits(hidden[:, -1])
        taken = {row.slot for row in self._rows}
        slots = [slot for slot in range(decoder.mask.shape[0]) if slot not in taken][:n]
        decoder.place(slots, cache, mask)
        if self._logits is None or self._logits.shape[0] != decoder.mask.shape[0]:
            grown = torch.zeros(
                decoder.mask.shape[0], logits.shape[-1], dtype=logits.dtype, device=self.device
            )
            if self._logits is not None:
                grown[: self._logits.shape[0]] = self._logits
            self._logits = grown
        self._logits[slots] = logits
        new = []
        for k, slot in enumerate(slots):
            seed = seeds[k]
            generator = None if seed is None else torch.Generator(self.device).manual_seed(int(seed))
            seen = ids[k][mask[k].bool()].tolist() if self.settings.repetition_penalty != 1.0 else []
            new.append(_Row(self._next_id, slot, int(max_new_tokens[k]), generator, seen))
            self._next_id += 1
        self._rows += new
        return [row.id for row in new]

    def _decoder_for(self, rows: int, length: int, dtype: torch.dtype) -> StaticDecoder:
        """Returns a decoder with `rows` rows and `length` slots, the running rows moved into a new one where
        the current one is too small."""
        use_graph = self.device.type == "cuda"
        old = self._decoder
        if old is not None and old.fits(rows, length, dtype, self.device, use_graph):
            return old
        if old is None:
            decoder = self._new_decoder(rows, length, dtype, use_graph)
        else:
            decoder = self._new_decoder(rows, max(length, old.cache.max_length), dtype, use_graph)
            decoder.take_rows(old)
        self._decoder = decoder
        return decoder

    def _new_decoder(self, rows: int, length: int, dtype: torch.dtype, use_graph: bool) -> StaticDecoder:
        if use_graph:  # the model's held decoder: its graph serves every later batch that fits it
            decoder = StaticDecoder.held(self.core, rows, length, dtype, self.device, use_graph)
            decoder.capture_empty()
            return decoder
        # no graph to keep (CPU): one just large enough, since every row of it is computed at every step
        cfg = self.core.config
        rows = 1 << (rows - 1).bit_length()
        cache = KVCache(
            cfg.num_hidden_layers, rows, cfg.num_key_value_heads, length, cfg.head_dim, dtype, self.device
        )
        return StaticDecoder(self.core, cache, use_graph=False)

    @torch.no_grad()
    def step(self) -> dict[int, int]:
        if not self._rows:
            return {}
        assert self._logits is not None and self._decoder is not None
        tokens = self._choose().tolist()
        chosen: dict[int, int] = {}
        for row, token in zip(self._rows, tokens, strict=True):
            chosen[row.id] = token
            row.made += 1
            if self.settings.repetition_penalty != 1.0:
                row.seen.append(token)
        self._rows = [
            row for row in self._rows if chosen[row.id] not in self.end_ids and row.made < row.max_new_tokens
        ]
        if self._rows:
            slots = torch.tensor([row.slot for row in self._rows], device=self.device)
            fed = torch.tensor([chosen[row.id] for row in self._rows], device=self.device)
            self._decoder.tok[slots] = fed[:, None]
            self._logits = self._decoder.replay()
        return chosen

    def drop(self, rows: Sequence[int]) -> None:
        gone = set(rows)
        self._rows = [row for row in self._rows if row.id not in gone]

    def _choose(self) -> torch.Tensor:
        """Returns each row's next token [n] from its logits (its own generator when sampling)."""
        assert self._logits is not None
        logits = self._logits[[row.slot for row in self._rows]].float()
        settings = self.settings
        generators = [row.generator for row in self._rows] if settings.do_sample else None
        if settings.repetition_penalty == 1.0:
            empty = torch.empty(len(self._rows), 0, dtype=torch.long, device=logits.device)
            return next_tokens(logits, empty, settings, generators).cpu()
        picks = []  # the penalty's ids differ in number from row to row: one row at a time
        for i, row in enumerate(self._rows):
            seen = torch.tensor([row.seen], dtype=torch.long, device=logits.device)
            picks.append(next_tokens(logits[i : i + 1], seen, settings, [row.generator])[0])
        return torch.stack(picks).cpu()


def stream_tokens(
    bundle: ModelBundle,
    prompt: Sample,
    settings: GenerationSettings,
    on_token: Callable[[int], None],
    stop: threading.Event | None = None,
    seed: int | None = None,
) -> None:
    """Generates the answer to one prompt, handing each token id to `on_token` as it is chosen; ends at the
    eos, at max_new_tokens, or right after the token during which `stop` was set."""
    seeds = [seed] if seed is not None and settings.do_sample else None

    def on_step(tokens: list[int]) -> bool:
        if stop is not None and stop.is_set():
            return False
        on_token(tokens[0])
        return stop is None or not stop.is_set()

    MiniCPMV2BatchDecoder(bundle).decode([prompt], settings, seeds, on_step)
