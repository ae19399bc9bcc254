"""One process of the HF-native families' FSDP test (tests/training/test_fsdp.py starts two with torchrun, gloo,
on the CPU).

    torchrun --nproc_per_node 2 tests/training/fsdp_family_worker.py FAMILY TWIN_FOLDER OUT_DIR

The family's twin with LoRA on every linear layer (lora=all: the vision tower trains), sharded in the units a
run under bench/accelerate/fsdp.yaml gets (pipeline.families.sharding.shard_units), the whole model a unit
of its own too. Rank 0's micro-batch has an image, rank 1's none: rank 1 still passes a blank image through
the sharded tower (HFNativeFamily.balanced_vision), or the ranks' gathers pair up wrongly (or wait forever).
Rank 0 writes OUT_DIR/result.json: the units, each rank's loss sharded and unsharded, and every trainable
parameter's gradient (FSDP's mean over the ranks) against the mean of the unsharded model's per-rank ones.
"""

from __future__ import annotations

import json
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from PIL import Image
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from pipeline.data.images import ImageFiles  # noqa: E402
from pipeline.data.sources import read_custom_file  # noqa: E402
from pipeline.families import get_family  # noqa: E402
from pipeline.families.sharding import shard_units  # noqa: E402
from tests.helpers import LORA_ALL, loss_and_grads, write_rows  # noqa: E402


def build(family, twin: Path) -> tuple:
    """The bundle and its lora=all model, LoRA's B moved off zero so that every LoRA weight gets a gradient."""
    bundle = family.load_bundle(twin)
    torch.manual_seed(0)
    model = family.prepare_training(bundle, LORA_ALL, False, str(bundle.base_path))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.02)
    return bundle, model.train()


def rank_batches(family, bundle, folder: Path) -> list[dict]:
    """Rank 0's micro-batch (a row with an image) and rank 1's (a text-only row)."""
    Image.new("RGB", (64, 48), (200, 40, 40)).save(folder / "red.png")
    rows = [
        {"query": "<image>What colour is this?", "response": "Red.", "images": [str(folder / "red.png")]},
        {"query": "What is 2 + 3?", "response": "2 + 3 = 5"},
    ]
    parsed, problems = read_custom_file(write_rows(folder / "rows.jsonl", rows))
    assert not problems, problems
    samples = family.dataset(bundle, parsed, 4096, "delete", ImageFiles())
    collate = family.training_collate(bundle)
    return [collate([samples[i]]) for i in range(len(rows))]


def main() -> None:
    name, twin, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))  # a hang fails instead of waiting
    torch.set_num_threads(1)
    rank, world = dist.get_rank(), dist.get_world_size()
    family = get_family(name)
    folder = out / f"rank{rank}"
    folder.mkdir(parents=True, exist_ok=True)

    bundle, model = build(family, twin)
    batches = rank_batches(family, bundle, folder)
    units = shard_units(model)
    mesh = init_device_mesh("cpu", (world,))
    for module in [m for m in model.modules() if type(m).__name__ in units]:
        fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)

    loss, _ = loss_and_grads(family, model, batches[rank])
    losses = [0.0] * world
    dist.all_gather_object(losses, float(loss))
    sharded = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.grad is not None}
    if rank == 0:
        _, whole = build(family, twin)
        per_rank = [loss_and_grads(family, whole, batches[r]) for r in range(world)]
        trainable = {n: p for n, p in whole.named_parameters() if p.requires_grad}
        # a text-only row leaves the tower's LoRA weights without a gradient: zero there
        mean = {
            n: sum(grads.get(n, torch.zeros_like(p)) for _, grads in per_rank) / world
            for n, p in trainable.items()
        }
        cosines = {
            n: float(torch.nn.functional.cosine_similarity(sharded[n].flatten(), g.flatten(), dim=0))
            for n, g in mean.items()
            if g.norm() > 0
        }
        result = {
            "units": units,
            "losses": [losses, [float(sum_) for sum_, _ in per_rank]],
            "trainable": sorted(trainable),
            "sharded_grads": sorted(sharded),
            "cosines": cosines,
            "max_abs_diff": max(float((sharded[n] - g).abs().max()) for n, g in mean.items() if n in sharded),
        }
        (out / "result.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
