"""Profile one LoRA-qkv training step of the full-size model (random weights) at batch 1 x 2048 tokens.

    python bench/profile_step.py [--no-gc] [--compile]

Prints the wall time per step and the operators that take the most CPU and CUDA time, to tell a
launch-bound step from a compute-bound one.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from bench.bench import build, make_batch, ours_loss
from pipeline.families.minicpm_v2.configuration import MiniCPMVConfig


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--no-gc", action="store_true")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--mode", default=None, help="torch.compile mode, e.g. reduce-overhead")
    p.add_argument("--length", type=int, default=2048)
    args = p.parse_args()
    device = torch.device("cuda")
    model = build("lora_qkv", device)
    core = model.get_base_model()
    if not args.no_gc:
        core.gradient_checkpointing_enable()
    if args.compile:
        core.compile_blocks(args.mode)
    batch = make_batch(1, args.length, MiniCPMVConfig().vocab_size, device)
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-5, fused=True)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = ours_loss(core, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(4):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(5):
        step()
    torch.cuda.synchronize()
    print(f"step {(time.perf_counter() - t0) / 5 * 1e3:.1f} ms (gc={not args.no_gc}, compile={args.compile})")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=40))
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=40))


if __name__ == "__main__":
    main()
