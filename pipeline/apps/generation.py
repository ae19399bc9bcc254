"""Batched generation over rows, and loading a model for it: what eval, infer and the chat build on, for every
family through its interface (prompt_limit, encode_row, generate_batch).

    bundle, family = load_inference_bundle("/models/MiniCPM-V-2", ckpt="outputs/<exp>/<time>/sft/best")
    answers = generate_for_rows(family, bundle, rows, generation_settings({"max_new_tokens": 64}), batch_size=8)
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from pipeline.config import BASE_CKPT, resolve_device, resolve_dtype
from pipeline.data.images import ImageFiles
from pipeline.data.rows import Row
from pipeline.families import family_of_folder
from pipeline.families.base import Bundle, Family, ImageSource
from pipeline.families.generation_settings import GenerationSettings
from pipeline.runinfo import resolve_ckpt
from pipeline.utils.prefetch import prepared_batches

log = logging.getLogger(__name__)

GENERATION_KEYS = tuple(f.name for f in dataclasses.fields(GenerationSettings))


def generation_settings(values: Mapping[str, Any] | GenerationSettings | None = None) -> GenerationSettings:
    """Returns the generation settings from a mapping of GENERATION_KEYS (GenerationSettings' defaults)."""
    if isinstance(values, GenerationSettings):
        return values
    values = dict(values or {})
    unknown = sorted(set(values) - set(GENERATION_KEYS))
    if unknown:
        raise ValueError(
            f"unknown generation setting(s) {', '.join(unknown)}; valid: {', '.join(GENERATION_KEYS)}"
        )
    return GenerationSettings(**values)


def load_inference_bundle(
    model_path: str | os.PathLike,
    ckpt: str | os.PathLike | None = None,
    *,
    family: Family | None = None,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
    allow_download: bool = False,
    quantization: str = "none",
) -> tuple[Bundle, Family]:
    """Returns (the model in eval mode on `device`, its family): the base model at `model_path`, or with the
    checkpoint `ckpt` (an adapter or merged checkpoint folder, an earlier run folder (its sft/best, else
    sft/last), or "base" / None for the base model). Without `family` the folder's config.json says which
    family runs it. A missing folder or an adapter of another base raises CheckpointError."""
    family = family or family_of_folder(model_path)
    device = device if isinstance(device, torch.device) else resolve_device(str(device))
    if not isinstance(dtype, torch.dtype):
        dtype = resolve_dtype(str(dtype), device)
    if ckpt is not None and str(ckpt) != BASE_CKPT:
        # A run folder is resolved to its checkpoint; a missing path is left to the loader's CheckpointError.
        ckpt = resolve_ckpt(ckpt) if Path(ckpt).expanduser().exists() else Path(ckpt).expanduser()
    else:
        ckpt = None
    bundle = family.load_quantized(
        model_path, ckpt, quantization=quantization, dtype=dtype, device=device, allow_download=allow_download
    )
    bundle.model.eval()
    log.info("loaded %s model from %s%s", bundle.kind, bundle.base_path, f" + {ckpt}" if ckpt else "")
    return bundle, family


def generate_for_rows(
    family: Family,
    bundle: Bundle,
    rows: Sequence[Row],
    settings: GenerationSettings,
    batch_size: int,
    *,
    generator: torch.Generator | None = None,
    images: ImageSource | None = None,
    desc: str = "generate",
    prefetch: bool | None = None,
    timing: dict[str, float] | None = None,
) -> list[str]:
    """Returns one generated response per row (in row order), prompting each with its query, history, system
    and images.

    Rows are batched by prompt length (left-padded). With `prefetch` (None: on a GPU) the next batches'
    images are loaded and encoded on CPU threads while the current batch generates; the answers are the
    same as one batch after the other. A row too long for the model's positions, or with an unreadable
    image, raises an error naming it. `timing`, where given, receives the seconds spent waiting for prepared
    rows (`prepare_wait_s`: the generation waited on the CPU), generating (`decode_s`) and in the first batch
    (`first_batch_s`: with its warm-up, e.g. a graph capture or a compile)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    images = images or ImageFiles()
    limit = family.prompt_limit(bundle, settings.max_new_tokens)
    # Lengths without loading images: similar lengths share a batch so little compute goes to padding.
    order = sorted(
        range(len(rows)), key=lambda i: (len(rows[i].history), len(rows[i].query), len(rows[i].images))
    )
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]

    def prepare(i: int) -> Any:
        return family.encode_row_from(bundle, rows[i], images, limit)

    # on the CPU the generation itself wants every core: rows are prepared in turn there by default
    prefetch = family.device_of(bundle).type == "cuda" if prefetch is None else prefetch
    outputs: list[str] = [""] * len(rows)
    prepared = iter(prepared_batches(batches, prepare, prefetch))
    spent = {"prepare_wait_s": 0.0, "decode_s": 0.0, "first_batch_s": 0.0}
    for b in tqdm(range(len(batches)), desc=desc, unit="batch", leave=False):
        started = time.perf_counter()
        indices, samples = next(prepared)
        ready = time.perf_counter()
        answers = family.generate_batch(bundle, samples, settings, generator, batches=len(batches))
        done = time.perf_counter()
        spent["prepare_wait_s"] += ready - started
        spent["decode_s"] += done - ready
        if b == 0:
            spent["first_batch_s"] = done - started
        for i, text in zip(indices, answers, strict=True):
            outputs[i] = text
    if timing is not None:
        timing.update({key: round(value, 3) for key, value in spent.items()})
    return outputs
