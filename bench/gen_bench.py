"""Generation on one GPU, in one call: the infer stage of every family through the entry point, and the server
at 1, 8 and 32 concurrent clients against the same requests one at a time, for MiniCPM-V-2 and Qwen2.5-VL-3B.

    python -m bench.gen_bench --out /tmp/gen --work /tmp/gen-work      # one H200: about 8 minutes
    python -m bench.gen_bench --tiny --out /tmp/gen-smoke              # the tiny twins on the CPU (a smoke run)
    python -m bench.gen_bench --parts serve --serve-models qwen2_5_vl  # one part, one model

Models are those bench/entry_bench.py writes: each family at a published checkpoint's sizes with random bf16
weights (MiniCPM-V-2 3.4 B, Qwen2.5-VL-3B, Qwen3-VL-4B, MiniCPM-V 4.6), the twin tokenizers, output rows past
the tokenizer's vocabulary zeroed so that every generated id decodes, and the end-of-answer row zeroed so that
every answer runs to its token limit (the tiny twins keep theirs). Rows are COCO-shaped (640x480 JPEGs,
`please describe the image.`).

- infer (`--parts infer`): `python -m pipeline stages=[infer] ckpt=base` over `--rows` rows (200), batch 16,
  up to 64 new tokens, greedy, per family. Reported apart: the process's wall time, the stage's time (run.json),
  the model's load and the generation (the stage's infer/timing.json); new tokens are rows x max_new_tokens
  (no answer ends early), over the generation's seconds and over the stage's; `retokenized` counts the
  answers' tokens again from their text (bench/entry_bench.py's count; with --tiny, where answers end, the
  one used).
- serve (`--parts serve`): bench/serve_bench.py's rows for each of `--serve-models`: `--requests` requests
  (448 px image, a question each, greedy, `--serve-tokens` tokens) one at a time, then through 1, 8 and 32
  clients; `x serial` is tokens/s over the one-at-a-time figure.
- profile (`--parts profile`): MiniCPM-V-2's generation in this process (`generate_for_rows`, as infer runs
  it), two batches under torch.profiler after two warm ones: OUT/gen_profile_minicpm_v2.txt.
- the HF-native families' infer rows run under each `--decodes` mode (model.decode: `dynamic`, the growing cache,
  eager; `auto`, on a GPU the static cache with transformers' compiled step): the first batch (its compile) and
  the time spent waiting for prepared rows are reported apart (infer/timing.json).

Items run most wanted first (`plan`: MiniCPM-V-2's profile and infer stage, both servers, the other families'
infer stages), each only while `--budget` seconds are not spent; one that does not fit is
listed as skipped, to be run by a second call with `--parts` / `--families` / `--serve-models`. Results: OUT/gen_results.json
(written after every item) and OUT/gen_results.md.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import traceback
from pathlib import Path

from bench import serve_bench
from bench.entry_bench import (
    FAMILY_MODELS,
    run_info,
    run_pipeline,
    write_data,
    write_family_model,
    write_model,
)

FAMILIES = ("minicpm_v2", "qwen2_5_vl", "qwen3_vl", "minicpm_v4_6")
PARTS = ("profile", "infer", "serve")
# the least time an item needs to be worth starting, in seconds (the tiny twins: a tenth)
MIN_SECONDS = {"profile": 30, "infer": 60, "serve": 120}


class Clock:
    """The call's time budget: `left()` seconds remain of `budget`."""

    def __init__(self, budget: float) -> None:
        self.start = time.perf_counter()
        self.budget = budget

    def left(self) -> float:
        return self.budget - (time.perf_counter() - self.start)


def model_folder(family: str, work: Path, tiny: bool) -> Path:
    """Returns the family's model folder under `work`, written when absent."""
    if family == "minicpm_v2":
        return write_model(work / ("minicpm_v2_tiny" if tiny else "minicpm_v2_random"), tiny)
    return write_family_model(work / f"{family}_{'tiny' if tiny else 'random'}", family, tiny)


def model_config(family: str, tiny: bool) -> str:
    if tiny:
        return f"{family}_tiny"
    return "minicpm_v2" if family == "minicpm_v2" else FAMILY_MODELS[family][0]


def count_tokens(family: str, folder: Path):
    """Returns `count(text)`: its tokens under the model's tokenizer (no special tokens added)."""
    if family == "minicpm_v2":
        from pipeline.families.minicpm_v2.tokenizer import MiniCPMVTokenizer

        tokenizer = MiniCPMVTokenizer.from_pretrained(folder)
        return lambda text: len(tokenizer.encode(text))
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    return lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])


# ----- infer
def infer_row(
    family: str,
    work: Path,
    data: Path,
    args: argparse.Namespace,
    timeout: float,
    log: Path,
    decode: str = "auto",
) -> dict:
    """Runs the infer stage of `family` through the entry point under model.decode=`decode`; returns its row."""
    folder = model_folder(family, work, args.tiny)
    name = f"infer_{family}" + ("" if decode == "auto" else f"_{decode}")
    run_dir = work / "runs" / name
    overrides = [
        f"model={model_config(family, args.tiny)}",
        f"model.path={folder}",
        f"model.decode={decode}",
        *(["device=cpu"] if args.tiny else []),
        "tracking=none",
        "stages=[infer]",
        "ckpt=base",
        "dataset=custom",
        f"dataset.path={data}",
        f"infer.input={data}",
        f"infer.max_samples={args.rows}",
        f"infer.batch_size={args.batch_size}",
        f"infer.max_new_tokens={args.max_new_tokens}",
        "infer.stream=false",
    ]
    result = run_pipeline(name, overrides, run_dir, log, int(timeout))
    result.update(family=family, decode=decode)
    results, timing = run_dir / "infer" / "results.jsonl", run_dir / "infer" / "timing.json"
    if result["rc"] != 0 or not results.is_file() or not timing.is_file():
        return result
    answers = [json.loads(line)["response"] for line in results.read_text().splitlines() if line.strip()]
    count = count_tokens(family, folder)
    retokenized = sum(count(answer) for answer in answers)
    new_tokens = retokenized if args.tiny else len(answers) * args.max_new_tokens
    times = json.loads(timing.read_text())
    stage_s = (result.get("stage_seconds") or {}).get("infer")
    result.update(
        rows=len(answers),
        new_tokens=new_tokens,
        retokenized=retokenized,
        load_s=times["load_s"],
        generate_s=times["generate_s"],
        first_batch_s=times.get("first_batch_s"),
        prepare_wait_s=times.get("prepare_wait_s"),
        stage_s=round(stage_s, 1) if stage_s else None,
        new_tokens_per_s=round(new_tokens / times["generate_s"], 1),
        new_tokens_per_s_stage=round(new_tokens / stage_s, 1) if stage_s else None,
    )
    return result


# ----- serve
def serve_row(family: str, work: Path, args: argparse.Namespace, timeout: float) -> dict:
    """Returns serve_bench's rows for the model of `family`."""
    overrides = serve_bench.model_overrides(family, work, args.tiny)
    result = serve_bench.bench_server(
        overrides,
        n_requests=args.requests,
        max_tokens=args.serve_tokens,
        concurrency=args.concurrency,
        warmup=4,
        startup_timeout=min(timeout, 600),
    )
    print(serve_bench.table(result), flush=True)
    return {"family": family, **result}


# ----- a profile of MiniCPM-V-2's batches (in this process)
def profile_rows(work: Path, data: Path, args: argparse.Namespace, out: Path) -> dict:
    """Profiles MiniCPM-V-2's generation (generate_for_rows, as infer runs it) over two batches after two warm
    ones; writes torch.profiler's tables (by device time and by CPU time) to OUT/gen_profile_minicpm_v2.txt and
    returns the batches' seconds, the device's busy seconds and the wait for prepared rows."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from pipeline.apps.generation import generate_for_rows, load_inference_bundle
    from pipeline.data.validate import record_to_row
    from pipeline.families.generation_settings import GenerationSettings

    folder = model_folder("minicpm_v2", work, args.tiny)
    records = [json.loads(line) for line in data.read_text().splitlines()[: 4 * args.batch_size]]
    rows = [
        record_to_row(record, f"{data}:{k + 1}", data.parent, need_response=False)
        for k, record in enumerate(records)
    ]
    bundle, family = load_inference_bundle(folder, device="cpu" if args.tiny else "auto")
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens)
    half = 2 * args.batch_size
    warm: dict = {}
    generate_for_rows(family, bundle, rows[:half], settings, args.batch_size, timing=warm)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    timing: dict = {}
    started = time.perf_counter()
    with profile(activities=activities) as prof:
        generate_for_rows(family, bundle, rows[half:], settings, args.batch_size, timing=timing)
        torch.cuda.synchronize() if torch.cuda.is_available() else None
    seconds = time.perf_counter() - started
    events = prof.key_averages()
    device_us = sum(e.self_device_time_total for e in events) if torch.cuda.is_available() else 0
    text = [
        f"MiniCPM-V-2, 2 batches of {args.batch_size} rows, {args.max_new_tokens} new tokens, profiled: {seconds:.2f} s"
        f" wall, {device_us / 1e6:.2f} s of device kernels; warm batches {warm}; profiled {timing}",
        "",
        "by device time:",
        events.table(sort_by="self_device_time_total", row_limit=30, max_name_column_width=60),
        "by CPU time:",
        events.table(sort_by="cpu_time_total", row_limit=30, max_name_column_width=60),
    ]
    (out / "gen_profile_minicpm_v2.txt").write_text("\n".join(text) + "\n")
    del bundle
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return {
        "family": "minicpm_v2",
        "rows": len(rows) - half,
        "profiled_s": round(seconds, 2),
        "device_busy_s": round(device_us / 1e6, 2),
        "warm": warm,
        **timing,
    }


def plan(args: argparse.Namespace) -> list[tuple[str, str, str]]:
    """Returns the items to run, (part, family, model.decode), most wanted first: MiniCPM-V-2's profile and infer
    stage, both servers, then the other families' infer stages under each of `--decodes` (of the parts asked
    for)."""
    order = [("profile", "minicpm_v2", "auto"), ("infer", "minicpm_v2", "auto")]
    order += [("serve", "minicpm_v2", "auto"), ("serve", "qwen2_5_vl", "auto")]
    order += [
        ("infer", family, decode) for family in FAMILIES if family != "minicpm_v2" for decode in args.decodes
    ]
    wanted = {"infer": args.families, "serve": args.serve_models, "profile": ["minicpm_v2"]}
    return [item for item in order if item[0] in args.parts and item[1] in wanted[item[0]]]


# ----- the report
def markdown(results: dict) -> str:
    lines = []
    infer = results.get("infer", [])
    setup = results["info"]["infer"]
    if infer:
        lines += [
            f"infer stage, {setup['rows']} COCO-shaped rows, batch {setup['batch_size']}, up to "
            f"{setup['max_new_tokens']} new tokens, greedy:",
            "",
            "| family | model.decode | process s | stage s | load s | generation s | first batch s | "
            "waiting for rows s | new tokens | new tokens/s (generation) | new tokens/s (stage) |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in infer:
            if "skipped" in r or r.get("rc") != 0:
                reason = str(r.get("skipped") or r.get("error", "failed")).replace("\n", " ")[:200]
                lines.append(f"| {r['family']} | {r.get('decode', 'auto')} | {reason} |||||||||")
                continue
            lines.append(
                f"| {r['family']} | {r.get('decode', 'auto')} | {r['wall_s']} | {r['stage_s']} | {r['load_s']} | "
                f"{r['generate_s']} | {r.get('first_batch_s')} | {r.get('prepare_wait_s')} | {r['new_tokens']} | "
                f"{r['new_tokens_per_s']} | {r['new_tokens_per_s_stage']} |"
            )
    for r in results.get("serve", []):
        lines += ["", f"serve, {r['family']} ({r.get('max_tokens', '?')} tokens a request):", ""]
        if "rows" not in r:
            lines.append(f"not measured: {r.get('skipped') or r.get('error')}")
            continue
        lines += [
            "| clients | requests/s | tokens/s | x one at a time (tokens/s) | p50 s | max s | same answers | same prefix |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for row in r["rows"]:
            lines.append(
                f"| {row['clients']} | {row['requests_per_s']} | {row['tokens_per_s']} | "
                f"{row.get('tokens_vs_one_at_a_time', 1.0)} | {row['latency_p50_s']} | {row['latency_max_s']} | "
                f"{row['same_answers']}/{row['requests']} | {row.get('same_prefix', 1.0)} |"
            )
    profiled = results.get("profile")
    if profiled:
        lines += [
            "",
            "MiniCPM-V-2's generation profiled (gen_profile_minicpm_v2.txt):",
            "",
            "```",
            json.dumps(profiled),
            "```",
        ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/gen-bench")))
    parser.add_argument("--work", type=Path, default=None, help="models and data (default: --out/work)")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    parser.add_argument(
        "--serve-models", nargs="+", choices=sorted(serve_bench.MODELS), default=["minicpm_v2", "qwen2_5_vl"]
    )
    parser.add_argument("--rows", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--requests", type=int, default=32, help="serve: requests per level")
    parser.add_argument("--serve-tokens", type=int, default=48, help="serve: max_tokens of a request")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument(
        "--decodes",
        nargs="+",
        choices=("auto", "static", "dynamic"),
        default=["dynamic", "auto"],
        help="model.decode of the HF-native families' infer rows (MiniCPM-V-2: auto)",
    )
    parser.add_argument("--budget", type=float, default=530, help="seconds for the whole call")
    parser.add_argument("--tiny", action="store_true", help="the tiny twins on the CPU: a smoke run")
    args = parser.parse_args()

    out = args.out
    work = args.work or out / "work"
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    log = out / "gen_logs.txt"
    log.write_text("")
    clock = Clock(args.budget)
    scale = 0.1 if args.tiny else 1.0
    data = write_data(work, "coco", args.rows, args.tiny)
    info = run_info(
        infer={"rows": args.rows, "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens}
    )
    results: dict = {"info": info, "infer": [], "serve": []}

    def save() -> None:
        (out / "gen_results.json").write_text(json.dumps(results, indent=2) + "\n")

    def fits(part: str, what: str) -> bool:
        if clock.left() >= MIN_SECONDS[part] * scale:
            print(f"== {part} {what} ({clock.left():.0f} s left)", flush=True)
            return True
        skipped = {"family": what, "skipped": f"out of time ({clock.left():.0f} s of --budget left)"}
        results[part].append(skipped) if part != "profile" else results.update(profile=skipped)
        return False

    for part, what, decode in plan(args):
        if not fits(part, what):
            continue
        try:
            if part == "infer":
                results["infer"].append(infer_row(what, work, data, args, clock.left(), log, decode))
            elif part == "serve":
                results["serve"].append(serve_row(what, work, args, clock.left()))
            else:
                results["profile"] = profile_rows(work, data, args, out)
        except (Exception, SystemExit) as exc:  # one item's failure is its row; the others go on
            error = {"family": what, "decode": decode, "error": f"{type(exc).__name__}: {exc}"[:3000]}
            with log.open("a") as f:
                f.write(f"===== {part} {what}\n{traceback.format_exc()}\n")
            results[part].append(error) if part != "profile" else results.update(profile=error)
        save()
        last = results["profile"] if part == "profile" else results[part][-1]
        print(json.dumps(last)[:2000], flush=True)
    results["info"]["seconds"] = round(time.perf_counter() - clock.start, 1)
    save()
    table = markdown(results)
    (out / "gen_results.md").write_text(table + "\n")
    print(json.dumps(info))
    print(table)


if __name__ == "__main__":
    main()
