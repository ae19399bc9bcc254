"""Generation settings and their defaults, free of torch so that the config schema can read them."""

from __future__ import annotations

from dataclasses import dataclass

# model.decode: the family's default (auto), a preallocated cache decoded with fixed shapes (static), or the
# growing cache (dynamic)
DECODE_MODES = ("auto", "static", "dynamic")


@dataclass
class GenerationSettings:
    """How to generate; the one place the defaults live (infer.*, the chat command line and `Chat` read them).

    Greedy unless do_sample; the sampling values are ms-swift's (temperature 0.3, top_p 0.7, top_k 20).
    """

    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float = 0.3
    top_p: float = 0.7
    top_k: int = 20
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
