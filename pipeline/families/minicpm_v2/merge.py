"""What verifies a MiniCPM-V-2 merge: seeded dummy conversations (without data), one sample's logits, and
the merged weights' keys and shapes against the base checkpoint's."""

from __future__ import annotations

import random
from pathlib import Path

import torch
from PIL import Image

from pipeline.families.base import FamilyError

from .checkpoint import read_checkpoint_shapes
from .collate import Sample, collate_for_training, encode_example
from .processor import MiniCPMVImageProcessor
from .tokenizer import MiniCPMVTokenizer

# what PEFT's wrappers leave in parameter names: none may survive a merge
LORA_MARKERS = ("lora_", "base_layer", "modules_to_save", "original_module")


def dummy_samples(
    tokenizer: MiniCPMVTokenizer, processor: MiniCPMVImageProcessor, n: int, seed: int
) -> list[Sample]:
    """Returns `n` encoded conversations about seeded noise images, for checking a merge without data."""
    rng = random.Random(seed)
    samples = []
    for i in range(n):
        # Alternate a small and a large image so that both the unsliced and the sliced paths run.
        side = 2 * processor.scale_resolution if i % 2 else processor.scale_resolution
        noise = bytes(rng.getrandbits(8) for _ in range(side * side * 3))
        image = Image.frombytes("RGB", (side, side), noise)
        sample = encode_example(
            tokenizer,
            processor,
            "Describe the image.",
            "A field of coloured noise.",
            image=image,
            max_length=1_000_000,
        )
        if sample is not None:
            samples.append(sample)
    return samples


def check_merged_keys(model: torch.nn.Module, base: Path) -> None:
    """Returns None when the merged model has exactly the base checkpoint's keys and shapes, else raises."""
    have = {k: list(v.shape) for k, v in model.state_dict().items()}
    leftover = [k for k in have if any(marker in k for marker in LORA_MARKERS)]
    if leftover:
        raise FamilyError(
            f"minicpm_v2: after merging, {len(leftover)} adapter keys remain, first: {leftover[:5]}"
        )
    want = {k: shape for k, (shape, _) in read_checkpoint_shapes(base).items()}
    missing = sorted(set(want) - set(have))
    extra = sorted(set(have) - set(want))
    wrong = [f"{k}: {have[k]} vs {want[k]}" for k in want if k in have and have[k] != want[k]]
    if missing or extra or wrong:
        raise FamilyError(
            f"minicpm_v2: merged model does not match base {base}: missing {missing[:5]}, unexpected {extra[:5]}, "
            f"shape mismatches {wrong[:5]}"
        )


def sample_logits(model: torch.nn.Module, sample: Sample, pad_id: int, device: torch.device) -> torch.Tensor:
    """Returns one sample's fp32 logits [T, vocab] on the CPU (one forward, no padding)."""
    batch = collate_for_training([sample], pad_id)
    batch.pop("labels")
    batch["input_ids"] = batch["input_ids"].to(device)
    batch["attention_mask"] = batch["attention_mask"].to(device)
    batch["image_bound"] = [b.to(device) for b in batch["image_bound"]]
    logits = model(**batch, return_logits=True).logits
    return logits[0].float().cpu()
