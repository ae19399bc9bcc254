"""Data pipeline throughput alone: samples/s of decoding, slicing, tokenizing and collating, by worker count.

    python -m bench.data_bench [--model <checkpoint folder>] [--rows 256] [--workers 0 2 4]

Compare the figure with the training step rate (bench/bench.py: samples/s) to see whether a GPU would be
starved. Without --model it uses the tiny twin (its tokenizer and processor; the image processor's
scale_resolution is then 112: pass --scale-resolution 448 --query-num 64, or the real checkpoint folder).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from functools import partial
from pathlib import Path

from torch.utils.data import DataLoader

from pipeline.data.images import ImageFiles
from pipeline.data.sources import load_rows
from pipeline.families.minicpm_v2.collate import collate_for_training
from pipeline.families.minicpm_v2.dataset import SFTDataset
from pipeline.families.minicpm_v2.processor import MiniCPMVImageProcessor
from pipeline.families.minicpm_v2.tokenizer import MiniCPMVTokenizer
from pipeline.training.twin import ensure_tiny_twin


def samples_per_second(dataset: SFTDataset, workers: int, batch_size: int, pad_id: int) -> float:
    """Returns samples/s of one pass over the dataset through a DataLoader with `workers` processes."""
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=partial(collate_for_training, pad_id=pad_id),
    )
    start = time.perf_counter()
    n = sum(len(batch["input_ids"]) for batch in loader)
    return n / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=None, help="checkpoint folder (tokenizer + preprocessor config)")
    p.add_argument("--rows", type=int, default=256)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--scale-resolution", type=int, default=None, help="e.g. 448, MiniCPM-V-2's own setting")
    p.add_argument("--query-num", type=int, default=None, help="e.g. 64, MiniCPM-V-2's own setting")
    args = p.parse_args()
    folder = (
        Path(args.model) if args.model else ensure_tiny_twin(Path(tempfile.gettempdir()) / "bench_tiny_twin")
    )
    tokenizer = MiniCPMVTokenizer.from_pretrained(folder)
    overrides = {"scale_resolution": args.scale_resolution, "query_num": args.query_num}
    processor = MiniCPMVImageProcessor.from_pretrained(folder, **{k: v for k, v in overrides.items() if v})
    rows, _ = load_rows({"name": "demo"}, max_rows=args.rows)
    dataset = SFTDataset(rows, tokenizer, processor, 2048, "delete", ImageFiles())
    results = []
    for workers in args.workers:
        rate = samples_per_second(dataset, workers, args.batch_size, tokenizer.pad_id)
        results.append(
            {
                "workers": workers,
                "rows": len(rows),
                "samples_per_s": round(rate, 1),
                "scale_resolution": processor.scale_resolution,
            }
        )
        print(json.dumps(results[-1]), flush=True)


if __name__ == "__main__":
    main()
