"""AdamW with ms-swift's decay rule (no decay on biases and norms) and a warmup + decay schedule."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn
from transformers import get_scheduler

SCHEDULERS = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}


@dataclass(frozen=True)
class TrainableSummary:
    trainable: int
    total: int

    def __str__(self) -> str:
        pct = 100.0 * self.trainable / max(self.total, 1)
        return f"trainable params: {self.trainable:,} of {self.total:,} ({pct:.4f}%)"


def count_parameters(model: nn.Module) -> TrainableSummary:
    """Returns trainable and total parameter counts."""
    total = trainable = 0
    for p in model.parameters():
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return TrainableSummary(trainable, total)


def parameter_groups(
    model: nn.Module,
    weight_decay: float,
    lr: float | None = None,
    part_lrs: Mapping[str, float] | None = None,
    part_of: Mapping[int, str | None] | None = None,
    loraplus_ratio: float | None = None,
) -> list[dict]:
    """Returns AdamW groups: matrices decay, biases / norm weights / 1-d tensors do not; where `part_lrs`
    gives a part (vision, projector) its own rate, that part's parameters (`part_of`: id(param) -> part) in
    groups of their own at that rate (the others at `lr`); with `loraplus_ratio` (LoRA+), the adapters' B
    matrices in groups of their own at that multiple of their part's rate."""
    part_lrs, part_of = dict(part_lrs or {}), dict(part_of or {})
    if loraplus_ratio is not None and lr is None:
        raise ValueError("LoRA+ (optim.loraplus_lr_ratio) needs the resolved optim.lr")
    groups: dict[tuple[str, bool, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        part = part_of.get(id(param))
        key = part if part in part_lrs else ""
        decays = not (param.ndim < 2 or name.endswith(".bias") or "norm" in name.lower())
        faster = loraplus_ratio is not None and (".lora_B." in name or ".lora_embedding_B." in name)
        groups.setdefault((key, decays, faster), []).append(param)
    if not groups:
        raise ValueError("no trainable parameters: check lora.* and the freeze switches")
    out = []
    for key in ["", *part_lrs]:
        for decays in (True, False):
            for faster in (False, True):
                params = groups.get((key, decays, faster), [])
                if not params and (key or faster):
                    continue  # a part with its own rate, or LoRA+'s B matrices, with nothing trainable in it
                group: dict = {"params": params, "weight_decay": weight_decay if decays else 0.0}
                rate = part_lrs[key] if key else lr
                if faster:
                    group.update(lr=rate * loraplus_ratio, loraplus=True)
                elif rate is not None:
                    group["lr"] = rate
                if key:
                    group["part"] = key
                out.append(group)
    return out


def build_optimizer(
    model: nn.Module, optim_cfg, device: torch.device, part_of: Mapping[int, str | None] | None = None
) -> torch.optim.Optimizer:
    """Returns AdamW over the trainable parameters (the fused kernel on CUDA unless turned off), the vision
    tower and the projector at optim.vit_lr / optim.aligner_lr where set (`part_of`: id(param) -> part), the
    adapters' B matrices at optim.loraplus_lr_ratio times their rate where set (LoRA+); bitsandbytes' 8-bit
    AdamW for optim.name=adamw_bnb_8bit."""
    fused = optim_cfg.fused
    use_fused = device.type == "cuda" if fused in ("auto", None) else bool(fused)
    given = (("vision", optim_cfg.get("vit_lr")), ("projector", optim_cfg.get("aligner_lr")))
    part_lrs = {part: float(rate) for part, rate in given if rate is not None}
    ratio = optim_cfg.get("loraplus_lr_ratio")
    groups = parameter_groups(
        model,
        optim_cfg.weight_decay,
        optim_cfg.lr,
        part_lrs,
        part_of,
        None if ratio is None else float(ratio),
    )
    if optim_cfg.get("name", "adamw_torch") == "adamw_bnb_8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, lr=optim_cfg.lr, betas=tuple(optim_cfg.betas), eps=optim_cfg.eps)
    return torch.optim.AdamW(
        groups, lr=optim_cfg.lr, betas=tuple(optim_cfg.betas), eps=optim_cfg.eps, fused=use_fused or None
    )


def build_scheduler(optimizer: torch.optim.Optimizer, optim_cfg, total_steps: int):
    """Returns the LR schedule: linear warmup over warmup_steps (else warmup_ratio of the steps), then
    cosine (down to min_lr_rate of each group's rate), linear or constant."""
    if optim_cfg.scheduler not in SCHEDULERS:
        raise ValueError(f"optim.scheduler must be one of {sorted(SCHEDULERS)}, got {optim_cfg.scheduler!r}")
    steps = optim_cfg.get("warmup_steps", 0)
    warmup = min(steps, total_steps) if steps > 0 else math.ceil(optim_cfg.warmup_ratio * total_steps)
    floor = optim_cfg.get("min_lr_rate", 0.0)  # > 0 with cosine only (the config check refuses the rest)
    name, extra = (
        ("cosine_with_min_lr", {"min_lr_rate": floor})
        if floor > 0
        else (SCHEDULERS[optim_cfg.scheduler], None)
    )
    return get_scheduler(
        name,
        optimizer,
        num_warmup_steps=warmup,
        num_training_steps=total_steps,
        scheduler_specific_kwargs=extra,
    )
