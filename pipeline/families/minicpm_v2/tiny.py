"""The tiny twin of MiniCPM-V-2: the same code at tiny sizes, written as a checkpoint folder in the official layout.

It is the pipeline's embedded default (`model=minicpm_v2_tiny`): config.json, sharded safetensors, an
offline-trained sentencepiece tokenizer with the official special-token ids, and preprocessor_config.json.
Loading it goes through exactly the code that loads the real 3.4B checkpoint. This module builds the twin
with random (seeded) weights; its pre-training on image questions lives in `pipeline.training.twin`, above both
the model and the data code.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from pipeline.families.checkpoints import MODEL_CONFIG

from .checkpoint import INDEX_NAME, save_checkpoint
from .configuration import MiniCPMVConfig
from .modeling import MiniCPMV
from .processor import PREPROCESSOR_CONFIG, MiniCPMVImageProcessor
from .tokenizer import TOKENIZER_CONFIG, TOKENIZER_MODEL, MiniCPMVTokenizer, train_tiny_tokenizer

log = logging.getLogger(__name__)

# Small enough for a CPU test in seconds; every structural feature of the real model is kept (several
# layers, MHA, a vision tower with its last block dropped, kv_proj because vision width != LLM width,
# image slicing at a reduced scale_resolution).
TINY_SIZES = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=2048,
    initializer_range=0.05,
    query_num=16,
    image_size=112,
    scale_resolution=112,
    max_slice_nums=9,
    vision_encoder="minicpmv_tiny_vit",
    vision_config=dict(embed_dim=64, depth=3, num_heads=2, mlp_dim=128, img_size=56, patch_size=14),
)
TINY_VOCAB = 1024
# Every file a finished twin folder holds besides its weight shards (listed in the index).
TWIN_FILES = (MODEL_CONFIG, INDEX_NAME, TOKENIZER_MODEL, TOKENIZER_CONFIG, PREPROCESSOR_CONFIG)

# (model, tokenizer, processor) -> None: trains the freshly initialised twin before it is saved
Pretrain = Callable[[MiniCPMV, MiniCPMVTokenizer, MiniCPMVImageProcessor], None]


def missing_twin_files(folder: str | Path) -> list[str]:
    """Returns the files a complete twin folder needs that `folder` lacks (every shard of the index too)."""
    folder = Path(folder)
    missing = [name for name in TWIN_FILES if not (folder / name).is_file()]
    if INDEX_NAME not in missing:
        try:
            shards = set(json.loads((folder / INDEX_NAME).read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, AttributeError):
            return [*missing, f"{INDEX_NAME} (unreadable)"]
        missing += sorted(name for name in shards if not (folder / name).is_file())
    return missing


def build_tiny_twin(
    folder: str | Path, seed: int = 0, extra_texts: tuple[str, ...] = (), pretrain: Pretrain | None = None
) -> Path:
    """Writes the tiny twin's checkpoint folder and returns it: seeded random weights, or `pretrain`ed ones.

    The folder is filled under a temporary name of this process's own and renamed into place at the end, so
    a reader never sees a half-written twin and two builders never share a folder; an existing folder at
    `folder` is replaced.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".build-{folder.name}-", dir=folder.parent))
    try:
        tokenizer = train_tiny_tokenizer(tmp / "tokenizer", vocab_size=TINY_VOCAB, extra_texts=extra_texts)
        config = MiniCPMVConfig(vocab_size=tokenizer.vocab_size, **TINY_SIZES)
        torch.manual_seed(seed)
        model = MiniCPMV(config)
        processor = MiniCPMVImageProcessor(
            scale_resolution=config.scale_resolution,
            patch_size=config.patch_size,
            max_slice_nums=config.max_slice_nums,
            query_num=config.query_num,
        )
        if pretrain is not None:
            pretrain(model, tokenizer, processor)
            model.eval()
        weights = save_checkpoint(
            model, tmp / "weights", max_shard_bytes=2 * 1024**2, source_folder=tmp / "tokenizer"
        )
        processor.save_pretrained(weights)
        if folder.exists():
            old = Path(tempfile.mkdtemp(prefix=f".old-{folder.name}-", dir=folder.parent))
            os.replace(folder, old / folder.name)
            os.replace(weights, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(weights, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info(
        "tiny MiniCPM-V-2 twin written to %s (%s parameters)",
        folder,
        f"{sum(p.numel() for p in model.parameters()):,}",
    )
    return folder
