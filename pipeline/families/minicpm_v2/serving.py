"""MiniCPM-V-2's decoding for the chat and the server: several prompts decoded together step by step (the
server's batches), and one prompt's tokens handed on as they come (the chat, streamed).

Both run the batched `generate` of generation.py unchanged (on a GPU over the static KV cache and its CUDA
graph): a step callback hands each step's tokens on and ends generation, by an exception of its own, once
the caller has what it needs.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

import torch

from pipeline.families.base import BatchDecoder

from .bundle import ModelBundle
from .collate import Sample, collate_for_generation
from .generation import GenerationSettings, generate


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
