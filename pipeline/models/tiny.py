"""The tiny twin of MiniCPM-V-2: the same code at tiny sizes, written as a checkpoint folder in the official layout.

It is the pipeline's embedded default (`model=minicpm_v2_tiny`): config.json, sharded safetensors, an
offline-trained sentencepiece tokenizer with the official special-token ids, and preprocessor_config.json.
Loading it goes through exactly the code that loads the real 3.4B checkpoint.

    python -m pipeline.models.tiny --out .cache/minicpm_v2_tiny
"""

from __future__ import annotations

import argparse
import logging
import shutil
from pathlib import Path

import torch

from .checkpoint import save_checkpoint
from .configuration import MiniCPMVConfig
from .modeling import MiniCPMV
from .processor import MiniCPMVImageProcessor
from .tokenizer import train_tiny_tokenizer

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
# The demo set's generator with another seed than the bundled set's: the twin learns the kind of data the
# demo holds (so fine-tuning it shows adaptation, not learning from noise) without seeing its rows.
PRETRAIN_SEED = 1234
PRETRAIN_ROWS = 480


def pretrain_tiny(
    model: MiniCPMV, tokenizer, processor, steps: int, batch_size: int = 8, lr: float = 2e-3, seed: int = 0
) -> list[float]:
    """Full-trains the twin for `steps` on freshly generated demo-style rows; returns the loss per step."""
    from pipeline.data.demo import generate_demo

    from .collate import collate_for_training, encode_example

    rows, images = generate_demo(PRETRAIN_ROWS, PRETRAIN_SEED)
    samples = []
    for row in rows:
        image = images[row["images"][0]] if row.get("images") else None
        history = [tuple(pair) for pair in row.get("history", [])]
        sample = encode_example(
            tokenizer,
            processor,
            row["query"],
            row["response"],
            history,
            row.get("system"),
            image,
            max_length=2048,
        )
        if sample is not None:
            samples.append(sample)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    losses = []
    for _ in range(steps):
        pick = torch.randint(len(samples), (batch_size,), generator=generator).tolist()
        batch = collate_for_training([samples[i] for i in pick], tokenizer.pad_id)
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    model.eval()
    return losses


def build_tiny_twin(
    folder: str | Path, seed: int = 0, pretrain_steps: int = 100, extra_texts: tuple[str, ...] = ()
) -> Path:
    """Writes the tiny twin's checkpoint folder (atomically) and returns it.

    With `pretrain_steps` > 0 the random twin first gets a short, seeded pre-training on demo-style data.
    """
    folder = Path(folder)
    tmp = folder.with_name(f".build-{folder.name}")
    if tmp.exists():
        shutil.rmtree(tmp)
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
    if pretrain_steps > 0:
        log.info("pre-training the tiny twin for %d steps (once; cached at %s)", pretrain_steps, folder)
        losses = pretrain_tiny(model, tokenizer, processor, pretrain_steps, seed=seed)
        log.info("pre-training loss %.3f -> %.3f", losses[0], sum(losses[-10:]) / len(losses[-10:]))
    weights = save_checkpoint(
        model, tmp / "weights", max_shard_bytes=2 * 1024**2, source_folder=tmp / "tokenizer"
    )
    processor.save_pretrained(weights)
    folder.parent.mkdir(parents=True, exist_ok=True)
    if folder.exists():
        shutil.rmtree(folder)
    weights.rename(folder)
    shutil.rmtree(tmp)
    log.info(
        "tiny MiniCPM-V-2 twin written to %s (%s parameters)",
        folder,
        f"{sum(p.numel() for p in model.parameters()):,}",
    )
    return folder


def ensure_tiny_twin(folder: str | Path) -> Path:
    """Returns the tiny twin's folder, building it first when it is absent."""
    folder = Path(folder)
    if (folder / "config.json").is_file():
        return folder
    return build_tiny_twin(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description="Write the tiny MiniCPM-V-2 twin checkpoint folder.")
    parser.add_argument("--out", default=".cache/minicpm_v2_tiny")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pretrain-steps", type=int, default=100)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(build_tiny_twin(args.out, seed=args.seed, pretrain_steps=args.pretrain_steps))


if __name__ == "__main__":
    main()
