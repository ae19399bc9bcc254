"""Dataset preparation at scale (CPU): rows/s and peak memory of reading and checking 10k and 100k rows.

    python -m bench.data_prep_bench [--rows 10000 100000] [--layouts shared distinct parquet] [--out FILE]
                                    [--tokens]

What a training run does before its first batch, minus the model: read the rows (pipeline.data.prepare.
read_dataset) and check every distinct image's header (pipeline.data.image_check). Layouts:

    shared    JSON lines, 1,000 distinct JPEG/PNG files shared by all rows (a caption set of few images)
    distinct  JSON lines, one JPEG or PNG file per row
    parquet   a parquet file written with `datasets`, one embedded image per row (datasets.Image), read
              with dataset=hf (its first run includes datasets' one-time Arrow conversion)

Each layout is measured twice, each time in a fresh process (peak RSS is that process's): `cold` with an
empty check cache (and, for parquet, an empty datasets cache), `warm` right after, when the check cache
remembers every image. `--tokens` also counts, in the warm run, every row's tokens with the MiniCPM-V-2 tiny twin's counter
(text tokens plus the image's slices from its header), the other thing counted up front.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DISTINCT_SHARED = 1000
LAYOUTS = ("shared", "distinct", "parquet")


def make_image(k: int, fmt: str) -> bytes:
    """Returns a small JPEG or PNG (64x48 to 127x111 pixels; two coloured halves), different for each k."""
    import io

    from PIL import Image

    size = (64 + k % 64, 48 + (k // 64) % 64)
    image = Image.new("RGB", size, (k % 256, (k // 256) % 256, (k * 7) % 256))
    image.paste((255 - k % 256, 128, 64), (0, 0, size[0] // 2, size[1]))
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **({"quality": 85} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def _fmt(k: int) -> tuple[str, str]:
    return ("JPEG", ".jpg") if k % 2 == 0 else ("PNG", ".png")


def write_jsonl(folder: Path, n: int, distinct: int) -> Path:
    """Returns a .jsonl of n rows over `distinct` image files written beside it (row k uses image k % distinct)."""
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    for k in range(distinct):
        fmt, suffix = _fmt(k)
        (images / f"{k}{suffix}").write_bytes(make_image(k, fmt))
    path = folder / "train.jsonl"
    with path.open("w", encoding="utf-8") as handle:
        for k in range(n):
            image = f"images/{k % distinct}{_fmt(k % distinct)[1]}"
            row = {
                "query": f"<image>what is in picture {k}?",
                "response": f"colour {k % 97}",
                "images": [image],
            }
            handle.write(json.dumps(row) + "\n")
    return path


def write_parquet(folder: Path, n: int) -> Path:
    """Returns a parquet file of n rows with one embedded image each, written with datasets (to_parquet)."""
    import datasets

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "train.parquet"
    features = datasets.Features(
        {"query": datasets.Value("string"), "response": datasets.Value("string"), "image": datasets.Image()}
    )

    def rows():
        for k in range(n):
            yield {
                "query": f"<image>what is in picture {k}?",
                "response": f"colour {k % 97}",
                "image": {"bytes": make_image(k, _fmt(k)[0]), "path": None},
            }

    cache = folder / "build-cache"
    datasets.Dataset.from_generator(rows, features=features, cache_dir=str(cache)).to_parquet(str(path))
    return path


def child(args: argparse.Namespace) -> None:
    """Reads and checks the dataset in this process; prints {seconds, rows, peak_rss_mb, ...} as JSON."""
    from pipeline.data import image_check
    from pipeline.data.prepare import read_dataset

    image_check.CHECK_CACHE_DIR = Path(args.check_cache)
    imported_mb = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # the imports' share
    name = "hf" if args.data.endswith(".parquet") else "custom"
    cfg = {"name": name, "path": args.data, "cache_dir": args.hf_cache, "test_ratio": 0.01}
    start = time.perf_counter()
    raw = read_dataset(cfg, seed=0)
    seconds = time.perf_counter() - start
    result = {
        "seconds": round(seconds, 2),
        "rows": len(raw.rows),
        "rows_per_s": round(len(raw.rows) / seconds),
    }
    if args.tokens:
        from pipeline.data.images import ImageFiles
        from pipeline.families import get_family
        from pipeline.training.twin import ensure_tiny_twin

        family = get_family("minicpm_v2")
        bundle = family.load_bundle(ensure_tiny_twin())
        count = family.token_counter(bundle, 2048, "delete", ImageFiles())
        start = time.perf_counter()
        for row in raw.rows:
            row.num_tokens = count(row)
        counted = time.perf_counter() - start
        result.update(token_seconds=round(counted, 2), token_rows_per_s=round(len(raw.rows) / counted))
    result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    result["after_imports_mb"] = imported_mb
    print(json.dumps(result))


def measure(data: Path, check_cache: Path, hf_cache: Path, tokens: bool) -> dict:
    """Runs one child process over `data` and returns what it printed."""
    command = [sys.executable, "-m", "bench.data_prep_bench", "--child", "--data", str(data)]
    command += ["--check-cache", str(check_cache), "--hf-cache", str(hf_cache)] + (
        ["--tokens"] if tokens else []
    )
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000])
    p.add_argument("--layouts", nargs="+", choices=LAYOUTS, default=list(LAYOUTS))
    p.add_argument("--workdir", default=None, help="where the data is generated (default: a temp folder)")
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    p.add_argument("--tokens", action="store_true", help="also count tokens with the MiniCPM-V-2 tiny twin")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--check-cache", help=argparse.SUPPRESS)
    p.add_argument("--hf-cache", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return
    root = Path(args.workdir or tempfile.mkdtemp(prefix="data_prep_bench_"))
    results = []
    for n in args.rows:
        for layout in args.layouts:
            folder = root / f"{layout}-{n}"
            start = time.perf_counter()
            if layout == "parquet":
                data = write_parquet(folder, n)
            else:
                data = write_jsonl(folder, n, DISTINCT_SHARED if layout == "shared" else n)
            made = time.perf_counter() - start
            distinct = DISTINCT_SHARED if layout == "shared" else n
            for run in ("cold", "warm"):
                counting = args.tokens and run == "warm"
                result = measure(data, folder / "check-cache", folder / "hf-cache", counting)
                result.update(
                    layout=layout, n=n, distinct_images=distinct, run=run, generate_s=round(made, 1)
                )
                results.append(result)
                print(json.dumps(result), flush=True)
    info = {"cpus": os.cpu_count(), "python": sys.version.split()[0], "results": results}
    if args.out:
        Path(args.out).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    print(
        "| rows | layout | distinct images | run | seconds | rows/s | peak RSS MB (after imports) | tokens rows/s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['n']:,} | {r['layout']} | {r['distinct_images']:,} | {r['run']} | {r['seconds']} | "
            f"{r['rows_per_s']:,} | {r['peak_rss_mb']:,} ({r['after_imports_mb']:,}) | "
            f"{format(r['token_rows_per_s'], ',') if 'token_rows_per_s' in r else ''} |"
        )


if __name__ == "__main__":
    main()
