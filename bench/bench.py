"""GPU benchmark: the full-size MiniCPM-V-2 (random weights, no checkpoint) training and inference speed.

    python bench/bench.py [--quick] [--out bench/results.json]

Training rows compare, in one process on one card, this project's path with a plain baseline of the same
model and inputs, the way a transformers + PEFT loop runs it:
  - baseline: full [B, T, vocab] fp32 logits + shifted cross-entropy, images through the vision tower one at a
    time, torch AdamW (for-each), gradient checkpointing as configured;
  - ours: cross-entropy on supervised positions only (chunked, no full logits), same-size images batched
    through the tower, fused AdamW.
Each sample: one 448x448 image (64 query tokens; or 5 for a sliced 896x896 photo) + text up to T tokens; the
last 10% of tokens are the supervised response (captions are short). MFU counts, per LLM token, 4N (LoRA:
frozen weights need no weight gradient) or 6N (full) FLOPs, N = LLM parameters without the embeddings, plus
attention; and per image the vision tower and resampler (forward only when frozen); peak = 989 TFLOP/s
(H100/H200 dense bf16). `mfu_llm` counts the LLM alone.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from pipeline.families.base import IGNORE_INDEX
from pipeline.families.minicpm_v2.configuration import MiniCPMVConfig
from pipeline.families.minicpm_v2.generation import GenerationSettings, generate
from pipeline.families.minicpm_v2.lora import apply_lora, build_lora_config, set_full_finetune
from pipeline.families.minicpm_v2.modeling import MiniCPMV

PEAK_TFLOPS = 989.0
Q = 64


def make_batch(batch: int, length: int, vocab: int, device, images: int = 1) -> dict:
    """`images` 448x448 images per sample: 1 = unsliced; 5 = an 896x896 photo sliced the MiniCPM-V-2 way
    (the downscaled source plus a 2x2 grid of slices), 64 query tokens each, each between its own markers."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(200, vocab - 1, (batch, length), generator=g)
    ids[:, 0] = 1
    spans = []
    pos = 1
    for _ in range(images):
        ids[:, pos] = 101
        ids[:, pos + 1 : pos + 1 + Q] = 0
        ids[:, pos + 1 + Q] = 102
        spans.append([pos + 1, pos + 1 + Q])
        pos += Q + 2
    labels = torch.full_like(ids, IGNORE_INDEX)
    sup = max(length // 10, 8)
    labels[:, -sup:] = ids[:, -sup:]
    pixels = [[torch.randn(3, 448, 448, generator=g) for _ in range(images)] for _ in range(batch)]
    bounds = [torch.tensor(spans) for _ in range(batch)]
    return {
        "input_ids": ids.to(device),
        "labels": labels.to(device),
        "pixel_values": pixels,
        "image_bound": bounds,
    }


def baseline_loss(model: MiniCPMV, batch: dict) -> torch.Tensor:
    core = model
    embeds = core.llm.model.embed_tokens(batch["input_ids"]) * core.config.scale_emb
    for b, (imgs, bounds) in enumerate(zip(batch["pixel_values"], batch["image_bound"], strict=True)):
        for img, (s, e) in zip(
            imgs, bounds.tolist(), strict=True
        ):  # one image at a time, as the original loop
            q = core.encode_images([img])[0]
            embeds[b, s:e] = q.to(embeds.dtype)
    t = embeds.shape[1]
    pos = torch.arange(t, device=embeds.device)[None].expand(embeds.shape[0], -1)
    hidden = core.llm.model(embeds, pos, None)
    logits = core.llm.logits(hidden)  # [B, T, V] fp32
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1))


def ours_loss(model: MiniCPMV, batch: dict) -> torch.Tensor:
    return model(**batch).loss


def llm_flops_per_token(cfg: MiniCPMVConfig, length: int, mode: str) -> float:
    h, i, n = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    matmul = n * (4 * h * h + 3 * h * i) + h * cfg.vocab_size  # params touched per token (lm_head included)
    attn = n * 2 * length * h  # QK^T and PV, per token, causal average counted in full
    fwd = 2 * matmul + 2 * attn
    return fwd * (2 if mode == "lora" else 3)  # LoRA: fwd + input grads; full: + weight grads


def vision_flops_per_image(model: MiniCPMV, mode: str, gc: bool) -> float:
    """FLOPs the vision tower and resampler spend on one 448x448 image: every linear of the tower (and the
    resampler's key/value projection) sees all patches, the resampler's other linears its 64 queries. Frozen
    (lora_qkv): forward only; LoRA on the tower: + input gradients; full: + weight gradients."""
    core = model.get_base_model() if hasattr(model, "get_base_model") else model
    patches = (448 // core.vpm.patch_embed.patch_size[0]) ** 2

    def linear_params(module: torch.nn.Module) -> int:
        return sum(m.weight.numel() for m in module.modules() if isinstance(m, torch.nn.Linear))

    d = core.vpm.embed_dim
    tower = patches * (linear_params(core.vpm) + core.vpm.patch_embed.proj.weight.numel())
    tower += len(core.vpm.blocks) * 2 * patches * patches * d  # attention scores and values
    kv = linear_params(core.resampler.kv_proj)
    e = core.resampler.attn.embed_dim  # the attention's packed input projection is no nn.Linear
    resampler = patches * kv + Q * (linear_params(core.resampler) - kv) + (Q + 2 * patches) * e * e
    resampler += 2 * Q * patches * e
    fwd = 2 * (tower + resampler)
    factor = {"lora_qkv": 1, "lora_all": 2, "full": 3}[mode]
    return fwd * factor * (4 / 3 if gc and factor > 1 else 1)


def build(mode: str, device) -> MiniCPMV:
    torch.manual_seed(0)
    with torch.device(device):
        model = MiniCPMV(MiniCPMVConfig())
    if mode == "full":
        set_full_finetune(model)
        return model.float()
    model = model.to(torch.bfloat16)
    for p in model.parameters():
        p.requires_grad_(False)
    preset = "qkv" if mode == "lora_qkv" else "all"
    return apply_lora(model, build_lora_config(model, preset, r=8, alpha=32, dropout=0.05))


def time_training(model, loss_fn, batch, steps: int, fused: bool, gc: bool) -> dict:
    core = model.get_base_model() if hasattr(model, "get_base_model") else model
    (core.gradient_checkpointing_enable if gc else core.gradient_checkpointing_disable)()
    # The loss before any update, without dropout: equal across implementations up to bf16 rounding.
    core.eval()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        start_loss = float(loss_fn(core, batch))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=fused or None, foreach=None if fused else True)
    model.train()
    torch.cuda.reset_peak_memory_stats()
    for i in range(steps + 3):
        if i == 3:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_fn(core, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    b, t = batch["input_ids"].shape
    return {
        "s_per_step": dt,
        "tokens_per_s": b * t / dt,
        "samples_per_s": b / dt,
        "peak_gb": torch.cuda.max_memory_allocated() / 1024**3,
        "start_loss": start_loss,
    }


# (mode, batch, length, gradient checkpointing, images per sample)
CASES = [
    ("lora_qkv", 8, 1024, False, 1),
    ("lora_qkv", 1, 2048, True, 1),
    ("lora_all", 1, 2048, True, 1),
    ("full", 1, 2048, True, 1),
    ("lora_qkv", 16, 512, False, 1),
    ("lora_qkv", 8, 1024, False, 5),
    ("lora_all", 8, 1024, True, 5),  # without checkpointing, 40 images of tower activations exceed 80 GB
]
IMPLS = {
    "baseline": (baseline_loss, False, None),
    "ours": (ours_loss, True, None),
    "ours+compile": (ours_loss, True, "reduce-overhead"),
}


def train_one(case: int, impl: str, steps: int, device) -> dict:
    """Runs one (case, implementation) pair; called in a fresh process so memory figures are its own."""
    mode, b, t, gc, n_img = CASES[case]
    fn, fused, compile_mode = IMPLS[impl]
    model = build(mode, device)
    if impl == "ours+compile":
        torch._dynamo.config.cache_size_limit = 64
        core = model.get_base_model() if hasattr(model, "get_base_model") else model
        core.compile_blocks(compile_mode)
    cfg = MiniCPMVConfig()
    batch = make_batch(b, t, cfg.vocab_size, device, images=n_img)
    try:
        r = time_training(model, fn, batch, steps, fused, gc)
        flops = llm_flops_per_token(cfg, t, "full" if mode == "full" else "lora") * (4 / 3 if gc else 1)
        r["mfu_llm"] = r["tokens_per_s"] * flops / (PEAK_TFLOPS * 1e12)
        image_flops = n_img * vision_flops_per_image(model, mode, gc)
        r["mfu"] = r["samples_per_s"] * (t * flops + image_flops) / (PEAK_TFLOPS * 1e12)
    except torch.OutOfMemoryError:
        r = {"oom": True}
    return {"mode": mode, "batch": b, "length": t, "grad_ckpt": gc, "images": n_img, "impl": impl, **r}


def train_rows(args, device) -> list[dict]:
    import subprocess
    import sys

    rows = []
    cases = args.cases if args.cases else (range(2) if args.quick else range(len(CASES)))
    for case in cases:
        impls = (
            args.impls or (["ours", "ours+compile"] if CASES[case][0] == "full" else list(IMPLS))
        )  # full fine-tuning: whether it fits one card is the question, the baseline's fp32 logits add nothing
        for impl in impls:
            cmd = [
                sys.executable,
                "-m",
                "bench.bench",
                "--case",
                str(case),
                "--impl",
                impl,
                "--steps",
                str(args.steps),
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            lines = [line for line in proc.stdout.splitlines() if line.startswith('{"mode"')]
            row = (
                json.loads(lines[-1])
                if lines
                else {
                    "mode": CASES[case][0],
                    "batch": CASES[case][1],
                    "length": CASES[case][2],
                    "grad_ckpt": CASES[case][3],
                    "images": CASES[case][4],
                    "impl": impl,
                    "error": proc.stderr[-400:],
                }
            )
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


@torch.no_grad()
def infer_rows(args, device) -> list[dict]:
    """Prefill latency and decode speed: eager decode (the baseline) vs static shapes + CUDA graph."""
    torch.manual_seed(0)
    with torch.device(device):
        model = MiniCPMV(MiniCPMVConfig())
    model = model.to(torch.bfloat16).eval()
    rows = []
    n = 64 if args.quick else 128
    for b in (1, 16):
        batch = make_batch(b, 512, model.config.vocab_size, device)
        ids, px, bounds = batch["input_ids"], batch["pixel_values"], batch["image_bound"]
        row = {"batch": b, "prompt": 512, "new_tokens": n}
        outputs = {}
        for impl, static in (("eager", False), ("static+graph", True)):

            def run(k: int, static=static, ids=ids, px=px, bounds=bounds):
                return generate(
                    model,
                    ids,
                    None,
                    px,
                    bounds,
                    GenerationSettings(max_new_tokens=k),
                    eos_token_id=-1,
                    static=static,
                )

            run(2)
            run(2)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            run(1)
            torch.cuda.synchronize()
            prefill = time.perf_counter() - t0
            t0 = time.perf_counter()
            outputs[impl] = run(n)
            torch.cuda.synchronize()
            total = time.perf_counter() - t0
            row[f"{impl}_prefill_ms"] = prefill * 1e3
            row[f"{impl}_decode_tokens_per_s"] = b * (n - 1) / max(total - prefill, 1e-9)
        row["same_tokens"] = bool(torch.equal(outputs["eager"], outputs["static+graph"]))
        row["speedup"] = row["static+graph_decode_tokens_per_s"] / row["eager_decode_tokens_per_s"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--out", default="bench/results.json")
    p.add_argument("--only", choices=["train", "infer"], default=None)
    p.add_argument("--cases", type=int, nargs="+", default=None, help="indices into CASES")
    p.add_argument("--impls", nargs="+", choices=list(IMPLS), default=None)
    p.add_argument("--case", type=int, default=None, help="run one training case (internal)")
    p.add_argument("--impl", choices=list(IMPLS), default=None)
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/bench.py needs a CUDA GPU")
    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    if args.case is not None:  # a child process of train_rows: one case, one implementation
        print(json.dumps(train_one(args.case, args.impl, args.steps, device)), flush=True)
        return
    info = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
    }
    print(json.dumps(info), flush=True)
    results = {
        "info": info,
        "train": train_rows(args, device) if args.only != "infer" else [],
        "infer": infer_rows(args, device) if args.only != "train" else [],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(
        "\n| mode | batch x len | images | grad ckpt | impl | tokens/s | samples/s | peak GB | MFU |"
        " loss at start |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results["train"]:
        head = f"| {r['mode']} | {r['batch']}x{r['length']} | {r.get('images', 1)} | {r['grad_ckpt']} | {r['impl']} | "
        if "tokens_per_s" not in r:
            print(head + ("OOM" if r.get("oom") else "error") + " | | | | |")
            continue
        print(
            head + f"{r['tokens_per_s']:.0f} | {r['samples_per_s']:.2f} | {r['peak_gb']:.1f} | "
            f"{100 * r['mfu']:.1f}% | {r['start_loss']:.4f} |"
        )
    print(
        "\n| decode batch | prefill ms (512 tokens) | eager decode tok/s | static+graph decode tok/s | speed-up |"
        " same tokens |"
    )
    print("|---|---|---|---|---|---|")
    for r in results["infer"]:
        print(
            f"| {r['batch']} | {r['static+graph_prefill_ms']:.1f} | {r['eager_decode_tokens_per_s']:.1f} | "
            f"{r['static+graph_decode_tokens_per_s']:.1f} | {r['speedup']:.2f}x | {r['same_tokens']} |"
        )


if __name__ == "__main__":
    main()
