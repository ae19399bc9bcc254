"""Batched generation over rows, and loading a model for it: what eval, infer and the `Chat` API build on.

bundle = load_inference_bundle("/models/MiniCPM-V-2", ckpt="outputs/<exp>/<time>/sft/best")
responses = generate_for_rows(bundle, rows, generation_settings({"max_new_tokens": 64}), batch_size=8)
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm.auto import tqdm

from pipeline.config import BASE_CKPT, resolve_device, resolve_dtype
from pipeline.data.images import ImageLoadError, load_image
from pipeline.data.rows import Row
from pipeline.families.minicpm_v2.bundle import ModelBundle, load_bundle
from pipeline.families.minicpm_v2.collate import Sample, collate_for_generation, encode_example
from pipeline.families.minicpm_v2.generation import GenerationSettings, generate
from pipeline.runinfo import resolve_ckpt
from pipeline.training.twin import model_folder
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
    model_path: str,
    ckpt: str | os.PathLike | None = None,
    *,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
    build_if_missing: bool = False,
    allow_download: bool = False,
    max_slice_nums: int | None = None,
    slice_mode: bool | None = None,
    family=None,
) -> ModelBundle:
    """Returns the model (base, adapter or merged checkpoint) in eval mode on `device`, with its tokenizer.

    `ckpt` may be a checkpoint folder, an earlier run folder (its sft/best, else sft/last), "base" or None
    (= the model at `model_path`). A missing folder or an adapter of another base raises CheckpointError.
    With `family` (pipeline.families) the family loads it, with its own resolution settings.
    """
    device = device if isinstance(device, torch.device) else resolve_device(str(device))
    if not isinstance(dtype, torch.dtype):
        dtype = resolve_dtype(str(dtype), device)
    if ckpt is not None and str(ckpt) != BASE_CKPT:
        # A run folder is resolved to its checkpoint; a missing path is left to load_bundle's CheckpointError.
        ckpt = resolve_ckpt(ckpt) if Path(ckpt).expanduser().exists() else Path(ckpt).expanduser()
    else:
        ckpt = None
    if family is not None:
        bundle = family.load_bundle(
            model_path,
            ckpt,
            dtype=dtype,
            device=device,
            build_if_missing=build_if_missing,
            allow_download=allow_download,
        )
    else:
        bundle = load_bundle(
            model_folder(model_path, build_if_missing),
            ckpt=ckpt,
            dtype=dtype,
            device=device,
            allow_download=allow_download,
            max_slice_nums=max_slice_nums,
            slice_mode=slice_mode,
        )
    bundle.model.eval()
    log.info("loaded %s model from %s%s", bundle.kind, bundle.base_path, f" + {ckpt}" if ckpt else "")
    return bundle


def prompt_limit(bundle: ModelBundle, settings: GenerationSettings) -> int:
    """Returns the longest prompt that leaves room for max_new_tokens within the model's positions."""
    limit = int(bundle.core.config.max_position_embeddings) - settings.max_new_tokens
    if limit < 2:
        raise ValueError(
            f"max_new_tokens={settings.max_new_tokens} leaves no room for a prompt: the model takes "
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
    """Returns the generation prompt (ending with <AI>) of a conversation; raises when it exceeds max_length."""
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
        raise ValueError(
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


def generate_for_rows(
    bundle: ModelBundle,
    rows: Sequence[Row],
    settings: GenerationSettings,
    batch_size: int,
    *,
    generator: torch.Generator | None = None,
    image_cache: Path | None = None,
    desc: str = "generate",
    prefetch: bool | None = None,
) -> list[str]:
    """Returns one generated response per row (in row order), prompting each with its query, history and image.

    Rows are batched by prompt length (left-padded). With `prefetch` (None: on a GPU) the next batches'
    images are loaded and encoded on CPU threads while the current batch generates (PREFETCH_BATCHES
    ahead); the answers are the same as one batch after the other.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    limit = prompt_limit(bundle, settings)
    tok = bundle.tokenizer
    device = bundle.core.llm.lm_head.weight.device
    # Lengths without loading images: similar lengths share a batch so little compute goes to padding.
    order = sorted(
        range(len(rows)), key=lambda i: (len(rows[i].history), len(rows[i].query), bool(rows[i].images))
    )
    outputs: list[str] = [""] * len(rows)
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]

    def prepare(i: int) -> Sample:
        row = rows[i]
        try:
            image = load_image(row.images[0], cache_dir=image_cache) if row.images else None
        except ImageLoadError as exc:
            raise ImageLoadError(f"{row.origin}: {exc}") from exc
        return encode_prompt(bundle, row.query, row.history, row.system, image, limit, where=row.origin)

    # on the CPU the generation itself wants every core: rows are prepared in turn there by default
    prefetch = device.type == "cuda" if prefetch is None else prefetch
    prepared = prepared_batches(batches, prepare, prefetch)
    for indices, samples in tqdm(prepared, total=len(batches), desc=desc, unit="batch", leave=False):
        batch = batch_to_device(collate_for_generation(samples, tok.pad_id), device)
        new = generate(
            bundle.core,
            batch["input_ids"],
            batch["attention_mask"],
            batch["pixel_values"],
            batch["image_bound"],
            settings=settings,
            eos_token_id=tok.eos_id,
            pad_token_id=tok.pad_id,
            generator=generator,
        )
        for i, ids in zip(indices, new.tolist(), strict=True):
            outputs[i] = tok.decode(response_ids(ids, tok.eos_id))
    return outputs
