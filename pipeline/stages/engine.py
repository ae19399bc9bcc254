"""The training engine the training stages (sft, dpo) start: accelerate's Accelerator for the configured device
and launch (DDP, FSDP, DeepSpeed), what the run learns of it (Launch), and the model and optimizer prepared by
it with the learning-rate schedule. FSDP wraps every family in its own units; DeepSpeed's config is filled from
ours."""

from __future__ import annotations

import logging
import os

import torch
from accelerate import Accelerator, DistributedType
from accelerate.utils import InitProcessGroupKwargs
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

from pipeline.config import ConfigError, resolve_device
from pipeline.families.base import unwrapped
from pipeline.families.sharding import module_classes, shard_units
from pipeline.training.loop import TrainingEngine, planned_steps
from pipeline.training.optim import build_optimizer, build_scheduler
from pipeline.training.plan import Launch, TrainingPlan, resolve_mixed_precision

log = logging.getLogger(__name__)


def start_accelerator(cfg: DictConfig) -> Accelerator:
    """Returns accelerate's Accelerator for the configured device, in the resolved mixed precision (and the
    DeepSpeed config filled from ours when launched with one)."""
    device = resolve_device(cfg)
    # cpu=True makes accelerate's own CPU processes (gloo); DeepSpeed on the CPU (DS_ACCELERATOR=cpu) needs
    # cpu=False and gloo named, or accelerate counts one process where DeepSpeed runs several
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"
    name_deepspeed_accelerator(deepspeed)
    on_cpu = device.type == "cpu"
    accelerator = Accelerator(
        mixed_precision=resolve_mixed_precision(cfg.trainer.mixed_precision, device),
        cpu=on_cpu and not deepspeed,
        kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")] if on_cpu and deepspeed else None,
    )
    configure_deepspeed(accelerator, cfg)
    if (
        os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"
        and accelerator.distributed_type != DistributedType.FSDP
    ):
        # accelerate shards with FSDP on GPUs only, and elsewhere quietly replicates the model instead
        log.warning(
            "the accelerate config asks for FSDP, which shards on GPUs only: on %s this run trains as %s "
            "(every process holds the whole model and its optimizer state)",
            device.type,
            str(accelerator.distributed_type).split(".")[-1],
        )
    return accelerator


def launch_of(accelerator: Accelerator) -> Launch:
    """Returns where the run executes, as accelerate started it."""
    return Launch(
        device=accelerator.device,
        processes=accelerator.num_processes,
        engine=str(accelerator.distributed_type).split(".")[-1],
        mixed_precision=str(accelerator.mixed_precision),
    )


def configure_deepspeed(accelerator: Accelerator, cfg: DictConfig) -> None:
    """Fills the DeepSpeed config (under `accelerate launch` with a DeepSpeed config file) from ours.

    The loop accumulates gradients over its own window and tells the engine where the window ends, so
    DeepSpeed's own accumulation count is 1; its clipping is optim.max_grad_norm; the torch AdamW built here
    runs inside ZeRO; ZeRO-3 checkpoints gather whole 16-bit weights.
    """
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    ds["train_micro_batch_size_per_gpu"] = int(cfg.trainer.batch_size)
    ds["gradient_accumulation_steps"] = 1
    ds.pop("train_batch_size", None)  # DeepSpeed derives it: micro-batch x 1 x processes
    ds["gradient_clipping"] = float(cfg.optim.max_grad_norm or 0.0)
    ds["zero_allow_untested_optimizer"] = True
    zero = ds.setdefault("zero_optimization", {})
    if zero.get("stage") == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True


def configure_fsdp(accelerator: Accelerator, model: nn.Module) -> None:
    """Under FSDP with transformer-based wrapping, makes each of the model's own units (shard_units: every
    family's decoder layers and vision blocks) an FSDP unit where the accelerate config names none, so one
    config file serves every family. Raises ConfigError where the config names classes the model lacks (a
    config written for another family), naming them and the model's units."""
    if accelerator.distributed_type != DistributedType.FSDP:
        return
    plugin = accelerator.state.fsdp_plugin
    policy = getattr(plugin.auto_wrap_policy, "func", plugin.auto_wrap_policy)
    if policy is not transformer_auto_wrap_policy:
        return  # size-based or no wrapping: class names play no part
    units = shard_units(model)
    named = plugin.transformer_cls_names_to_wrap
    if not named:
        plugin.transformer_cls_names_to_wrap = units
        log.info("FSDP units: %s", ", ".join(units) or "none (the whole model is one unit)")
        return
    missing = [name for name in named if name not in module_classes(model)]
    if missing:
        raise ConfigError(
            f"the accelerate config's fsdp_transformer_layer_cls_to_wrap names {', '.join(missing)}, which "
            f"{type(unwrapped(model)).__name__} does not have (a config for another model?): its units are "
            f"{', '.join(units)}; name those, or leave the key out and they are wrapped"
        )


def name_deepspeed_accelerator(uses_deepspeed: bool) -> None:
    """Tells DeepSpeed (when not in use, on a machine without CUDA) that its accelerator is the CPU.

    accelerate imports DeepSpeed, when installed, just to recognise its engine when unwrapping a model, and
    DeepSpeed then warns "Setting accelerator to CPU" on every CPU run; named, it picks the same accelerator
    without the warning.
    """
    if not uses_deepspeed and not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def prepare_engine(
    accelerator: Accelerator,
    model: nn.Module,
    cfg: DictConfig,
    plan: TrainingPlan,
    n_rows: int,
    parts: dict[int, str | None] | None = None,
) -> TrainingEngine:
    """Returns the model with AdamW (at the plan's learning rates; `parts`: each parameter's part, for the
    vision tower's and the projector's own) prepared by accelerate, and the learning-rate schedule over the
    run's planned steps."""
    optim = OmegaConf.create({**OmegaConf.to_container(cfg.optim, resolve=True), "lr": plan.lr})
    optimizer = build_optimizer(model, optim, plan.launch.device, parts)
    configure_fsdp(accelerator, model)
    model, optimizer = accelerator.prepare(model, optimizer)
    total = planned_steps(n_rows, plan.loop, plan.launch.processes)
    scheduler = build_scheduler(optimizer, optim, max(total, 1))
    return TrainingEngine(accelerator, model, optimizer, scheduler)


# ----- where training starts
