"""MiniCPM-V-2's generation prompts: a conversation encoded up to its `<AI>` turn, within the model's positions,
and the answer ids cut at the first eos."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image

from pipeline.families.base import ContextLengthError

from .bundle import ModelBundle
from .collate import Sample, encode_example


def prompt_limit(bundle: ModelBundle, max_new_tokens: int) -> int:
    """Returns the longest prompt that leaves room for max_new_tokens within the model's positions; raises
    ContextLengthError when none does."""
    limit = int(bundle.core.config.max_position_embeddings) - max_new_tokens
    if limit < 2:
        raise ContextLengthError(
            f"max_new_tokens={max_new_tokens} leaves no room for a prompt: the model takes "
            f"{bundle.core.config.max_position_embeddings} positions in all"
        )
    return limit


def encode_prompt(
    bundle: ModelBundle,
    query: str,
    history: Sequence[Sequence[str]] = (),
    system: str | None = None,
    image: Image.Image | None = None,
    max_length: int = 4096,
    where: str = "the conversation",
) -> Sample:
    """Returns the generation prompt (ending with <AI>) of a conversation; raises ContextLengthError when it
    exceeds max_length, ValueError when the template refuses it (an <image> tag without the image)."""
    sample = encode_example(
        bundle.tokenizer,
        bundle.processor,
        query,
        None,
        history=history,
        system=system,
        image=image,
        max_length=max_length,
        truncation="delete",
    )
    if sample is None:
        raise ContextLengthError(
            f"{where} is too long: its prompt exceeds {max_length} tokens (the model's positions less "
            "max_new_tokens); start a new conversation, shorten the history, or lower max_new_tokens"
        )
    return sample


def response_ids(ids: Sequence[int], eos_id: int) -> list[int]:
    """Returns the generated ids before the first eos (the eos and any padding after it dropped)."""
    out = []
    for token in ids:
        if int(token) == eos_id:
            break
        out.append(int(token))
    return out


def batch_to_device(batch: dict, device: torch.device) -> dict:
    """Returns the batch with its id and mask tensors on `device` (pixels move inside the model)."""
    batch = dict(batch)
    batch["input_ids"] = batch["input_ids"].to(device)
    batch["attention_mask"] = batch["attention_mask"].to(device)
    return batch
