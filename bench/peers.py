"""Peers: the same random-weight models trained on the same rows by TRL's SFTTrainer and ms-swift's `swift
sft`, beside our own row, in one call on one GPU.

    python -m bench.peers --out DIR [--families qwen2_5_vl qwen3_vl minicpm_v4_6] [--peers ours trl ...]
        [--trl-path .peers/trl] [--swift-path .peers/swift]       # the peers' packages (pip --target dirs)
    python -m bench.peers --tiny --out /tmp/peers-smoke --steps 2  # the tiny twins on the CPU: a smoke run

For each family it writes (or reuses, under --work) the model folder and the COCO-shaped rows of
bench/entry_bench.py (`write_family_model`, `write_data`), then runs each peer in its own process with a
time limit: `ours` is entry_bench's `<family>_qkv_default` through `python -m pipeline`; the others run
bench/peer_runner.py with the peer's packages first on PYTHONPATH, so that they never change the torch or
transformers the project is measured with (ms-swift 4.6 pins transformers<5.20, peft<0.21, trl<1.0 and runs
on its own; see bench/peers_wheels.md). The peers never enter pipeline/.

Every peer trains LoRA r=8, alpha=32, dropout 0.05 on exactly the modules our `lora=qkv` targets (the
family's `lora_target_names`, passed as one regex), 16 rows an optimizer step, for a fixed number of steps
on the first steps x 16 rows. `PEERS` holds each peer's settings and `SOURCES` says which are the peer's own
recommendation (its documentation or example for this kind of run) and which are matched to ours.

A row has the keys of entry_bench's rows (samples/s and tokens/s: median over the steps after the first
two, each step timed from the end of the one before, data loading included; MFU from entry_bench's
`family_flops` on the same rows, with the peer's gradient checkpointing; peak GB: max allocated in the
peer's process; `first_losses`: the first logged losses) plus `peer`, `versions`, `settings`, `sources`,
`vs_ours` (samples/s over ours, same family, same call) and `error` with the reason when a run fails.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench.entry_bench import (
    COCO_TRAIN_ROWS,
    FAMILY_SETTINGS,
    PEAK_TFLOPS,
    REPO,
    family_flops,
    run_family_setting,
    run_info,
    write_data,
    write_family_model,
)

GLOBAL_BATCH = 16  # trainer=default: batch_size x grad_accum = 16 rows an optimizer step
LORA = {"r": 8, "alpha": 32, "dropout": 0.05}  # pipeline/config.py LoraConfig, lora=qkv
# our optimizer (pipeline/config.py OptimConfig with the LoRA learning rate): it changes the losses, not the speed
OURS_OPTIM = {"learning_rate": 1e-4, "weight_decay": 0.1, "max_grad_norm": 0.5}
SWIFT_MODEL_TYPES = {"qwen2_5_vl": "qwen2_5_vl", "qwen3_vl": "qwen3_vl", "minicpm_v4_6": "minicpmv4_6"}
# ms-swift's `apply_liger` (swift/pipelines/train/tuner.py) covers these; it raises on minicpmv4_6
SWIFT_LIGER = {"qwen2_5_vl", "qwen3_vl"}

TRL = {
    "per_device_train_batch_size": 8,
    "gradient_accumulation_steps": 2,
    "gradient_checkpointing": True,
    "max_length": None,
    "padding_free": False,
    "attn_implementation": "sdpa",
    "dataloader_num_workers": 0,
    "warmup_steps": 0.05,
    "lr_scheduler_type": "cosine",
    **OURS_OPTIM,
}
SWIFT_CAPTION = {  # ms-swift's COCO-caption LoRA example for one GPU (examples/train/multimodal/caption.sh)
    "tuner_type": "lora",
    "torch_dtype": "bfloat16",
    "per_device_train_batch_size": 1,
    "gradient_accumulation_steps": 16,
    "freeze_vit": True,
    "freeze_aligner": True,
    "gradient_checkpointing": True,
    "max_length": 2048,
    "dataloader_num_workers": 4,
    "warmup_ratio": 0.05,
    "attn_impl": "sdpa",
    "padding_free": False,
    **OURS_OPTIM,
}
SWIFT = {
    **SWIFT_CAPTION,
    "per_device_train_batch_size": 8,
    "gradient_accumulation_steps": 2,
    "use_liger_kernel": "auto",
}
SWIFT_PADDING_FREE = {**SWIFT, "padding_free": True, "attn_impl": "flash_attn"}
# name -> (runner, settings); `ours` is entry_bench's <family>_qkv_default
PEERS: dict[str, tuple[str, dict]] = {
    "trl": ("trl", TRL),
    "swift_padding_free": ("swift", SWIFT_PADDING_FREE),
    "swift": ("swift", SWIFT),
    "swift_caption": ("swift", SWIFT_CAPTION),
}
# where each setting comes from: the peer's documentation / example, or matched to ours, or forced
SOURCES = {
    "trl": {
        "per_device_train_batch_size": "TRL: SFTConfig's default (8)",
        "gradient_accumulation_steps": "ours: 8 x 2 = the global batch of 16",
        "gradient_checkpointing": "TRL: SFTConfig's default (True)",
        "bf16": "TRL: SFTConfig's default; the model loaded in bfloat16 as examples/scripts/sft_vlm.py",
        "max_length": "TRL: None for VLMs (SFT docs, 'Training Vision Language Models'; sft_vlm.py)",
        "padding_free": "TRL 1.16: SFTTrainer refuses padding_free for vision datasets",
        "attn_implementation": "transformers' default sdpa: no flash-attn package on the GPU machine",
        "dataloader_num_workers": "TRL: TrainingArguments' default (0); images are processed in the collator",
        "dataset": "TRL: conversational 'messages' + 'images'; loss on every token of the conversation "
        "(assistant_only_loss needs {% generation %} markers, which the twins' templates lack)",
        "optimizer": "ours: lr 1e-4 (TRL's default 2e-5), weight decay 0.1, warmup 5%, cosine, clip 0.5",
        "lora": "ours: r 8, alpha 32, dropout 0.05 on the LLM's q/k/v (lora=qkv's modules)",
    },
    "swift": {
        "recipe": "ms-swift: examples/train/multimodal/caption.sh (COCO captions, LoRA, one GPU): bf16, "
        "freeze_vit, freeze_aligner, max_length 2048, 4 data workers, lr 1e-4, r 8, alpha 32, warmup 5%, "
        "gradient checkpointing (swift's default)",
        "per_device_train_batch_size": "swift_caption: the example's 1 x 16; swift and swift_padding_free: "
        "8 x 2 (examples/train/padding_free/sft.sh's per-device 8; global batch 16 = ours)",
        "padding_free": "ms-swift: --padding_free true with --attn_impl flash_attn "
        "(examples/train/padding_free/sft.sh); SftArguments refuses padding_free without a flash attention",
        "use_liger_kernel": "ms-swift: --use_liger_kernel true (examples/train/liger/sft.sh) where its "
        "apply_liger knows the model type (qwen2_5_vl, qwen3_vl; not minicpmv4_6) and liger-kernel imports",
        "target_regex": "ours: the same q/k/v modules (the example's all-linear would train more)",
        "optimizer": "ours: weight decay 0.1, clip 0.5 (lr 1e-4 and warmup 5% are the example's too)",
    },
}
SWIFT_SOURCES = SOURCES["swift"]
PADDING_FREE_WHY = (
    "ms-swift 4.6 refuses --padding_free without --attn_impl flash_attn / flash_attention_2/3/4 "
    "(SftArguments._check_padding_free); with flash_attn, transformers fails at the model's load because the "
    "flash-attn package is absent, and none of them installs on the GPU machine: flash-attn (2) has no "
    "wheel on PyPI and cannot be compiled there; flash-attn-3 has none on PyPI; flash-attn-4 needs "
    "nvidia-cutlass-dsl-libs-cu12/cu13 (92 MB wheels, over the 64 MiB a call carries); transformers' "
    "kernels-community fallback downloads from the Hub, and the machine has no network."
)


# ----- one peer run
def target_regex(family_name: str, folder: Path) -> str:
    """Returns one full-match regex over exactly the module names our lora=qkv targets in this model."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    from pipeline.families import get_family

    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(folder))
    names = get_family(family_name).lora_target_names(model, "qkv")
    return "^(" + "|".join(re.escape(n) for n in names) + ")$"


def resolve_settings(name: str, family: str, tiny: bool) -> dict:
    runner, settings = PEERS[name]
    settings = dict(settings)
    if settings.get("use_liger_kernel") == "auto":  # the runner also drops it when liger-kernel is absent
        settings["use_liger_kernel"] = family in SWIFT_LIGER and not tiny
    return settings


def run_peer(
    name: str,
    family: str,
    folder: Path,
    rows: Path,
    steps: int,
    args: argparse.Namespace,
    log_file: Path,
    **overrides,
) -> dict:
    """Runs one peer through bench/peer_runner.py in its own process (its settings with `overrides`);
    returns its raw result (or an error)."""
    runner, _ = PEERS[name]
    work = args.work / "peers" / f"{family}_{name}"
    work.mkdir(parents=True, exist_ok=True)
    spec = {
        "peer": runner,
        "model": str(folder),
        "family": family,
        "swift_model_type": SWIFT_MODEL_TYPES[family],
        "rows": str(rows),
        "n_rows": steps * GLOBAL_BATCH,
        "steps": steps,
        "tiny": args.tiny,
        "settings": {**resolve_settings(name, family, args.tiny), **overrides},
        "lora": {**LORA, "target_regex": target_regex(family, folder)},
        "work": str(work),
        "out": str(work / "result.json"),
    }
    path = args.trl_path if runner == "trl" else args.swift_path
    started = time.perf_counter()
    rc, out, command = launch_runner(spec, work, path, args.timeout)
    wall = time.perf_counter() - started
    with log_file.open("a") as f:
        f.write(f"===== {family}_{name} (rc {rc}, {wall:.0f} s)\n" + " ".join(command) + "\n\n" + out + "\n")
    result = json.loads((work / "result.json").read_text()) if (work / "result.json").is_file() else {}
    result.update(rc=rc, wall_s=round(wall, 1), settings=spec["settings"])
    if rc == 124:  # its steps so far (the runner writes them after each) still give its rates
        steps = len(result.get("step_seconds", []))
        result.setdefault("error", f"timed out after {args.timeout} s, {steps} step(s) done")
    elif "error" not in result and rc != 0:
        result["error"] = out.strip().splitlines()[-1] if out.strip() else f"exit status {rc}, no output"
    return result


def launch_runner(
    spec: dict, work: Path, packages: str | Path | None, timeout: float
) -> tuple[int, str, list[str]]:
    """Returns (exit status, 124 on timeout; stdout and stderr; the command) of bench.peer_runner run on
    `spec` (written to work/spec.json; its result goes to spec["out"]) with `packages` first on PYTHONPATH."""
    (work / "spec.json").write_text(json.dumps(spec, indent=2) + "\n")
    Path(spec["out"]).unlink(missing_ok=True)
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in [str(packages or ""), str(REPO), os.environ.get("PYTHONPATH", "")] if p
    )
    command = [sys.executable, "-m", "bench.peer_runner", str(work / "spec.json")]
    try:
        proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        return proc.returncode, proc.stdout + proc.stderr, command
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode(errors="replace") + (exc.stderr or b"").decode(errors="replace")
        return 124, out, command


def peer_metrics(raw: dict, flops: float) -> dict:
    """entry_bench's `sft_metrics` for a peer's recorded steps."""
    seconds, tokens, padded = (
        raw.get("step_seconds", []),
        raw.get("step_tokens", []),
        raw.get("step_padded", []),
    )
    out: dict = {"steps": len(seconds), "first_losses": [round(x, 4) for x in raw.get("losses", [])[:3]]}
    if raw.get("peak_gb") is not None:
        out["peak_gb"] = raw["peak_gb"]
    steady = list(range(len(seconds)))[2:] or list(range(len(seconds)))[-1:]
    if not steady:
        return out
    samples = statistics.median(GLOBAL_BATCH / seconds[i] for i in steady)
    out.update(
        samples_per_s=round(samples, 2),
        tokens_per_s=round(statistics.median(tokens[i] / seconds[i] for i in steady)),
        padding_pct=round(statistics.median(100 * (1 - tokens[i] / max(padded[i], 1)) for i in steady), 1),
        mfu_pct=round(100 * samples * flops / (PEAK_TFLOPS * 1e12), 1) if flops else None,
        epoch_minutes=round(COCO_TRAIN_ROWS / samples / 60, 1),
    )
    return out


def peer_row(name: str, family: str, raw: dict, flops: float) -> dict:
    runner, settings = PEERS[name]
    row = {
        "setting": f"{family}_{name}",
        "rc": raw["rc"],
        "wall_s": raw["wall_s"],
        "mode": f"{family}/lora_qkv",
        "data": "coco",
        "flops_per_row": flops,
        "peer": name,
        "versions": raw.get("versions", {}),
        "settings": raw["settings"],
        "sources": SOURCES[runner],
        "micro_batches": settings["gradient_accumulation_steps"],
        **peer_metrics(raw, flops),
    }
    for key in ("resolved", "trainable_params", "arguments", "liger_error", "error"):
        if key in raw:
            row[key] = raw[key]
    if name == "swift_padding_free" and "flash" in raw.get("error", "").lower():
        row["why"] = PADDING_FREE_WHY
    return row


# ----- the call
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/peers-bench")))
    parser.add_argument("--work", type=Path, default=None, help="model and data folder (default: --out/work)")
    parser.add_argument(
        "--families", nargs="*", default=list(SWIFT_MODEL_TYPES), choices=list(SWIFT_MODEL_TYPES)
    )
    parser.add_argument("--peers", nargs="*", default=["ours", "trl", "swift_padding_free", "swift"])
    parser.add_argument(
        "--rows", type=int, default=1000, help="COCO-shaped rows written (ours reads them all)"
    )
    parser.add_argument("--steps", type=int, default=5, help="optimizer steps of a peer")
    parser.add_argument("--ours-steps", type=int, default=6, help="optimizer steps of our row")
    parser.add_argument("--caption-steps", type=int, default=4, help="optimizer steps of swift_caption")
    parser.add_argument("--timeout", type=int, default=240, help="seconds per row")
    parser.add_argument("--trl-path", default=os.environ.get("PEERS_TRL"), help="TRL's pip --target dir")
    parser.add_argument(
        "--swift-path", default=os.environ.get("PEERS_SWIFT"), help="ms-swift's pip --target dir"
    )
    parser.add_argument("--tiny", action="store_true", help="the tiny twins on the CPU: a smoke run")
    args = parser.parse_args()
    unknown = sorted(set(args.peers) - {"ours", *PEERS})
    if unknown:
        parser.error(f"unknown peer(s) {unknown}; known: ours, {', '.join(PEERS)}")
    args.work = args.work or args.out / "work"
    args.out.mkdir(parents=True, exist_ok=True)
    log_file = args.out / "peers_logs.txt"
    log_file.write_text("")
    t0 = time.perf_counter()
    rows = write_data(args.work, "coco", args.rows, args.tiny)
    print(f"data ready in {time.perf_counter() - t0:.0f} s", flush=True)
    sample_rows = [json.loads(line) for line in rows.read_text().splitlines()[:64]]
    results = []
    for family in args.families:
        folder = write_family_model(args.work / f"{family}_random", family, args.tiny)
        print(f"{family} ready at {time.perf_counter() - t0:.0f} s: {folder}", flush=True)
        flops: dict[bool, float] = {}  # by gradient checkpointing; ours counts its own
        ours = None
        for name in args.peers:
            if name == "ours":
                setting = f"{family}_qkv_default"
                assert setting in FAMILY_SETTINGS
                row = run_family_setting(
                    setting, args.work, rows, args.ours_steps, args.tiny, args.timeout, log_file
                )
                row["peer"] = "ours"
                ours = row
            else:
                steps = args.caption_steps if name == "swift_caption" else args.steps
                raw = run_peer(name, family, folder, rows, steps, args, log_file)
                if (
                    name == "swift"
                    and raw.get("error")
                    and raw["settings"].get("use_liger_kernel")
                    and raw["rc"] != 124
                ):
                    # --use_liger_kernel "if it runs": once more without it, the failure kept in the row
                    liger_error = raw["error"]
                    raw = run_peer(name, family, folder, rows, steps, args, log_file, use_liger_kernel=False)
                    raw["liger_error"] = liger_error
                checkpointing = bool(PEERS[name][1].get("gradient_checkpointing"))
                if checkpointing not in flops:
                    flops[checkpointing] = family_flops(family, folder, sample_rows, checkpointing)
                row = peer_row(name, family, raw, flops[checkpointing])
                if ours and ours.get("samples_per_s") and row.get("samples_per_s"):
                    row["vs_ours"] = round(row["samples_per_s"] / ours["samples_per_s"], 3)
            results.append(row)
            print(json.dumps({k: v for k, v in row.items() if k not in ("sources", "arguments")}), flush=True)
            (args.out / "peers_results.partial.json").write_text(json.dumps(results, indent=2) + "\n")
    info = run_info(rows=args.rows, global_batch=GLOBAL_BATCH)
    (args.out / "peers_results.json").write_text(
        json.dumps({"info": info, "results": results}, indent=2) + "\n"
    )
    table = markdown(results)
    (args.out / "peers_results.md").write_text(table + "\n")
    print(json.dumps(info))
    print(table)


def markdown(results: list[dict]) -> str:
    lines = [
        "| setting | peer | versions | samples/s | x ours | tokens/s | pad % | MFU % | peak GB | first losses |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        versions = r.get("versions", {})
        version = " ".join(
            f"{k} {versions[k]}" for k in ("trl", "ms-swift", "transformers", "peft") if k in versions
        )
        lines.append(
            f"| {r['setting']} | {r.get('peer', '')} | {version} | {r.get('samples_per_s', 'fail')} | "
            f"{r.get('vs_ours', '')} | {r.get('tokens_per_s', '')} | {r.get('padding_pct', '')} | "
            f"{r.get('mfu_pct', '')} | {r.get('peak_gb', '')} | {r.get('first_losses') or r.get('error', '')} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
