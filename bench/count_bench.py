"""What an HF-native family counts before its first batch (CPU): every row's tokens (validation) and, for the
token budget, its vision patches, with the published processor settings on COCO-shaped JPEGs.

    python -m bench.count_bench [--families qwen2_5_vl qwen3_vl minicpm_v4_6] [--rows 200] [--out FILE]

Each family's processor is entry_bench's (the real image processor's settings, the offline twin tokenizer; no
weights are written); the rows are entry_bench's `coco` rows (640x480 JPEGs, one caption). Per family it times,
in this process, one pass of `Family.token_counter` over the rows and then one of `Family.patch_counter` over
the same rows, as the sft stage runs them (validation first, the budget after), and the same budget pass over
fresh copies of the rows that validation never counted (what the budget costs where nothing was kept). A
family that counts from image headers (the Qwen VLs) decodes no image in either pass; one whose slices are
laid out in its text (MiniCPM-V 4.6) encodes each row to count its tokens and keeps its patches for the
budget.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from types import SimpleNamespace

FAMILIES = ("qwen2_5_vl", "qwen3_vl", "minicpm_v4_6")


def processor_of(name: str):
    """Returns entry_bench's processor for the family: the published image settings, the twin tokenizer."""
    from bench.entry_bench import FAMILY_MODELS
    from pipeline.families import get_family
    from pipeline.families.tiny_tokenizer import train_bpe_tokenizer

    family = get_family(name)
    tokenizer = train_bpe_tokenizer(
        family.tiny_special_tokens, family.tiny_extra_special_tokens, family.tiny_added_tokens
    )
    _, processor = FAMILY_MODELS[name][1](tokenizer, tokenizer.convert_tokens_to_ids(family.end_of_turn))
    processor.chat_template = family.chat_template
    return family, processor


def read_rows(path: Path) -> list:
    from pipeline.data.rows import Row

    rows = []
    for line, text in enumerate(path.read_text().splitlines(), start=1):
        record = json.loads(text)
        rows.append(Row(record["query"], record["response"], [], record["images"], None, f"{path}:{line}"))
    return rows


def timed(count, rows: list) -> tuple[float, list]:
    start = time.perf_counter()
    values = [count(row) for row in rows]
    return time.perf_counter() - start, values


def measure(name: str, rows: list) -> dict:
    from pipeline.data.images import ImageFiles

    family, processor = processor_of(name)
    bundle, images = SimpleNamespace(processor=processor), ImageFiles()
    fresh = [dataclasses.replace(row) for row in rows]
    tokens_s, tokens = timed(family.token_counter(bundle, 2048, "delete", images), rows)
    budget_s, patches = timed(family.patch_counter(bundle, images), rows)
    alone_s, alone = timed(family.patch_counter(bundle, images), fresh)
    assert patches == alone, f"{name}: the kept patches differ from a fresh count"
    n = len(rows)
    return {
        "family": name,
        "rows": n,
        "counts_from_sizes": family.counts_from_sizes,
        "tokens_ms_per_row": round(1000 * tokens_s / n, 3),
        "budget_ms_per_row": round(1000 * budget_s / n, 3),
        "budget_ms_per_row_uncounted": round(1000 * alone_s / n, 3),
        "tokens_p50": sorted(tokens)[n // 2],
        "patches_p50": sorted(patches)[n // 2],
    }


def main() -> None:
    from bench.entry_bench import write_data

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    parser.add_argument("--rows", type=int, default=200)
    parser.add_argument("--work", type=Path, default=Path("/tmp/count-bench"))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    rows = read_rows(write_data(args.work / f"rows-{args.rows}", "coco", args.rows, tiny=False))
    results = []
    for name in args.families:
        result = measure(name, [dataclasses.replace(row) for row in rows])
        print(json.dumps(result), flush=True)
        results.append(result)
    if args.out:
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=2) + "\n")
        tmp.replace(args.out)


if __name__ == "__main__":
    main()
