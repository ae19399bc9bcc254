"""DPO on the GPU: pairs/s and peak memory of `python -m pipeline +experiment=dpo` (LoRA-qkv, trainer=default)
against TRL's DPOTrainer on the same model folder and the same pairs, each in its own process, in one call.

    python -m bench.dpo_bench --out DIR [--families qwen2_5_vl minicpm_v2] [--steps 12] [--trl-path .peers/trl]
    python -m bench.dpo_bench --out DIR --peers ours --loss-types sigmoid orpo cpo   # ours per loss type
    python -m bench.dpo_bench --tiny --out /tmp/dpo-smoke --steps 2      # the tiny twins on the CPU: a smoke run

The model folders are bench/entry_bench.py's (the full-size models with random weights: Qwen2.5-VL-3B's sizes,
MiniCPM-V-2's), written under --work when absent; the pairs are its COCO-shaped rows with a rejected answer
added (another row's caption), in ms-swift's pair format for ours and TRL's conversational one for TRL. Both
train LoRA r=8, alpha=32, dropout 0.05 on the modules our lora=qkv targets, sigmoid loss at beta 0.1, 16 pairs
an optimizer step; both take the reference from the same weights with the adapter disabled. TRL runs through
bench/peer_runner.py (its `trl_dpo` runner) with its packages first on PYTHONPATH, as bench/peers.py runs
SFTTrainer. TRL cannot load MiniCPM-V-2 without the hub's remote code (this project implements the model
itself), so that family's TRL row says so instead of a number.

`--loss-types` runs ours once per `preference.loss_type` (sigmoid first: the rows' baseline; the
reference-free ones, cpo, orpo and simpo, run no reference forward); their rows' `vs_sigmoid` is the pairs/s
over the sigmoid row of the same family in the same call. `sigmoid_unshared` is sigmoid with
`preference.share_image_features=false`: its reference runs the vision tower again instead of taking the
policy's image features (the baseline of that lever). `kto` reads each pair as two labelled rows (the
chosen answer desirable, the rejected one not), each scored beside its KL sample: its `pairs_per_s` counts
rows, each of two sequences as a pair is.

A row: `setting`, `peer` (ours | trl), `pairs_per_s` (median over the steps after the first two, data loading
included), `peak_gb`, `first_losses`, `settings`, and `error` with the reason when a run fails; `vs_ours` is a
peer's pairs/s over ours on the same family. Rows go to DIR/dpo_bench.json and DIR/dpo_bench.md, the runs'
output to DIR/dpo_bench.log.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

from bench.entry_bench import (
    COMMON,
    FAMILY_MODELS,
    run_pipeline,
    write_data,
    write_family_model,
    write_model,
)
from bench.peers import GLOBAL_BATCH, LORA, TRL, launch_runner, peer_metrics, target_regex

FAMILIES = ("qwen2_5_vl", "minicpm_v2")
TRL_DPO = {**TRL, "beta": 0.1, "loss_type": "sigmoid", "learning_rate": 1e-4}


UNSHARED = "_unshared"  # a loss type with this suffix: its reference runs the vision tower again


def write_pairs(rows: Path, n: int) -> Path:
    """Writes entry_bench's first `n` rows as preference pairs (the rejected answer: the next row's caption)."""
    path = rows.with_name(f"pairs-{n}.jsonl")
    if path.is_file():
        return path
    records = [json.loads(line) for line in rows.read_text().splitlines() if line.strip()][: n + 1]
    lines = [
        json.dumps({**row, "rejected_response": records[(i + 1) % len(records)]["response"]})
        for i, row in enumerate(records[:n])
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def model_folder(family: str, work: Path, tiny: bool) -> tuple[Path, str]:
    """Returns the family's model folder (written when absent) and its model config's name."""
    if family == "minicpm_v2":
        return write_model(work / "minicpm_v2_random", tiny), "minicpm_v2_tiny" if tiny else "minicpm_v2"
    folder = write_family_model(work / f"{family}_random", family, tiny)
    return folder, f"{family}_tiny" if tiny else FAMILY_MODELS[family][0]


def run_ours(
    family: str, pairs: Path, steps: int, args: argparse.Namespace, log_file: Path, loss_type: str = "sigmoid"
) -> dict:
    """`python -m pipeline +experiment=dpo` on the pairs (dpo only) with that preference.loss_type; returns its
    row."""
    folder, model = model_folder(family, args.work, args.tiny)
    name = f"{family}_ours" if loss_type == "sigmoid" else f"{family}_ours_{loss_type}"
    overrides = [
        "+experiment=dpo",
        f"model={model}",
        f"model.path={folder}",
        *(["device=cpu"] if args.tiny else []),
        *COMMON,
        f"dataset.path={pairs}",
        "dataset.test_ratio=0",
        "stages=[dpo]",
        f"trainer.max_steps={steps}",
        f"preference.loss_type={loss_type.removesuffix(UNSHARED)}",
        *(["preference.share_image_features=false"] if loss_type.endswith(UNSHARED) else []),
    ]
    run_dir = args.work / "runs" / f"dpo_{name}"
    result = run_pipeline(f"dpo_{name}", overrides, run_dir, log_file, args.timeout)
    records = []
    log = run_dir / "dpo" / "logging.jsonl"
    if log.is_file():
        records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    steps_done = [r for r in records if "loss" in r]
    steady = steps_done[2:] or steps_done[-1:]
    row = {**result, "setting": name, "peer": "ours", "settings": overrides}
    if steady:
        row.update(
            steps=len(steps_done),
            pairs_per_s=round(statistics.median(r["samples_per_s"] for r in steady), 2),  # a sample is a pair
            first_losses=[round(r["loss"], 4) for r in steps_done[:3]],
        )
    summary = run_dir / "dpo" / "summary.json"
    if summary.is_file():
        row["peak_gb"] = json.loads(summary.read_text()).get("peak_memory_gb")
    elif steps_done and "memory_gb" in steps_done[-1]:  # cut by its time limit: the peak of its logged steps
        row["peak_gb"] = round(max(r.get("memory_gb", 0.0) for r in steps_done), 2)
    return row


def run_trl(family: str, pairs: Path, steps: int, args: argparse.Namespace, log_file: Path) -> dict:
    """TRL's DPOTrainer through bench/peer_runner.py in its own process; returns its row."""
    row: dict = {"setting": f"{family}_trl", "peer": "trl", "settings": TRL_DPO}
    if family not in FAMILY_MODELS:
        row["error"] = f"TRL loads {family} only through the hub's remote code; not run"
        return row
    folder, _ = model_folder(family, args.work, args.tiny)
    work = args.work / "peers" / f"{family}_trl_dpo"
    work.mkdir(parents=True, exist_ok=True)
    spec = {
        "peer": "trl_dpo",
        "model": str(folder),
        "family": family,
        "rows": str(pairs),
        "n_rows": steps * GLOBAL_BATCH,
        "steps": steps,
        "tiny": args.tiny,
        "settings": TRL_DPO,
        "lora": {**LORA, "target_regex": target_regex(family, folder)},
        "work": str(work),
        "out": str(work / "result.json"),
    }
    started = time.perf_counter()
    rc, out, command = launch_runner(spec, work, args.trl_path, args.timeout)
    with log_file.open("a") as f:
        f.write(f"===== {family}_trl_dpo (rc {rc})\n" + " ".join(command) + "\n\n" + out + "\n")
    raw = json.loads((work / "result.json").read_text()) if (work / "result.json").is_file() else {}
    metrics = peer_metrics(raw, 0.0)
    row.update(rc=rc, wall_s=round(time.perf_counter() - started, 1), versions=raw.get("versions", {}))
    row.update({k: v for k, v in metrics.items() if k in ("steps", "first_losses", "peak_gb")})
    if "samples_per_s" in metrics:
        row["pairs_per_s"] = metrics["samples_per_s"]  # GLOBAL_BATCH pairs a step
    if rc == 124:  # its steps so far (the runner writes them after each) still give its rates
        row["error"] = f"timed out after {args.timeout} s, {len(raw.get('step_seconds', []))} step(s) done"
    elif rc != 0:
        row["error"] = raw.get("error") or (
            out.strip().splitlines()[-1] if out.strip() else f"exit status {rc}"
        )
    return row


def markdown(rows: list[dict]) -> str:
    lines = [
        "| setting | pairs/s | vs ours | vs sigmoid | peak GB | first losses | error |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['setting']} | {row.get('pairs_per_s', '')} | {row.get('vs_ours', '')} | "
            f"{row.get('vs_sigmoid', '')} | {row.get('peak_gb', '')} | {row.get('first_losses', '')} | "
            f"{row.get('error', '')} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.dpo_bench", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=Path("/tmp/entry-work"))
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    parser.add_argument("--peers", nargs="+", default=["ours", "trl"], choices=["ours", "trl"])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument(
        "--loss-types",
        nargs="+",
        default=["sigmoid"],
        choices=["sigmoid", f"sigmoid{UNSHARED}", "ipo", "simpo", "cpo", "orpo", "kto"],
    )
    parser.add_argument("--tiny", action="store_true", help="the tiny twins on the CPU (a smoke run)")
    parser.add_argument("--timeout", type=int, default=900)
    parser.add_argument("--trl-path", type=Path, default=os.environ.get("PEERS_TRL"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    log_file = args.out / "dpo_bench.log"
    rows = write_data(args.work, "coco", args.steps * GLOBAL_BATCH + 1, args.tiny)
    pairs = write_pairs(rows, args.steps * GLOBAL_BATCH)
    results: list[dict] = []
    for family in args.families:
        ours = run_ours(family, pairs, args.steps, args, log_file) if "ours" in args.peers else {}
        results += [ours] if ours else []
        for loss_type in [t for t in args.loss_types if t != "sigmoid"] if "ours" in args.peers else []:
            other = run_ours(family, pairs, args.steps, args, log_file, loss_type)
            if ours.get("pairs_per_s") and other.get("pairs_per_s"):
                other["vs_sigmoid"] = round(other["pairs_per_s"] / ours["pairs_per_s"], 3)
            results.append(other)
            (args.out / "dpo_bench.json").write_text(json.dumps(results, indent=2) + "\n")
        if "trl" in args.peers:
            trl = run_trl(family, pairs, args.steps, args, log_file)
            if ours.get("pairs_per_s") and trl.get("pairs_per_s"):
                trl["vs_ours"] = round(trl["pairs_per_s"] / ours["pairs_per_s"], 3)
            results.append(trl)
        (args.out / "dpo_bench.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "dpo_bench.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
