"""Does compiling the blocks change the model's output? Full-size MiniCPM-V-2 (random weights), one sample,
eval mode: the vision queries and the loss, plain against compiled, in fp32 and in bf16 autocast.

    PYTHONPATH=$PWD python3 -m bench.compile_check [--preset qkv|all]
"""

from __future__ import annotations

import argparse
import json

import torch

from bench.bench import build, make_batch
from pipeline.families.minicpm_v2.configuration import MiniCPMVConfig


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--mode", default="lora_all", choices=["lora_qkv", "lora_all"])
    args = p.parse_args()
    device = torch.device("cuda")
    model = build(args.mode, device).float().eval()
    core = model.get_base_model()
    batch = make_batch(1, 512, MiniCPMVConfig().vocab_size, device)
    rows = {}
    for name in ("plain", "compiled"):
        if name == "compiled":
            core.compile_blocks(None)
        for precision in ("fp32", "bf16"):
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16"):
                q = core.encode_images(batch["pixel_values"][0])[0].float()
                loss = float(core(**batch).loss)
            rows[f"{name}/{precision}"] = (q, loss)
    out = {}
    for precision in ("fp32", "bf16"):
        (qa, la), (qb, lb) = rows[f"plain/{precision}"], rows[f"compiled/{precision}"]
        out[precision] = {
            "query_rel_diff": float((qa - qb).norm() / qa.norm()),
            "loss_plain": la,
            "loss_compiled": lb,
        }
    out["bf16_vs_fp32_plain_loss"] = rows["plain/bf16"][1] - rows["plain/fp32"][1]
    out["bf16_vs_fp32_query_rel_diff"] = float(
        (rows["plain/bf16"][0] - rows["plain/fp32"][0]).norm() / rows["plain/fp32"][0].norm()
    )
    print(json.dumps({"mode": args.mode, **out}, indent=1))


if __name__ == "__main__":
    main()
