"""Choosing the next token from logits, greedy or sampled (temperature, top-k, top-p, repetition penalty): the
one sampler of the decoders that run their own loop (MiniCPM-V-2's generation, the HF-native families'
running batch); transformers' `generate` keeps its own."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pipeline.families.generation_settings import GenerationSettings


def penalise_repeats(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Returns `logits` [B, V] with the ids of `seen` [B, n] made less likely by `penalty` (CTRL's rule, as
    transformers' RepetitionPenaltyLogitsProcessor: a positive logit divided, a negative one multiplied)."""
    if penalty == 1.0 or seen.shape[1] == 0:
        return logits
    picked = logits.gather(1, seen)
    picked = torch.where(picked < 0, picked * penalty, picked / penalty)
    return logits.scatter(1, seen, picked)


def next_tokens(
    logits: torch.Tensor,
    generated: torch.Tensor,
    settings: GenerationSettings,
    generator: torch.Generator | Sequence[torch.Generator | None] | None = None,
) -> torch.Tensor:
    """Returns the next token id per row [B] from fp32 logits [B, V] (`generator`: one, or one per row;
    `generated` [B, n]: the ids the repetition penalty applies to)."""
    logits = penalise_repeats(logits, generated, settings.repetition_penalty)
    if not settings.do_sample:
        return logits.argmax(-1)
    logits = logits / settings.temperature
    if settings.top_k > 0:
        kth = torch.topk(logits, min(settings.top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if settings.top_p < 1.0:
        sorted_logits, order = logits.sort(descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token once the mass before it already reaches top_p (the first token always stays).
        drop = probs.cumsum(-1) - probs >= settings.top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)
    probs = logits.softmax(-1)
    if isinstance(generator, Sequence):
        # one generator per row: a row's draws do not depend on the other rows of its batch
        rows = [torch.multinomial(probs[i : i + 1], 1, generator=g) for i, g in enumerate(generator)]
        return torch.cat(rows).squeeze(1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)
