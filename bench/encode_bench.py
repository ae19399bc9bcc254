"""How fast one CPU core prepares the HF-native families' training rows: rows/s of reading a COCO-shaped JPEG,
slicing or resizing it and encoding the conversation (`family.encode`, what a DataLoader worker does for
each row), in this process on one thread, with each family's real image processor (bench/entry_bench.py's).

    python -m bench.encode_bench [--families qwen2_5_vl qwen3_vl minicpm_v4_6] [--rows 48] [--out DIR]

A GPU step rate over `rows/s x trainer.num_workers` means the data loader sets the pace (`data_wait_pct` in
the run's logging.jsonl says so on the GPU). No model is built: only the tokenizer and the processor.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

from bench.count_bench import processor_of
from bench.entry_bench import write_data
from pipeline.families.base import messages_from_row


def encode_rate(name: str, rows: list[dict], repeats: int = 3) -> dict:
    """Returns rows/s of opening and encoding `rows` for family `name`: the median of `repeats` passes (each
    rate, after one warm-up row), and the median row's tokens."""
    from PIL import Image

    family, processor = processor_of(name)

    def encode(row: dict):
        with Image.open(row["images"][0]) as image:
            picture = image.convert("RGB")
        return family.encode(processor, messages_from_row(row["query"], row["response"]), [picture])

    encode(rows[0])
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        lengths = sorted(len(encode(row)) for row in rows)
        rates.append(len(rows) / (time.perf_counter() - start))
    return {
        "family": name,
        "rows": len(rows),
        "rows_per_s": round(statistics.median(rates), 1),
        "passes": [round(rate, 1) for rate in rates],
        "tokens_per_row_p50": lengths[len(lengths) // 2],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--families", nargs="*", default=["qwen2_5_vl", "qwen3_vl", "minicpm_v4_6"])
    parser.add_argument("--rows", type=int, default=48)
    parser.add_argument("--out", type=Path, default=None, help="writes encode_results.json there")
    args = parser.parse_args()
    torch.set_num_threads(1)  # one DataLoader worker's share
    with tempfile.TemporaryDirectory() as work:
        data = write_data(Path(work), "coco", args.rows, tiny=False)
        rows = [json.loads(line) for line in data.read_text().splitlines() if line.strip()]
        results = [encode_rate(name, rows) for name in args.families]
    info = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "command": f"python -m bench.encode_bench --families {' '.join(args.families)} --rows {args.rows}",
    }
    for result in results:
        print(json.dumps(result))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "encode_results.json").write_text(
            json.dumps({"info": info, "results": results}, indent=1)
        )


if __name__ == "__main__":
    main()
