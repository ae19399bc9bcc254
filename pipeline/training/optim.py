"""AdamW with ms-swift's decay rule (no decay on biases and norms) and a warmup + decay schedule."""

from __future__ import annotations

import math
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


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Returns AdamW groups: matrices decay, biases / norm weights / 1-d tensors do not."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim < 2 or name.endswith(".bias") or "norm" in name.lower():
            no_decay.append(param)
        else:
            decay.append(param)
    if not decay and not no_decay:
        raise ValueError("no trainable parameters: check lora.* and the freeze switches")
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, optim_cfg, device: torch.device) -> torch.optim.Optimizer:
    """Returns AdamW over the trainable parameters (the fused kernel on CUDA unless turned off)."""
    fused = optim_cfg.fused
    use_fused = device.type == "cuda" if fused in ("auto", None) else bool(fused)
    return torch.optim.AdamW(
        parameter_groups(model, optim_cfg.weight_decay),
        lr=optim_cfg.lr,
        betas=tuple(optim_cfg.betas),
        eps=optim_cfg.eps,
        fused=use_fused or None,
    )


def build_scheduler(optimizer: torch.optim.Optimizer, optim_cfg, total_steps: int):
    """Returns the LR schedule: linear warmup over warmup_ratio of the steps, then cosine/linear/constant."""
    if optim_cfg.scheduler not in SCHEDULERS:
        raise ValueError(f"optim.scheduler must be one of {sorted(SCHEDULERS)}, got {optim_cfg.scheduler!r}")
    warmup = math.ceil(optim_cfg.warmup_ratio * total_steps)
    return get_scheduler(
        SCHEDULERS[optim_cfg.scheduler], optimizer, num_warmup_steps=warmup, num_training_steps=total_steps
    )
