"""Encoding of one example into a ``Sample``, and batching of samples for training and generation.

Training batches are padded on the right (the causal mask makes right padding harmless and labels stay
aligned), or packed: every sample back to back in one row with positions restarting at 0 and a segment id
per token, so that attention stays within its sample (padding-free). Generation batches are padded on the
left, so every prompt ends at the last position and new tokens follow it directly. Left padding moves every
token, so image bounds are shifted by the padding length.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from pipeline.families.base import IGNORE_INDEX
from pipeline.families.minicpm_v2.processor import MiniCPMVImageProcessor
from pipeline.families.minicpm_v2.template import render_conversation, truncate
from pipeline.families.minicpm_v2.tokenizer import MiniCPMVTokenizer


@dataclass
class Sample:
    """One encoded example: ids, unshifted labels, image bounds and the image's pixel tensors."""

    input_ids: list[int]
    labels: list[int]
    image_bound: list[tuple[int, int]]
    pixel_values: list[torch.Tensor]


def encode_example(
    tokenizer: MiniCPMVTokenizer,
    processor: MiniCPMVImageProcessor,
    query: str,
    response: str | None,
    history: Sequence[Sequence[str]] = (),
    system: str | None = None,
    image: Image.Image | None = None,
    max_length: int = 2048,
    truncation: str = "delete",
    last_round: bool = False,
) -> Sample | None:
    """Returns the encoded example, or None when it is too long to keep under ``truncation``.

    ``response=None`` encodes a generation prompt (ending with ``<AI>``, no labels); ``last_round``: labels on
    the final response alone, not on the history's.
    """
    processed = processor(image, tokenizer) if image is not None else None
    enc = render_conversation(
        tokenizer,
        query,
        response,
        history=history,
        system=system,
        image_placeholder=processed.placeholder_ids if processed is not None else None,
        last_round=last_round,
    )
    kept = truncate(enc, max_length, truncation)
    if kept is None:
        return None
    if processed is not None and len(kept.image_bound) != len(processed.pixel_values):
        # A cut that dropped the image would leave pixel tensors with nowhere to go.
        return None
    return Sample(
        input_ids=kept.input_ids,
        labels=kept.labels,
        image_bound=list(kept.image_bound),
        pixel_values=processed.pixel_values if processed is not None else [],
    )


def _bounds_tensor(bounds: Sequence[tuple[int, int]], shift: int) -> torch.Tensor:
    """Returns the bounds as a LongTensor [n, 2], each position moved by ``shift``."""
    if not bounds:
        return torch.zeros((0, 2), dtype=torch.long)
    return torch.tensor(bounds, dtype=torch.long) + shift


def _pad(samples: Sequence[Sample], pad_id: int, left: bool, with_labels: bool, multiple: int = 1) -> dict:
    """Returns the batch dict with every sequence padded to the longest one, on the left or the right.

    `multiple` > 1 rounds the padded length up to a multiple of it, so that compiled kernels and CUDA graphs
    see a few distinct shapes rather than one per batch.
    """
    if not samples:
        raise ValueError("cannot collate an empty list of samples")
    length = max(len(s.input_ids) for s in samples)
    length = -(-length // multiple) * multiple
    batch = len(samples)
    input_ids = torch.full((batch, length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((batch, length), dtype=torch.long)
    labels = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long)
    bounds = []
    for i, s in enumerate(samples):
        if len(s.labels) != len(s.input_ids):
            raise ValueError(f"sample {i}: {len(s.labels)} labels for {len(s.input_ids)} input ids")
        n = len(s.input_ids)
        start = length - n if left else 0
        input_ids[i, start : start + n] = torch.tensor(s.input_ids, dtype=torch.long)
        attention_mask[i, start : start + n] = 1
        labels[i, start : start + n] = torch.tensor(s.labels, dtype=torch.long)
        bounds.append(_bounds_tensor(s.image_bound, start))
    out = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "image_bound": bounds,
        "pixel_values": [list(s.pixel_values) for s in samples],
    }
    if with_labels:
        out["labels"] = labels
    return out


def collate_for_training(samples: list[Sample], pad_id: int, pad_to_multiple: int = 1) -> dict:
    """Returns a right-padded batch: input_ids, attention_mask, labels (-100 on padding), image_bound, pixel_values."""
    return _pad(samples, pad_id, left=False, with_labels=True, multiple=pad_to_multiple)


def collate_packed(samples: list[Sample], pad_id: int, pad_to_multiple: int = 1) -> dict:
    """Returns one row holding every sample back to back: input_ids, labels, attention_mask [1, T] (T rounded
    up to `pad_to_multiple`), position_ids restarting at 0 per sample, segment_ids (the sample's number; -1
    on the tail padding), image_bound shifted to each sample's place, and every sample's images in order.

    A sample's first token never carries a label, so the shifted loss never predicts across a boundary.
    """
    if not samples:
        raise ValueError("cannot collate an empty list of samples")
    total = sum(len(s.input_ids) for s in samples)
    length = -(-total // pad_to_multiple) * pad_to_multiple
    input_ids = torch.full((1, length), pad_id, dtype=torch.long)
    labels = torch.full((1, length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((1, length), dtype=torch.long)
    position_ids = torch.zeros((1, length), dtype=torch.long)
    segment_ids = torch.full((1, length), -1, dtype=torch.long)
    bounds, pixels = [], []
    start = 0
    for i, s in enumerate(samples):
        if len(s.labels) != len(s.input_ids):
            raise ValueError(f"sample {i}: {len(s.labels)} labels for {len(s.input_ids)} input ids")
        n = len(s.input_ids)
        input_ids[0, start : start + n] = torch.tensor(s.input_ids, dtype=torch.long)
        labels[0, start : start + n] = torch.tensor(s.labels, dtype=torch.long)
        labels[0, start] = IGNORE_INDEX
        attention_mask[0, start : start + n] = 1
        position_ids[0, start : start + n] = torch.arange(n)
        segment_ids[0, start : start + n] = i
        bounds.append(_bounds_tensor(s.image_bound, start))
        pixels.extend(s.pixel_values)
        start += n
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "position_ids": position_ids,
        "segment_ids": segment_ids,
        "image_bound": [torch.cat(bounds) if bounds else torch.zeros((0, 2), dtype=torch.long)],
        "pixel_values": [pixels],
    }


def collate_for_generation(samples: list[Sample], pad_id: int) -> dict:
    """Returns a left-padded batch of prompts: input_ids, attention_mask, image_bound (shifted), pixel_values."""
    return _pad(samples, pad_id, left=True, with_labels=False)
