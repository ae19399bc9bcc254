"""What a family's forward needs to know of a sharding engine (FSDP, DeepSpeed ZeRO-3): whether a module's
weights are gathered in its own calls, and the largest count over the processes (so that every process makes
as many such calls as the others)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel


def gathers_weights(module: nn.Module) -> bool:
    """Whether a sharding engine gathers this module's weights in its own forward (and backward): an FSDP
    unit, or any module under DeepSpeed ZeRO-3. Every process must then call it as often as the others."""
    if isinstance(module, (FSDPModule, FullyShardedDataParallel)):
        return True
    return any(hasattr(p, "ds_id") for p in module.parameters())


def gathers_anywhere(module: nn.Module) -> bool:
    """Whether a sharding engine gathers the weights of this module, or of a module within it, in their own
    calls (ZeRO-3, or FSDP units inside it)."""
    units = (FSDPModule, FullyShardedDataParallel)
    return gathers_weights(module) or any(isinstance(m, units) for m in module.modules())


def most_over_ranks(count: int, device: torch.device) -> int:
    """The largest `count` over all processes (one all-reduce)."""
    return most_of_each_over_ranks([count], device)[0]


def most_of_each_over_ranks(counts: list[int], device: torch.device) -> list[int]:
    """The largest of each of `counts` over all processes (one all-reduce for all of them)."""
    most = torch.tensor(counts, device=device)
    dist.all_reduce(most, op=dist.ReduceOp.MAX)
    return [int(n) for n in most.tolist()]


def module_classes(model: nn.Module) -> set[str]:
    """The class names of the modules in `model` (any wrapper included)."""
    return {type(m).__name__ for m in model.modules()}


def shard_units(model: nn.Module) -> list[str]:
    """The class names of the modules that a sharding engine makes its own units: those the model declares
    whole (transformers' `_no_split_modules`: its decoder layers, vision blocks, ...) that occur in it. Read
    through any PEFT wrapper; a class a model declares but does not build (a tower it lacks) is left out."""
    declared = getattr(model, "_no_split_modules", None) or []
    present = module_classes(model)
    return sorted(name for name in declared if name in present)
