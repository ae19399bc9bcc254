"""One process of the FSDP checkpoint test (tests/training/test_fsdp.py starts two with torchrun, gloo, on the CPU).

    torchrun --nproc_per_node 2 tests/training/fsdp_worker.py {lora,pissa,full} OUT_DIR

Every decoder layer and vision block is its own FSDP2 unit (as bench/accelerate/fsdp.yaml wraps them), so
each process holds half of every weight and of its AdamW state. Run A trains 4 steps and saves a
checkpoint after step 2; run B, a fresh sharded model, resumes from that checkpoint and trains steps 3-4.
Rank 0 writes both runs' losses and, for each parameter, the local shard's and the full shape to
OUT_DIR/result.json, and the losses of a step where one rank's batch has no image, sharded and unsharded. Every rank sees the same batches, so the loss curve is also a one-process run's.
`pissa`: LoRA started from the base weights (lora.init_weights=pissa): its checkpoint holds the rank-2r
adapter of the original base, and run B rebuilds the residual base from it before sharding.
"""

from __future__ import annotations

import json
import sys
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from pipeline.families.minicpm_v2.family import MiniCPMV2  # noqa: E402
from pipeline.families.minicpm_v2.lora import apply_lora, build_lora_config, set_full_finetune  # noqa: E402
from pipeline.families.minicpm_v2.modeling import MiniCPMV  # noqa: E402
from pipeline.training.checkpoints import (  # noqa: E402
    TrainerState,
    load_training_checkpoint,
    save_training_checkpoint,
)
from pipeline.training.residual_lora import ResidualAdapter  # noqa: E402
from tests.families.test_model import batch, small_config  # noqa: E402

STEPS, SAVE_AT = 4, 2


def build(mode: str, sharded: bool, resume_from: Path | None = None):
    """The small model with LoRA on q/k/v (or all weights trainable), AdamW and a linear schedule."""
    return build_with_start(mode, sharded, resume_from)[:3]


def build_with_start(mode: str, sharded: bool, resume_from: Path | None = None):
    """build(), and for `pissa` the adapter's initial half (decomposed now, or from `resume_from`)."""
    torch.manual_seed(0)
    model = MiniCPMV(small_config())
    start = None
    if mode in ("lora", "pissa"):
        for p in model.parameters():
            p.requires_grad_(False)
        config = build_lora_config(model, "qkv", r=4, alpha=8, dropout=0.0)
        if mode == "pissa" and resume_from is None:
            config.init_lora_weights = "pissa"
        model = apply_lora(model, config)
        if mode == "pissa":
            start = (
                ResidualAdapter.restore(model, resume_from)
                if resume_from is not None
                else ResidualAdapter.snapshot(model, "pissa")
            )
    else:
        set_full_finetune(model)
    core = model if mode == "full" else model.get_base_model()
    if sharded:
        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        for unit in [*core.llm.model.layers, *core.vpm.blocks]:
            fully_shard(unit, mesh=mesh)
        fully_shard(model, mesh=mesh)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2 if mode == "lora" else 1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 - s / (2 * STEPS))
    return model, optimizer, scheduler, start


def writer(base: Path):
    """MiniCPM-V-2's writer of full weights (the official layout), side files from `base`."""
    return MiniCPMV2().checkpoint_writer(SimpleNamespace(base_path=base))


def reader():
    """MiniCPM-V-2's reader of full weights (the official layout)."""
    return MiniCPMV2().checkpoint_reader(None)


def train_step(model, optimizer, scheduler, step: int) -> float:
    ids, pixels, bounds, labels = batch(seed=step)
    loss = model(ids, pixel_values=pixels, image_bound=bounds, labels=labels).loss
    loss.backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def rank_batch(rank: int) -> dict:
    """Rank 0 gets images, rank 1 text only."""
    ids, pixels, bounds, labels = batch(seed=99)
    if rank == 1:
        return {"input_ids": ids.clamp(min=200), "labels": labels}  # no image placeholders
    return {"input_ids": ids, "pixel_values": pixels, "image_bound": bounds, "labels": labels}


def check_against_unsharded(model, mode: str, rank: int) -> list[list[float]] | None:
    """Each rank's eval loss on its own batch, sharded, next to one unsharded copy's (on rank 0)."""
    model.eval()
    with torch.no_grad():
        mine = float(model(**rank_batch(rank)).loss)
    model.train()
    sharded = [0.0] * dist.get_world_size()
    dist.all_gather_object(sharded, mine)
    weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank != 0:
        return None
    reference, _, _ = build(mode, sharded=False)
    reference.load_state_dict(weights)
    reference.eval()
    with torch.no_grad():
        whole = [float(reference(**rank_batch(r)).loss) for r in range(len(sharded))]
    return [sharded, whole]


def mixed_batches(model, optimizer, mode: str, rank: int) -> list:
    """Evaluation and a training step where rank 1's batch has no image: the vision tower's shards must
    still be gathered on every rank, or the ranks' collectives pair up wrongly (or wait forever)."""
    before = check_against_unsharded(model, mode, rank)
    model(**rank_batch(rank)).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    after = check_against_unsharded(model, mode, rank)
    return [before, after]


def full_shapes(model) -> dict[str, list[list[int]]]:
    """name -> [local shard shape, full shape] of every trainable parameter."""
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            local = p.to_local() if hasattr(p, "to_local") else p
            out[name] = [list(local.shape), list(p.shape)]
    return out


def main() -> None:
    mode, out = sys.argv[1], Path(sys.argv[2])
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))  # a hang fails instead of waiting
    torch.set_num_threads(1)
    rank = dist.get_rank()
    sft_dir = out / "sft"
    base = out / "base"  # no side files to copy
    base.mkdir(parents=True, exist_ok=True)
    run_cfg = OmegaConf.create({"mode": mode})

    model, optimizer, scheduler, start = build_with_start(mode, sharded=True)
    losses_a = []
    for step in range(1, STEPS + 1):
        losses_a.append(train_step(model, optimizer, scheduler, step))
        if step == SAVE_AT:
            state = TrainerState(global_step=step)
            save_training_checkpoint(
                sft_dir,
                model,
                optimizer,
                scheduler,
                state,
                run_cfg,
                base,
                write_full=writer(base),
                residual=start,
            )
    shapes = full_shapes(model)
    del model, optimizer, scheduler

    ckpt = sft_dir / f"checkpoint-{SAVE_AT}"
    model, optimizer, scheduler = build(mode, sharded=True, resume_from=ckpt if mode == "pissa" else None)
    torch.manual_seed(1234)  # the checkpoint's RNG must win over whatever state the process is in
    state = load_training_checkpoint(ckpt, model, optimizer, scheduler, read_full=reader())
    losses_b = [
        train_step(model, optimizer, scheduler, step) for step in range(state.global_step + 1, STEPS + 1)
    ]
    mixed = mixed_batches(model, optimizer, mode, rank)
    if rank == 0:
        result = {
            "losses_a": losses_a,
            "losses_b": losses_b,
            "shapes": shapes,
            "world": dist.get_world_size(),
            "mixed": mixed,
        }
        (out / "result.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
