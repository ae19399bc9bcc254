"""The real job through the entry point: `python -m pipeline` fine-tuning the full-size MiniCPM-V-2 (random
weights, official layout) on COCO-shaped data, each setting in its own process, on one GPU, no network.

    python -m bench.entry_bench --out /tmp/entry [--settings qkv_plain qkv_default ...] [--rows 1000]
    python -m bench.entry_bench --tiny --out /tmp/entry-smoke --steps 2     # the tiny twin on the CPU

What it does, in one call:
1. writes the full-size model with random weights in the official layout (two safetensors shards, the
   tiny twin's tokenizer files, the official slicing settings) with the project's own classes; lm_head rows
   past the tokenizer's vocabulary are zeroed so that generation picks ids the tokenizer can decode, and the
   end-of-answer id's row too, so that every generated answer runs to max_new_tokens (a logit of 0 among
   random ones is never the largest);
2. generates COCO-shaped data: 640x480 JPEG photos (quality 90), one 8-16-word caption each, the query
   `please describe the image.` (source + 2 slices, about 225 tokens a row); a `mixed` variant (30% of the
   rows two or three rounds, 10% text-only), a `large` one (1344x1008 photos, source + 6 slices) and a
   `longanswer` one (the COCO photos, each answered by ~50 sentences: ~750 supervised tokens a row);
3. runs `python -m pipeline ... model=minicpm_v2 trainer=default dataset=custom stages=[sft]` per setting:
   `*_plain` is the regime ms-swift runs (batch 1 x grad-accum 16, one row per forward, gradient
   checkpointing, no compile, no data workers) and the baseline; `*_default` is trainer=default as shipped;
   then the eval and infer stages over 200 rows;
4. `FAMILY_SETTINGS` run the same job for the HF-native families (`model=qwen2_5_vl_3b`, `qwen3_vl_4b`,
   `minicpm_v4_6`) on a model written at each checkpoint's published sizes (`FAMILY_MODELS`, random bf16
   weights, native layout, the family's twin tokenizer and real image processor); their MFU comes from
   `family_row_flops`.

Columns: samples/s and real (unpadded) tokens/s (median over the steps after the first two), padding %,
MFU, peak GB (torch's max allocated), minutes per coco-en-2-mini epoch (40,504 rows less the 1% held out)
and the first losses. FLOPs of a row (written out in `row_flops`): the LLM's matmuls 2 x (params touched
per token, lm_head included) plus attention 4 x T x hidden per layer, x2 for LoRA (forward + input
gradients; frozen weights need no weight gradient) or x3 for full fine-tuning, x4/3 more with gradient
checkpointing; the vision tower and resampler per image at its own patch count (forward only when frozen,
x2 with LoRA on the tower, x3 full), all over 989 TFLOP/s (H100/H200 dense bf16).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import random
import re
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
PEAK_TFLOPS = 989.0
COCO_TRAIN_ROWS = 40_504 - max(int(40_504 * 0.01), 1)
QUERY = "please describe the image."
WORDS = (
    "a man woman child dog cat bus train plate of food on the table next to street with two three people "
    "standing sitting near large small red white black green field building sky water boat bicycle riding "
    "down road tree under holding kitchen room bed pizza giraffe elephant zebra horse grass"
).split()

# name -> (overrides, data variant, mode); `plain` is the ms-swift regime, the baseline of its mode
PLAIN = [
    "trainer.micro_batch_tokens=0",
    "trainer.num_workers=0",
    "trainer.compile=false",
    "model.vision_attention=sdpa",
    "model.fused_kernels=off",
]
SETTINGS: dict[str, tuple[list[str], str, str]] = {
    "qkv_plain": (["+experiment=lora_qkv", *PLAIN], "coco", "lora_qkv"),
    "qkv_default": (["+experiment=lora_qkv"], "coco", "lora_qkv"),
    # trainer=default's levers one at a time (compile and checkpointing auto resolve to on / off on a GPU)
    "qkv_eager": (["+experiment=lora_qkv", "trainer.compile=false"], "coco", "lora_qkv"),
    "qkv_eager_ckpt": (
        ["+experiment=lora_qkv", "trainer.compile=false", "model.gradient_checkpointing=true"],
        "coco",
        "lora_qkv",
    ),
    "qkv_ckpt": (["+experiment=lora_qkv", "model.gradient_checkpointing=true"], "coco", "lora_qkv"),
    # gradient accumulation under compile: four micro-batches of up to 1024 tokens a step
    "qkv_accum": (["+experiment=lora_qkv", "trainer.micro_batch_tokens=1024"], "coco", "lora_qkv"),
    "qkv_low_memory": (["+experiment=lora_qkv", "trainer=low_memory"], "coco", "lora_qkv"),
    # trainer=default with torch.profiler over 3 steps: the operator table lands in OUT/profiles/
    "qkv_profile": (["+experiment=lora_qkv", "trainer.profile_steps=3"], "coco", "lora_qkv"),
    "qkv_mixed_plain": (["+experiment=lora_qkv", *PLAIN], "mixed", "lora_qkv"),
    "qkv_mixed_default": (["+experiment=lora_qkv"], "mixed", "lora_qkv"),
    "qkv_mixed_eager": (["+experiment=lora_qkv", "trainer.compile=false"], "mixed", "lora_qkv"),
    "qkv_mixed_packed": (["+experiment=lora_qkv", "trainer.packing=true"], "mixed", "lora_qkv"),
    "qkv_packed": (["+experiment=lora_qkv", "trainer.packing=true"], "coco", "lora_qkv"),
    "qkv_large_plain": (["+experiment=lora_qkv", *PLAIN], "large", "lora_qkv"),
    "qkv_large_default": (["+experiment=lora_qkv"], "large", "lora_qkv"),
    "all_plain": (["+experiment=lora_all", *PLAIN], "coco", "lora_all"),
    "all_default": (["+experiment=lora_all"], "coco", "lora_all"),
    "all_eager": (["+experiment=lora_all", "trainer.compile=false"], "coco", "lora_all"),
    # without the activation checkpointing that lora=all now gets by default (out of an 80 GB H100 at step 1)
    "all_nockpt": (["+experiment=lora_all", "model.gradient_checkpointing=false"], "coco", "lora_all"),
    # the recompute's levers: no checkpointing with ~4 rows a micro-batch (MiniCPM-V-2's budget counts ~250
    # language-model tokens a row, not the tower's ~3,060 patches, whose activations are what fill the card),
    # and the vision tower's blocks checkpointed with the language model's not (model.gradient_checkpointing=
    # vision: the language model's activations are bounded by the budget)
    "all_nockpt_1k": (
        ["+experiment=lora_all", "model.gradient_checkpointing=false", "trainer.micro_batch_tokens=1024"],
        "coco",
        "lora_all",
    ),
    "all_nockpt_2k": (
        ["+experiment=lora_all", "model.gradient_checkpointing=false", "trainer.micro_batch_tokens=2048"],
        "coco",
        "lora_all",
    ),
    "all_vision_ckpt": (["+experiment=lora_all", "model.gradient_checkpointing=vision"], "coco", "lora_all"),
    "all_profile": (["+experiment=lora_all", "trainer.profile_steps=3"], "coco", "lora_all"),
    "full_plain": (["+experiment=full", *PLAIN], "coco", "full"),
    "full_default": (["+experiment=full"], "coco", "full"),
    "full_eager": (["+experiment=full", "trainer.compile=false"], "coco", "full"),
    # the language model not recomputed: its activations at 4096 tokens beside ~55 GB of fp32 weights,
    # gradients and moments (an H200; tight on 80 GB)
    "full_vision_ckpt": (["+experiment=full", "model.gradient_checkpointing=vision"], "coco", "full"),
    # no recompute at all in lora=all's 2048-token regime: ~54 GB of state beside its ~36 GB of activations (an
    # H200; over 80 GB)
    "full_nockpt_2k": (
        ["+experiment=full", "model.gradient_checkpointing=false", "trainer.micro_batch_tokens=2048"],
        "coco",
        "full",
    ),
    "full_profile": (["+experiment=full", "trainer.profile_steps=3"], "coco", "full"),
    # a share of the language model's layers recomputed (the tower's blocks and the first ones): 80 GB holds the
    # activations of some of its 40 layers beside ~54 GB of state (4096 tokens) or of more (2048)
    "full_ckpt_half": (["+experiment=full", "model.gradient_checkpointing=0.5"], "coco", "full"),
    "full_ckpt_half_2k": (
        ["+experiment=full", "model.gradient_checkpointing=0.5", "trainer.micro_batch_tokens=2048"],
        "coco",
        "full",
    ),
    "full_8bit_ckpt_quarter": (
        ["+experiment=full", "optim.name=adamw_bnb_8bit", "model.gradient_checkpointing=0.25"],
        "coco",
        "full",
    ),
    # bitsandbytes' 8-bit AdamW: ~34 GB of state instead of ~54, which auto answers with 16384-token
    # micro-batches; and the same without the recompute in lora=all's 2048-token regime
    "full_8bit": (["+experiment=full", "optim.name=adamw_bnb_8bit"], "coco", "full"),
    "full_8bit_nockpt_2k": (
        [
            "+experiment=full",
            "optim.name=adamw_bnb_8bit",
            "model.gradient_checkpointing=false",
            "trainer.micro_batch_tokens=2048",
        ],
        "coco",
        "full",
    ),
    # LoRA's variants (lora.use_dora: each adapted weight's norm in every forward; LoRA+ costs nothing)
    "qkv_dora": (["+experiment=lora_qkv", "lora.use_dora=true"], "coco", "lora_qkv"),
    "all_dora": (["+experiment=lora_all", "lora.use_dora=true"], "coco", "lora_all"),
    # an adapter started from the base weights (lora.init_weights): the decomposition before the first step
    # (its time in the run log), then the same step as LoRA's
    "all_pissa": (["+experiment=lora_all", "lora.init_weights=pissa_niter_4"], "coco", "lora_all"),
    # long answers (~12k supervised tokens a 16-row step): its own loss in chunks with the recompute (auto)
    # against its 4096-position slices kept for the backward (off)
    "qkv_longanswer": (["+experiment=lora_qkv"], "longanswer", "lora_qkv"),
    "qkv_longanswer_slices": (["+experiment=lora_qkv", "model.chunked_loss=off"], "longanswer", "lora_qkv"),
}
# HF-native families at a real checkpoint's sizes (random weights, native layout): name -> (family, overrides,
# variant). Every family x {qkv, all, full} as shipped (`_default`) and in ms-swift's regime (`_plain`), and
# for LoRA-qkv each speed lever switched off alone (the lever's one switch), a profile, and transformers'
# vision attention.
HF_FAMILIES = ("qwen2_5_vl", "qwen3_vl", "minicpm_v4_6")
EXPERIMENTS = {"qkv": "lora_qkv", "all": "lora_all", "full": "full"}
LEVERS_OFF = {
    "nopack": ["trainer.packing=false"],  # padding-free packing (and so compile) off; liger on (auto)
    "nocompile": ["trainer.compile=false"],  # packed rows, eager layers, liger's fused norms and MLPs (auto)
    "eager": ["trainer.compile=false", "model.fused_kernels=off"],  # packed rows, transformers' modules
    "tokens": ["trainer.patch_weight=0"],  # the budget counts language-model tokens only
    "sdpa": ["model.vision_attention=sdpa"],
    "profile": ["trainer.profile_steps=3"],
}
# the vision blocks eager beside compiled decoder layers (trainer.compile_vision's switch)
NO_VISION_COMPILE = {"novisioncompile": ["trainer.compile_vision=false"]}
# token budgets given: 16384 (auto's choice for LoRA on 80 GB cards: one micro-batch of a 16-row step, fewer
# launches per sample; the 2026-12-05 Qwen2.5-VL profile was launch-bound) and 4096 (auto's on smaller cards)
# and 65536 (MiniCPM-V 4.6: its 16 rows of ~3,900 vision patches each in one micro-batch rather than four; its
# step is bound by fla's per-call host work, 18 layers x each micro-batch)
BUDGETS = {
    "budget16k": ["trainer.micro_batch_tokens=16384"],
    "budget4k": ["trainer.micro_batch_tokens=4096"],
    "budget64k": ["trainer.micro_batch_tokens=65536"],
}
FAMILY_LEVERS_OFF = {
    # packed where fla does not run (auto leaves 4.6 padded there): compiled layers around the linear-attention
    # layers' PyTorch code on a padded batch of the row's samples
    "minicpm_v4_6": {
        "torchla": ["model.linear_attention=torch"],
        "packed": ["trainer.packing=true"],
        **NO_VISION_COMPILE,
    },
    "qwen2_5_vl": NO_VISION_COMPILE,
    "qwen3_vl": NO_VISION_COMPILE,
}


def _family_settings() -> dict[str, tuple[str, list[str], str]]:
    settings = {}
    for family in HF_FAMILIES:
        for short, experiment in EXPERIMENTS.items():
            settings[f"{family}_{short}_plain"] = (family, [f"+experiment={experiment}", *PLAIN], "coco")
            settings[f"{family}_{short}_default"] = (family, [f"+experiment={experiment}"], "coco")
        for lever, overrides in {**LEVERS_OFF, **BUDGETS, **FAMILY_LEVERS_OFF.get(family, {})}.items():
            settings[f"{family}_qkv_{lever}"] = (family, ["+experiment=lora_qkv", *overrides], "coco")
        settings[f"{family}_qkv_dora"] = (family, ["+experiment=lora_qkv", "lora.use_dora=true"], "coco")
        settings[f"{family}_all_pissa"] = (
            family,
            ["+experiment=lora_all", "lora.init_weights=pissa_niter_4"],
            "coco",
        )
        settings[f"{family}_full_8bit"] = (family, ["+experiment=full", "optim.name=adamw_bnb_8bit"], "coco")
        # half of the language model's layers recomputed rather than all (model.gradient_checkpointing=0.5)
        settings[f"{family}_full_ckpt_half"] = (
            family,
            ["+experiment=full", "model.gradient_checkpointing=0.5"],
            "coco",
        )
        # long answers (~12k supervised tokens a 16-row step): the loss in chunks (auto) against one piece
        # (their rows, ~2,050 tokens with the image's, pass the default dataset.max_length of 2048)
        long = ["+experiment=lora_qkv", "dataset.max_length=4096"]
        settings[f"{family}_qkv_longanswer"] = (family, long, "longanswer")
        settings[f"{family}_qkv_longanswer_onepiece"] = (
            family,
            [*long, "model.chunked_loss=off"],
            "longanswer",
        )
        # a trained tower's recompute only (model.gradient_checkpointing=vision), against `_default`'s every
        # block; and the profile of each
        for short in ("all", "full"):
            experiment = f"+experiment={EXPERIMENTS[short]}"
            settings[f"{family}_{short}_vision_ckpt"] = (
                family,
                [experiment, "model.gradient_checkpointing=vision"],
                "coco",
            )
            settings[f"{family}_{short}_profile"] = (family, [experiment, *LEVERS_OFF["profile"]], "coco")
            # the budget of a trained tower: larger (auto gives full fine-tuning 4096, and MiniCPM-V 4.6's rows,
            # ~3,250 patches at its patch weight, then run one a micro-batch) or counting tokens only
            for lever in ("budget16k", "budget64k"):
                settings[f"{family}_{short}_{lever}"] = (family, [experiment, *BUDGETS[lever]], "coco")
            settings[f"{family}_{short}_tokens"] = (family, [experiment, *LEVERS_OFF["tokens"]], "coco")
            # the trained tower's blocks compiled (MiniCPM-V 4.6's auto leaves them eager: measured no faster
            # frozen, under LoRA-qkv, where they run forward only; trained, they run forward, recompute and
            # backward, with LoRA in every linear)
            settings[f"{family}_{short}_vision_compiled"] = (
                family,
                [experiment, "trainer.compile_vision=true"],
                "coco",
            )
        # a trained tower without the recompute in micro-batches that bound its activations (MiniCPM-V-2's
        # lora=all auto regime since it measured 1.28x its checkpointed step: Capabilities.
        # trained_tower_budget); these families' budgets count the tower's patches too (trainer.patch_weight).
        # Full fine-tuning too, where its state leaves the room (MiniCPM-V 4.6: ~21 GB of fp32 state)
        for short, (lever, budget) in itertools.product(
            ("all", "full"), (("nockpt_4k", 4096), ("nockpt_8k", 8192))
        ):
            settings[f"{family}_{short}_{lever}"] = (
                family,
                [
                    f"+experiment={EXPERIMENTS[short]}",
                    "model.gradient_checkpointing=false",
                    f"trainer.micro_batch_tokens={budget}",
                ],
                "coco",
            )
        # full fine-tuning's fp32 weights with transformers' vision attention (auto's choice for them until
        # it resolved by the compute dtype), against `_full_default`'s variable-length kernel
        settings[f"{family}_full_sdpa"] = (family, ["+experiment=full", *LEVERS_OFF["sdpa"]], "coco")
    return settings


FAMILY_SETTINGS: dict[str, tuple[str, list[str], str]] = _family_settings()
# QLoRA (issue rows): Qwen2.5-VL-7B LoRA-qkv on a 4-bit base in trainer=low_memory against the bf16 base in the
# same regime, and the 3B's nf4 row beside its bf16 default
FAMILY_OF = {"qwen2_5_vl_7b": "qwen2_5_vl"}
LOW_MEMORY = ["+experiment=lora_qkv", "trainer=low_memory"]
FAMILY_SETTINGS.update(
    {
        "qwen2_5_vl_7b_qkv_nf4": ("qwen2_5_vl_7b", [*LOW_MEMORY, "model.quantization=nf4"], "coco"),
        # the 4-bit base compiled (trainer.compile=true: auto leaves quantized runs eager until timed) and with
        # 4096-token micro-batches (its weights dequantized 4x less often a step than at low_memory's 1024)
        "qwen2_5_vl_7b_qkv_nf4_compiled": (
            "qwen2_5_vl_7b",
            [*LOW_MEMORY, "model.quantization=nf4", "trainer.compile=true"],
            "coco",
        ),
        "qwen2_5_vl_7b_qkv_nf4_4k": (
            "qwen2_5_vl_7b",
            [*LOW_MEMORY, "model.quantization=nf4", "trainer.micro_batch_tokens=4096"],
            "coco",
        ),
        "qwen2_5_vl_7b_qkv_bf16": ("qwen2_5_vl_7b", LOW_MEMORY, "coco"),
        "qwen2_5_vl_qkv_nf4": ("qwen2_5_vl", ["+experiment=lora_qkv", "model.quantization=nf4"], "coco"),
    }
)


def experiment_of(overrides: list[str]) -> str:
    """Returns a setting's experiment (lora_qkv, lora_all or full) from its overrides."""
    return next(o.split("=", 1)[1] for o in overrides if o.startswith("+experiment="))


# every sft run of the script: one log line a step, no evaluation or checkpoint inside the measured steps; the
# final checkpoint (after them) without the optimizer's state: Qwen3-VL-4B full fine-tuning's, with AdamW's
# moments (~53 GB), did not fit the GPU machine's 64 GiB disk beside the models (2026-12-06)
COMMON = [
    "trainer=default",
    "dataset=custom",
    "tracking=none",
    "trainer.logging_steps=1",
    "trainer.eval_steps=100000",
    "trainer.save_steps=100000",
    "trainer.max_eval_samples=16",
    "trainer.save_only_model=true",
]
STAGE_SETTINGS = ("eval_base", "infer_base", "infer_load")
DEFAULT_SETTINGS = ("qkv_plain", "qkv_default", "all_plain", "all_default", "full_plain", "full_default")


# ----- the model folder
def write_model(folder: Path, tiny: bool) -> Path:
    """Writes the full-size model (random bf16 weights, official layout) or the tiny twin; returns it."""
    from pipeline.families.checkpoints import DEFAULT_SHARD_BYTES, MODEL_CONFIG
    from pipeline.families.minicpm_v2.checkpoint import save_checkpoint
    from pipeline.families.minicpm_v2.configuration import MiniCPMVConfig
    from pipeline.families.minicpm_v2.modeling import MiniCPMV
    from pipeline.families.minicpm_v2.processor import MiniCPMVImageProcessor
    from pipeline.families.minicpm_v2.tiny import build_tiny_twin
    from pipeline.families.minicpm_v2.tokenizer import train_tiny_tokenizer

    if (folder / MODEL_CONFIG).is_file():
        return folder
    if tiny:
        return build_tiny_twin(folder)
    tokens = folder.with_name(folder.name + "-tokenizer")
    tokenizer = train_tiny_tokenizer(tokens)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        model = MiniCPMV(MiniCPMVConfig()).to(torch.bfloat16)
    with torch.no_grad():
        model.llm.lm_head.weight[tokenizer.vocab_size :] = 0
        model.llm.lm_head.weight[tokenizer.eos_id] = 0  # no answer ends early: every row makes max_new_tokens
    save_checkpoint(model, folder, max_shard_bytes=DEFAULT_SHARD_BYTES, source_folder=tokens)
    MiniCPMVImageProcessor().save_pretrained(folder)
    del model
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return folder


def _qwen_text(end: int, pad: int, **sizes) -> dict:
    return dict(vocab_size=151936, tie_word_embeddings=True, eos_token_id=end, pad_token_id=pad, **sizes)


def _qwen2_5_vl_3b(tokenizer, end: int):
    """Qwen2.5-VL-3B-Instruct's published sizes (3.75 B parameters) and its image processor."""
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    text = _qwen_text(
        end, tokenizer.pad_token_id, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
        num_attention_heads=16, num_key_value_heads=2, max_position_embeddings=128000,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
    )  # fmt: skip
    vision = dict(
        depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14, spatial_merge_size=2,
        temporal_patch_size=2, window_size=112, out_hidden_size=2048, fullatt_block_indexes=[7, 15, 23, 31],
    )  # fmt: skip
    sizes = dict(patch_size=14, temporal_patch_size=2, merge_size=2)
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(min_pixels=3136, max_pixels=12845056, **sizes),
        video_processor=Qwen2VLVideoProcessor(**sizes),
        tokenizer=tokenizer,
    )
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **tiny_ids(tokenizer)), processor


def _qwen2_5_vl_7b(tokenizer, end: int):
    """Qwen2.5-VL-7B-Instruct's published sizes (8.3 B parameters: Qwen2.5-7B's language model, the 3B's vision
    tower projecting to 3584) and its image processor (QLoRA's bench rows)."""
    from transformers import Qwen2_5_VLConfig

    config, processor = _qwen2_5_vl_3b(tokenizer, end)
    text = _qwen_text(
        end, tokenizer.pad_token_id, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
        num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=128000,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
    )  # fmt: skip
    vision = config.vision_config.to_dict()
    vision["out_hidden_size"] = 3584
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **tiny_ids(tokenizer)), processor


def _qwen3_vl_4b(tokenizer, end: int):
    """Qwen3-VL-4B-Instruct's sizes (Qwen3-4B's language model; a 24-layer, 1024-wide tower with patch 16
    and deepstack from layers 5, 11, 17) and its image processor."""
    from transformers import Qwen2VLImageProcessor, Qwen3VLConfig, Qwen3VLProcessor, Qwen3VLVideoProcessor

    text = _qwen_text(
        end, tokenizer.pad_token_id, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=262144,
        rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": [24, 20, 20],
                         "mrope_interleaved": True},
    )  # fmt: skip
    vision = dict(
        depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, patch_size=16, spatial_merge_size=2,
        temporal_patch_size=2, out_hidden_size=2560, num_position_embeddings=2304,
        deepstack_visual_indexes=[5, 11, 17],
    )  # fmt: skip
    sizes = dict(patch_size=16, temporal_patch_size=2, merge_size=2)
    processor = Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessor(min_pixels=4096, max_pixels=16777216, **sizes),
        video_processor=Qwen3VLVideoProcessor(**sizes),
        tokenizer=tokenizer,
    )
    return Qwen3VLConfig(text_config=text, vision_config=vision, **tiny_ids(tokenizer)), processor


def _minicpm_v4_6(tokenizer, end: int):
    """MiniCPM-V 4.6 as published (1.3 B parameters: SigLIP2-400M and Qwen3.5-0.8B): a 27-layer, 1152-wide
    tower with patch 14 and the window merger after layer 6; a 24-layer, 1024-wide hybrid language model
    (three linear-attention layers to one full-attention layer), and the family's image processor at the
    real slicing (448 px, up to 9 slices)."""
    from transformers import MiniCPMV4_6Config
    from transformers.models.minicpmv4_6 import MiniCPMV4_6ImageProcessor, MiniCPMV4_6Processor
    from transformers.models.minicpmv4_6.video_processing_minicpmv4_6 import MiniCPMV4_6VideoProcessor

    text = dict(
        model_type="qwen3_5_text", vocab_size=248320, hidden_size=1024, intermediate_size=3584,
        num_hidden_layers=24, num_attention_heads=8, num_key_value_heads=2, head_dim=256,
        linear_num_key_heads=16, linear_num_value_heads=16, linear_key_head_dim=128, linear_value_head_dim=128,
        linear_conv_kernel_dim=4, max_position_embeddings=262144, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.25,
                         "mrope_section": [11, 11, 10], "mrope_interleaved": True},
        eos_token_id=end, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    vision = dict(
        hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
        image_size=980, patch_size=14, hidden_act="gelu_pytorch_tanh",
    )  # fmt: skip
    sizes = dict(patch_size=14, scale_resolution=448)
    processor = MiniCPMV4_6Processor(
        image_processor=MiniCPMV4_6ImageProcessor(max_slice_nums=9, **sizes),
        video_processor=MiniCPMV4_6VideoProcessor(max_slice_nums=1, **sizes),
        tokenizer=tokenizer,
    )
    config = MiniCPMV4_6Config(
        text_config=text, vision_config=vision, image_token_id=tokenizer.image_token_id,
        video_token_id=tokenizer.video_token_id, image_size=448, insert_layer_id=6, tie_word_embeddings=True,
    )  # fmt: skip
    return config, processor


def tiny_ids(tokenizer) -> dict:
    from pipeline.families.qwen_vl import tiny_token_ids

    return tiny_token_ids(tokenizer)


# family -> (its config in conf/model/, the writer of its real sizes)
FAMILY_MODELS = {
    "qwen2_5_vl": ("qwen2_5_vl_3b", _qwen2_5_vl_3b),
    "qwen2_5_vl_7b": ("qwen2_5_vl_7b", _qwen2_5_vl_7b),
    "qwen3_vl": ("qwen3_vl_4b", _qwen3_vl_4b),
    "minicpm_v4_6": ("minicpm_v4_6", _minicpm_v4_6),
}


def write_family_model(folder: Path, family_name: str, tiny: bool) -> Path:
    """Writes an HF-native family's model at a real checkpoint's sizes (random bf16 weights, native layout)
    with the family's offline twin tokenizer and the real image processor; or its tiny twin."""
    from transformers import AutoModelForImageTextToText

    from pipeline.families import get_family
    from pipeline.families.checkpoints import MODEL_CONFIG
    from pipeline.families.tiny_tokenizer import train_bpe_tokenizer

    family = get_family(FAMILY_OF.get(family_name, family_name))
    if (folder / MODEL_CONFIG).is_file():
        return folder
    if tiny:
        return family.build_tiny(folder)
    tokenizer = train_bpe_tokenizer(
        family.tiny_special_tokens, family.tiny_extra_special_tokens, family.tiny_added_tokens
    )
    end = tokenizer.convert_tokens_to_ids(family.end_of_turn)
    config, processor = FAMILY_MODELS[family_name][1](tokenizer, end)
    processor.chat_template = family.chat_template
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16)
    model.generation_config.eos_token_id = end
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    with torch.no_grad():  # generation picks ids the tokenizer can decode, never the end of a turn
        model.get_output_embeddings().weight[len(tokenizer) :] = 0
        model.get_output_embeddings().weight[end] = 0
    family.save(model.eval(), processor, folder)
    del model
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return folder


# ----- COCO-shaped data
def _photo(args: tuple[Path, int, int, int]) -> str:
    """Writes one photo-like JPEG (smooth colour fields plus grain: realistic size and decode cost)."""
    from PIL import Image, ImageFilter

    path, width, height, seed = args
    rng = random.Random(seed)
    small = Image.new("RGB", (8, 6))
    small.putdata([tuple(rng.randrange(256) for _ in range(3)) for _ in range(48)])
    image = small.resize((width, height), Image.BICUBIC)
    grain = Image.effect_noise((width, height), 24).convert("RGB")
    image = Image.blend(image, grain, 0.25).filter(ImageFilter.SMOOTH)
    image.save(path, quality=90)
    return str(path)


def _caption(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 16))) + "."


def write_data(folder: Path, variant: str, rows: int, tiny: bool) -> Path:
    """Writes `rows` COCO-shaped rows (and their JPEGs) for a data variant; returns the jsonl path."""
    path = folder / f"{variant}.jsonl"
    if path.is_file():
        return path
    size = {"coco": (640, 480), "mixed": (640, 480), "large": (1344, 1008), "longanswer": (640, 480)}[variant]
    if tiny:  # the twin slices at 112 px: the same slice counts at a quarter of the side
        size = (size[0] // 4, size[1] // 4)
    images = folder / f"images-{variant}"
    images.mkdir(parents=True, exist_ok=True)
    jobs = [(images / f"{i:06d}.jpg", *size, i) for i in range(rows)]
    with ProcessPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:
        paths = list(pool.map(_photo, jobs, chunksize=16))
    rng = random.Random(0)
    lines = []
    for image in paths:
        row = {"query": QUERY, "response": _caption(rng), "images": [image]}
        if variant == "longanswer":  # a detailed description: ~50 sentences, ~750 supervised tokens a row
            row["response"] = " ".join(_caption(rng) for _ in range(50))
        if variant == "mixed":
            draw = rng.random()
            if draw < 0.1:  # text-only
                row = {"query": "what does this sentence say: " + _caption(rng), "response": _caption(rng)}
            elif draw < 0.4:  # two or three rounds about the image
                row["history"] = [[QUERY, _caption(rng)] for _ in range(rng.randint(1, 2))]
                row["query"] = "and what else is there?"
        lines.append(json.dumps(row))
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.rename(path)
    return path


# ----- FLOPs of a row
def recompute_factors(checkpointing: bool | str) -> tuple[float, float]:
    """Returns the (language model, vision tower) FLOP factors of a run's activation checkpointing: 4/3 for
    a part whose blocks are recomputed (True: both; "vision": the tower only), else 1."""
    return (4 / 3 if checkpointing is True else 1.0, 4 / 3 if checkpointing else 1.0)


def row_flops(config, rows: list[dict], mode: str, checkpointing: bool | str, tokenizer, processor) -> float:
    """Returns the mean training FLOPs of the given rows (see the module docstring)."""
    from PIL import Image

    from pipeline.families.minicpm_v2.collate import encode_example

    core_params = _param_counts(config)
    h, layers = config.hidden_size, config.num_hidden_layers
    total = 0.0
    for row in rows:
        image = Image.open(row["images"][0]).convert("RGB") if row.get("images") else None
        sample = encode_example(
            tokenizer, processor, row["query"], row["response"], history=row.get("history", []), image=image
        )
        t = len(sample.input_ids)
        fwd = 2 * core_params["llm"] + 4 * t * h * layers  # per token
        llm = t * fwd * (3 if mode == "full" else 2)
        vision = 0.0
        for pixels in sample.pixel_values:
            patches = math.ceil(pixels.shape[-2] / config.patch_size) * math.ceil(
                pixels.shape[-1] / config.patch_size
            )
            vfwd = (
                2 * patches * core_params["tower"]
                + 4 * patches * patches * core_params["tower_width"] * core_params["tower_depth"]
            )
            vfwd += 2 * patches * core_params["kv"] + 2 * config.query_num * core_params["resampler"]
            vfwd += 4 * config.query_num * patches * h
            vision += vfwd * {"lora_qkv": 1, "lora_all": 2, "full": 3}[mode]
        llm_factor, vision_factor = recompute_factors(checkpointing)
        total += llm * llm_factor + vision * (vision_factor if mode != "lora_qkv" else 1.0)
    return total / max(len(rows), 1)


def _param_counts(config) -> dict:
    from pipeline.families.minicpm_v2.modeling import MiniCPMV

    with torch.device("meta"):
        model = MiniCPMV(config)

    def linear(module):
        return sum(m.weight.numel() for m in module.modules() if isinstance(m, torch.nn.Linear))

    attn_in = 3 * model.resampler.attn.embed_dim**2  # the packed in-projection is no nn.Linear
    return {
        "llm": linear(model.llm),  # every decoder linear plus lm_head
        "tower": linear(model.vpm) + model.vpm.patch_embed.proj.weight.numel(),
        "tower_width": model.vpm.embed_dim,
        "tower_depth": len(model.vpm.blocks),
        "kv": linear(model.resampler.kv_proj),
        "resampler": linear(model.resampler) - linear(model.resampler.kv_proj) + attn_in,
    }


# (language model, vision tower) passes per token: forward 1, input gradients 1, weight gradients 1 (LoRA's own
# weight gradients are negligible); a frozen tower without LoRA runs forward only
PASSES = {"lora_qkv": (2, 1), "lora_all": (2, 2), "full": (3, 3)}


def family_row_flops(
    family, config, processor, rows: list[dict], checkpointing: bool | str, mode: str = "lora_qkv"
) -> float:
    """Returns the mean training FLOPs of the rows for an HF-native family under `mode` (lora_qkv, lora_all,
    full): the language model's linears 2 x params per token plus full-attention layers 4 x T x (heads x
    head_dim) per token, x its passes (PASSES: 2 for LoRA, forward and input gradients; 3 for full), x4/3
    with checkpointing; lm_head 2 x vocab x hidden x the passes on the supervised tokens only (the positions
    it computes); the vision tower's and projector's linears 2 x params per patch x theirs (forward only
    under LoRA-qkv, frozen). Linear-attention recurrences and vision attention are left out: an
    underestimate."""
    from PIL import Image
    from transformers import AutoModelForImageTextToText

    from pipeline.families.base import IGNORE_INDEX, messages_from_row

    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    groups = family.freeze_groups()

    def linear(prefixes) -> int:
        prefixes = tuple(prefixes)
        return sum(
            m.weight.numel()
            for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and n.startswith(prefixes) and n != "lm_head"
        )

    llm_passes, vision_passes = PASSES[mode]
    text = config.get_text_config()
    llm = linear(p for p in groups.llm if p != "lm_head")
    vision = linear(groups.vision) + linear(p for p in groups.projector if not p.startswith(groups.vision))
    kinds = getattr(text, "layer_types", None) or ["full_attention"] * text.num_hidden_layers
    full_layers = sum(kind == "full_attention" for kind in kinds)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    width = text.num_attention_heads * head_dim
    head = 2 * text.vocab_size * text.hidden_size
    total = 0.0
    for row in rows:
        images = [Image.open(path).convert("RGB") for path in row.get("images", [])]
        conversation = messages_from_row(row["query"], row["response"], row.get("history", []))
        sample = family.encode(processor, conversation, images)
        t = len(sample.input_ids)
        supervised = sum(label != IGNORE_INDEX for label in sample.labels)
        per_token = 2 * llm + 4 * t * width * full_layers
        recompute, vision_recompute = recompute_factors(checkpointing)
        step = llm_passes * (t * per_token + supervised * head) * recompute
        sizes = sample.pixel_inputs.get("image_grid_thw", sample.pixel_inputs.get("target_sizes"))
        patches = int(sizes.prod(-1).sum()) if sizes is not None else 0
        total += step + 2 * vision * patches * vision_passes * (
            vision_recompute if vision_passes > 1 else 1.0
        )
    return total / max(len(rows), 1)


def family_flops(
    family_name: str, folder: Path, rows: list[dict], checkpointing: bool | str, mode: str = "lora_qkv"
) -> float:
    """`family_row_flops` for the model folder of an HF-native family."""
    from transformers import AutoConfig, AutoProcessor

    from pipeline.families import get_family

    family = get_family(FAMILY_OF.get(family_name, family_name))
    config, processor = AutoConfig.from_pretrained(folder), AutoProcessor.from_pretrained(folder)
    return family_row_flops(family, config, processor, rows, checkpointing, mode)


# ----- one setting, in its own process
def planned_checkpointing(log: str) -> bool | str | None:
    """Returns model.gradient_checkpointing as a run's training plan resolved it, read from its log line
    (TrainingPlan.describe); None where the log has no plan."""
    from pipeline.training.plan import checkpointing_text

    names = {checkpointing_text(value): value for value in (True, False, "vision")}
    found = re.search("gradient checkpointing: (" + "|".join(map(re.escape, names)) + ")", log)
    return names[found.group(1)] if found else None


def run_family_setting(
    name: str, work: Path, rows: Path, steps: int, tiny: bool, timeout: int, log_file: Path
) -> dict:
    """Runs one `FAMILY_SETTINGS` setting through the entry point on the family's model folder under `work`
    (written when absent) and `rows`; returns its result row (`sft_metrics` with the family's FLOPs)."""
    family, overrides, variant = FAMILY_SETTINGS[name]
    folder = write_family_model(work / f"{family}_random", family, tiny)
    model = f"model={FAMILY_OF.get(family, family)}_tiny" if tiny else f"model={FAMILY_MODELS[family][0]}"
    cpu = ["device=cpu"] if tiny else []
    sft_args = [model, f"model.path={folder}", *cpu, *COMMON, *overrides, *sft_run(rows, steps)]
    sample_rows = [json.loads(line) for line in rows.read_text().splitlines()[:64]]
    mode = experiment_of(overrides)
    run_dir = work / "runs" / name
    result = run_pipeline(name, sft_args, run_dir, log_file, timeout)
    # none where the run stopped before its plan was logged: then it has no steps to count
    checkpointing = result.get("checkpointing")
    flops = None if checkpointing is None else family_flops(family, folder, sample_rows, checkpointing, mode)
    result.update(mode=f"{family}/{mode}", data=variant, flops_per_row=flops, **sft_metrics(run_dir, flops))
    return result


def sft_run(rows: Path, steps: int) -> list[str]:
    """Returns the overrides of a setting's sft-only run over `rows`."""
    return [f"dataset.path={rows}", "stages=[sft]", f"trainer.max_steps={steps}"]


def run_pipeline(name: str, overrides: list[str], run_dir: Path, log_file: Path, timeout: int) -> dict:
    if run_dir.exists():
        shutil.rmtree(run_dir)
    command = [sys.executable, "-m", "pipeline", *overrides, f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    env["WANDB_MODE"] = "disabled"
    started = time.perf_counter()
    try:
        proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        rc, out = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        rc, out = (
            124,
            (exc.stdout or b"").decode(errors="replace") + (exc.stderr or b"").decode(errors="replace"),
        )
    wall = time.perf_counter() - started
    # one file for every setting: a device call returns few files
    with log_file.open("a") as f:
        f.write(f"===== {name} (rc {rc}, {wall:.0f} s)\n" + " ".join(command) + "\n\n" + out + "\n")
    result = {"setting": name, "rc": rc, "wall_s": round(wall, 1)}
    planned = planned_checkpointing(out)
    if planned is not None:  # what the run's training plan resolved, for its FLOPs
        result["checkpointing"] = planned
    if rc != 0:
        result["error"] = out.strip().splitlines()[-1] if out.strip() else "no output"
    run_json = run_dir / "run.json"
    if run_json.is_file():
        result["stage_seconds"] = json.loads(run_json.read_text()).get("stage_seconds")
    return result


def drop_checkpoints(run_dir: Path) -> None:
    """Deletes a measured run's checkpoints, the partial one of a run its time limit stopped mid-save
    included: a full fine-tuning checkpoint of MiniCPM-V-2 (fp32 weights and Adam's moments) is some 40 GB,
    and two of them fill the GPU machine's 64 GiB disk (2026-12-06: Qwen2.5-VL-3B's and Qwen3-VL-4B's, cut
    while saving, left theirs and the next three settings failed writing their own)."""
    sft = run_dir / "sft"
    for folder in sorted([*sft.glob("checkpoint-*"), *sft.glob(".tmp-checkpoint-*")]):
        shutil.rmtree(folder, ignore_errors=True)


def sft_metrics(run_dir: Path, flops: float) -> dict:
    log = run_dir / "sft" / "logging.jsonl"
    if not log.is_file():
        return {}
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    steps = [r for r in records if "loss" in r]
    steady = steps[2:] or steps[-1:]
    if not steady:
        return {}
    samples = statistics.median(r["samples_per_s"] for r in steady)
    out = {
        "steps": len(steps),
        "samples_per_s": round(samples, 2),
        "tokens_per_s": round(statistics.median(r["tokens_per_s"] for r in steady)),
        "padding_pct": round(statistics.median(r.get("padding_pct", 0.0) for r in steady), 1),
        "micro_batches": statistics.median(r.get("micro_batches", 0) for r in steady),
        # the share of the steps' time the loop waited on the data loader (an input-bound row: more workers)
        "data_wait_pct": round(statistics.median(r.get("data_wait_pct", 0.0) for r in steady), 1),
        "mfu_pct": round(100 * samples * flops / (PEAK_TFLOPS * 1e12), 1) if flops else None,
        "epoch_minutes": round(COCO_TRAIN_ROWS / samples / 60, 1),
        "first_losses": [round(r["loss"], 4) for r in steps[:3]],
    }
    if "compiled_graphs" in steps[-1]:  # torch.compile's work: whole graphs, or graphs broken into pieces
        out.update(compiled_graphs=steps[-1]["compiled_graphs"], graph_breaks=steps[-1]["graph_breaks"])
    summary = run_dir / "sft" / "summary.json"
    if summary.is_file():
        out["peak_gb"] = json.loads(summary.read_text()).get("peak_memory_gb")
    elif steps and "memory_gb" in steps[-1]:  # a run cut by its time limit: the peak of its last logged step
        out["peak_gb"] = round(max(r.get("memory_gb", 0.0) for r in steps), 2)
        out["peak_of_steps"] = len(steps)
    return out


def run_info(**extra: object) -> dict:
    """What a bench call's results record of where they were measured: date, device, versions, command."""
    info = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(0)
        if torch.cuda.is_available()
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "command": " ".join(sys.argv),
        **extra,
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/entry-bench")))
    parser.add_argument("--work", type=Path, default=None, help="model and data folder (default: --out/work)")
    parser.add_argument(
        "--settings",
        nargs="*",
        default=list(DEFAULT_SETTINGS),
        help=", ".join([*SETTINGS, *FAMILY_SETTINGS, *STAGE_SETTINGS]),
    )
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps of a default setting")
    parser.add_argument("--plain-steps", type=int, default=4, help="optimizer steps of a plain setting")
    parser.add_argument("--stage-rows", type=int, default=200, help="rows for the eval and infer stages")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per setting")
    parser.add_argument(
        "--tiny", action="store_true", help="the tiny twin on the CPU: a smoke run of this script"
    )
    args = parser.parse_args()
    known = [*SETTINGS, *FAMILY_SETTINGS, *STAGE_SETTINGS]
    unknown = sorted(set(args.settings) - set(known))
    if unknown:
        parser.error(f"unknown setting(s) {unknown}; known: {', '.join(known)}")

    out = args.out
    work = args.work or out / "work"
    out.mkdir(parents=True, exist_ok=True)
    log_file = out / "entry_logs.txt"
    log_file.write_text("")
    t0 = time.perf_counter()
    model_dir = write_model(work / ("tiny" if args.tiny else "minicpm_v2_random"), args.tiny)
    print(f"model ready in {time.perf_counter() - t0:.0f} s: {model_dir}", flush=True)
    variants = (
        {SETTINGS[s][1] for s in args.settings if s in SETTINGS}
        | ({FAMILY_SETTINGS[s][2] for s in args.settings if s in FAMILY_SETTINGS})
        | ({"coco"} if set(args.settings) & set(STAGE_SETTINGS) else set())
    )
    data = {v: write_data(work, v, args.rows, args.tiny) for v in sorted(variants)}
    print(f"data ready in {time.perf_counter() - t0:.0f} s", flush=True)

    from pipeline.families.minicpm_v2.configuration import MiniCPMVConfig
    from pipeline.families.minicpm_v2.processor import MiniCPMVImageProcessor
    from pipeline.families.minicpm_v2.tokenizer import MiniCPMVTokenizer

    config = MiniCPMVConfig.from_pretrained(model_dir)
    tokenizer = MiniCPMVTokenizer.from_pretrained(model_dir)
    processor = MiniCPMVImageProcessor.from_pretrained(model_dir)

    base = [
        "model=minicpm_v2_tiny" if args.tiny else "model=minicpm_v2",
        f"model.path={model_dir}",
        *(["device=cpu"] if args.tiny else []),
        *COMMON,
    ]
    results = []
    for name in args.settings:
        run_dir = work / "runs" / name
        if name in SETTINGS:
            overrides, variant, mode = SETTINGS[name]
            steps = args.plain_steps if "plain" in name else args.steps
            sample_rows = [json.loads(line) for line in data[variant].read_text().splitlines()[:64]]
            sft_args = [*base, *overrides, *sft_run(data[variant], steps)]
            result = run_pipeline(name, sft_args, run_dir, log_file, args.timeout)
            checkpointing = result.get("checkpointing")
            flops = (
                None
                if checkpointing is None
                else row_flops(config, sample_rows, mode, checkpointing, tokenizer, processor)
            )
            result.update(mode=mode, data=variant, flops_per_row=flops, **sft_metrics(run_dir, flops))
        elif name in FAMILY_SETTINGS:
            steps = args.plain_steps if "plain" in name else args.steps
            variant = FAMILY_SETTINGS[name][2]
            result = run_family_setting(name, work, data[variant], steps, args.tiny, args.timeout, log_file)
        else:
            rows = args.stage_rows if name != "infer_load" else 1
            stage = name.split("_")[0]
            extra = (
                [
                    f"eval.max_samples={rows}",
                    "eval.batch_size=16",
                    "eval.max_new_tokens=64",
                    "dataset.test_ratio=0.2",
                ]
                if stage == "eval"
                else [
                    f"infer.input={data['coco']}",
                    f"infer.max_samples={rows}",
                    "infer.batch_size=16",
                    "infer.max_new_tokens=64",
                    "infer.stream=false",
                ]
            )
            result = run_pipeline(
                name,
                [
                    *base,
                    "+experiment=lora_qkv",
                    f"dataset.path={data['coco']}",
                    f"stages=[{stage}]",
                    "ckpt=base",
                    *extra,
                ],
                run_dir,
                log_file,
                args.timeout,
            )
            result.update(stage_metrics(run_dir, stage, tokenizer))
        ops = run_dir / "sft" / "profile" / "ops.txt"
        if ops.is_file():  # the operator table comes back with the results (the timeline stays: large)
            (out / "profiles").mkdir(exist_ok=True)
            shutil.copyfile(ops, out / "profiles" / f"{name}.txt")
            result["profile"] = f"profiles/{name}.txt"
        drop_checkpoints(run_dir)
        results.append(result)
        print(json.dumps(result), flush=True)
        # written after every setting: a call cut short keeps what it measured
        (out / "entry_results.partial.json").write_text(json.dumps(results, indent=2) + "\n")

    add_speedups(results)
    info = run_info(rows=args.rows)
    (out / "entry_results.json").write_text(json.dumps({"info": info, "results": results}, indent=2) + "\n")
    table = markdown(results)
    (out / "entry_results.md").write_text(table + "\n")
    print(json.dumps(info))
    print(table)
    if any(r["rc"] != 0 for r in results):
        sys.exit(1)


def stage_metrics(run_dir: Path, stage: str, tokenizer) -> dict:
    seconds = (
        (json.loads((run_dir / "run.json").read_text()).get("stage_seconds") or {}).get(stage)
        if (run_dir / "run.json").is_file()
        else None
    )
    if stage == "eval":
        preds = run_dir / "eval" / "predictions.jsonl"
    else:
        preds = run_dir / "infer" / "results.jsonl"
    if not preds.is_file() or not seconds:
        return {}
    rows = [json.loads(line) for line in preds.read_text().splitlines() if line.strip()]
    new_tokens = sum(len(tokenizer.encode(str(r.get("response", "")))) for r in rows)
    return {
        "rows": len(rows),
        "stage_s": round(seconds, 1),
        "rows_per_s": round(len(rows) / seconds, 2),
        "new_tokens": new_tokens,
        "new_tokens_per_s": round(new_tokens / seconds, 1),
    }


def add_speedups(results: list[dict]) -> None:
    """Adds `speedup` (samples/s over the plain setting of the same mode and data, same run)."""
    plain = {(r.get("mode"), r.get("data")): r for r in results if r["setting"].endswith("_plain")}
    for r in results:
        ref = plain.get((r.get("mode"), r.get("data")))
        if ref and r is not ref and ref.get("samples_per_s") and r.get("samples_per_s"):
            r["speedup"] = round(r["samples_per_s"] / ref["samples_per_s"], 2)
    infer = {r["setting"]: r for r in results}
    load, full = infer.get("infer_load"), infer.get("infer_base")
    if load and full and load.get("stage_s") and full.get("stage_s") and full["stage_s"] > load["stage_s"]:
        gen = full["stage_s"] - load["stage_s"]
        full["generation_s"] = round(gen, 1)
        full["new_tokens_per_s_generation"] = round(full["new_tokens"] / gen, 1)


def markdown(results: list[dict]) -> str:
    head = (
        "| setting | data | samples/s | x plain | tokens/s | pad % | MFU % | data wait % | peak GB | min/epoch "
        "| first losses |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for r in results:
        if "mode" not in r:
            continue
        lines.append(
            f"| {r['setting']} | {r['data']} | {r.get('samples_per_s', 'fail')} | {r.get('speedup', '')} | "
            f"{r.get('tokens_per_s', '')} | {r.get('padding_pct', '')} | {r.get('mfu_pct', '')} | "
            f"{r.get('data_wait_pct', '')} | {r.get('peak_gb', '')} | {r.get('epoch_minutes', '')} | {r.get('first_losses', r.get('error', ''))} |"
        )
    stages = [r for r in results if "mode" not in r]
    if stages:
        lines += [
            "",
            "| stage | rows | stage s | rows/s | new tokens/s | new tokens/s (generation only) |",
            "|---|---|---|---|---|---|",
        ]
        for r in stages:
            lines.append(
                f"| {r['setting']} | {r.get('rows', 'fail')} | {r.get('stage_s', '')} | {r.get('rows_per_s', '')} | "
                f"{r.get('new_tokens_per_s', '')} | {r.get('new_tokens_per_s_generation', '')} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
