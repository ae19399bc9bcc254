"""Text generation for MiniCPM-V-2 from input embeddings: greedy or sampled, batched with left padding.

A preallocated KV cache holds the prompt (text and image queries) after one prefill; each step then feeds
one token per row. `use_cache=False` recomputes the whole sequence each step (the reference the cached
path is tested against).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .kv_cache import KVCache
from .modeling import MiniCPMV, positions_and_mask


@dataclass
class GenerationSettings:
    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.do_sample and self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


def _penalise_repeats(logits: torch.Tensor, generated: torch.Tensor, penalty: float) -> torch.Tensor:
    if penalty == 1.0 or generated.shape[1] == 0:
        return logits
    picked = logits.gather(1, generated)
    picked = torch.where(picked < 0, picked * penalty, picked / penalty)
    return logits.scatter(1, generated, picked)


def next_tokens(
    logits: torch.Tensor,
    generated: torch.Tensor,
    settings: GenerationSettings,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Returns the next token id per row [B] from fp32 logits [B, V]."""
    logits = _penalise_repeats(logits, generated, settings.repetition_penalty)
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
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


@torch.no_grad()
def generate(
    model: MiniCPMV,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    pixel_values: list[list[torch.Tensor]] | None = None,
    image_bound: list[torch.Tensor] | None = None,
    settings: GenerationSettings | None = None,
    eos_token_id: int | list[int] = 2,
    pad_token_id: int = 0,
    on_step: Callable[[torch.Tensor], None] | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
) -> torch.Tensor:
    """Returns the new tokens [B, n] (rows that ended early are filled with pad_token_id after their eos).

    `on_step` receives each step's tokens [B] as soon as they are chosen (for streaming).
    """
    settings = settings or GenerationSettings()
    device = model.llm.lm_head.weight.device
    input_ids = input_ids.to(device)
    b, t = input_ids.shape
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device)
    eos = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id), device=device)
    embed_scale = model.config.scale_emb
    embeds = model.embed(input_ids, pixel_values, image_bound)
    dtype = embeds.dtype
    cache = None
    if use_cache:
        cfg = model.config
        cache = KVCache(
            cfg.num_hidden_layers,
            b,
            cfg.num_key_value_heads,
            t + settings.max_new_tokens,
            cfg.head_dim,
            dtype,
            device,
        )
    generated = torch.empty(b, 0, dtype=torch.long, device=device)
    finished = torch.zeros(b, dtype=torch.bool, device=device)
    step_embeds, past = embeds, 0
    for _ in range(settings.max_new_tokens):
        pos, attn = positions_and_mask(mask, step_embeds.shape[1], dtype, past=past)
        hidden = model.llm.model(step_embeds, pos.to(device), attn, cache)
        logits = model.llm.logits(hidden[:, -1])
        tok = next_tokens(logits, generated, settings, generator)
        tok = torch.where(finished, torch.full_like(tok, pad_token_id), tok)
        generated = torch.cat([generated, tok[:, None]], dim=1)
        if on_step is not None:
            on_step(tok)
        finished = finished | torch.isin(tok, eos)
        if bool(finished.all()):
            break
        mask = torch.cat([mask, torch.ones(b, 1, dtype=mask.dtype, device=device)], dim=1)
        new_embeds = model.llm.model.embed_tokens(tok[:, None]) * embed_scale
        if use_cache:
            past = cache.length
            step_embeds = new_embeds
        else:
            embeds = torch.cat([embeds, new_embeds], dim=1)
            step_embeds = embeds
    return generated
