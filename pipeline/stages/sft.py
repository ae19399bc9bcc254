"""sft: fine-tune the configured model family (LoRA on q/k/v or every linear layer, or full) on the configured dataset.

    python -m pipeline +experiment=lora_qkv stages=[sft]

Reads: model, lora, dataset, optim, trainer, tracking. Writes into run_dir/sft: checkpoint-N/ (adapter or
full weights + optimizer/scheduler/RNG state + config), logging.jsonl, loss.png, summary.json, and the
`last` / `best` pointers. Returns {"ckpt": best (else last) checkpoint, "sft": summary}.
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path

import torch
from accelerate import Accelerator, DistributedType
from accelerate.utils import InitProcessGroupKwargs
from omegaconf import DictConfig, OmegaConf

from pipeline.config import (
    resolve_checkpointing,
    resolve_compile,
    resolve_device,
    resolve_dtype,
    resolve_num_workers,
)
from pipeline.data.images import ImageFiles
from pipeline.data.prepare import read_dataset, split_dataset
from pipeline.families import family_from_config, image_limit
from pipeline.families.minicpm_v2.lora import count_parameters
from pipeline.runinfo import seed_everything
from pipeline.stages.state import RunState
from pipeline.training.checkpoints import check_tuning_settings
from pipeline.training.loop import LoopSettings, Trainer, checkpoint_to_resume, planned_steps
from pipeline.training.optim import build_optimizer, build_scheduler
from pipeline.training.plot import plot_losses
from pipeline.utils.io import atomic_write_json
from pipeline.utils.tracking import build_tracker

log = logging.getLogger(__name__)


def mixed_precision(cfg: DictConfig, device: torch.device) -> str:
    """Returns accelerate's mixed-precision mode: bf16 on a GPU that has it, none on CPU."""
    choice = cfg.trainer.mixed_precision
    if choice != "auto":
        return "no" if choice == "no" else choice
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"


def weights_dtype(cfg: DictConfig, device: torch.device) -> torch.dtype:
    """Returns the dtype the weights are held in while training.

    LoRA: the frozen base in the model dtype (bf16 on GPU; the adapters stay fp32 under PEFT);
    full fine-tuning: fp32 master weights under bf16 autocast, so small updates are not rounded away.
    """
    if cfg.lora.name == "none":
        return torch.float32
    return resolve_dtype(cfg, device)


def base_model_name(cfg: DictConfig, bundle) -> str:
    """Returns how the adapter names its base: the hub id when model.path is one, else the local folder."""
    path = str(cfg.model.path)
    if not cfg.model.build_if_missing and not Path(path).expanduser().exists() and cfg.model.trust_hub:
        return path
    return str(Path(bundle.base_path).resolve())


def prepare_model(
    cfg: DictConfig, bundle, family=None, device: torch.device | None = None
) -> torch.nn.Module:
    """Returns the model with only the configured parameters trainable (LoRA-wrapped unless full), with
    activation checkpointing as model.gradient_checkpointing resolves on `device`."""
    family = family or family_from_config(cfg.model)
    checkpointing = checkpointing_of(cfg, device or torch.device("cpu"))
    return family.prepare_training(bundle, cfg.lora, checkpointing, base_model_name(cfg, bundle))


def checkpointing_of(cfg: DictConfig, device: torch.device) -> bool:
    """Returns model.gradient_checkpointing as it resolves for this run (auto: see resolve_checkpointing)."""
    return resolve_checkpointing(
        cfg.model.gradient_checkpointing, device, cfg.lora.name, int(cfg.trainer.micro_batch_tokens)
    )


# ms-swift's default global batch: its gradient_accumulation_steps defaults to ceil(16 / batch / processes)
DEFAULT_GLOBAL_BATCH = 16


def accumulation_steps(cfg: DictConfig, world: int) -> int:
    """Returns trainer.grad_accum, or for null ms-swift's ceil(16 / (batch_size x processes))."""
    if cfg.trainer.grad_accum is not None:
        return int(cfg.trainer.grad_accum)
    return math.ceil(DEFAULT_GLOBAL_BATCH / cfg.trainer.batch_size / world)


def optim_settings(cfg: DictConfig) -> DictConfig:
    """Returns the optim section with the learning rate filled in: optim.lr, or for null the model's recipe,
    model.lora_lr with LoRA and model.full_lr for full fine-tuning (ms-swift's 1e-4 / 1e-5 for MiniCPM-V-2)."""
    lr = cfg.optim.lr
    if lr is None:
        lr = cfg.model.full_lr if cfg.lora.name == "none" else cfg.model.lora_lr
    return OmegaConf.create({**OmegaConf.to_container(cfg.optim, resolve=True), "lr": float(lr)})


def loop_settings(cfg: DictConfig, world: int = 1, device: torch.device | None = None) -> LoopSettings:
    t = cfg.trainer
    return LoopSettings(
        batch_size=t.batch_size,
        grad_accum=accumulation_steps(cfg, world),
        epochs=t.epochs,
        max_steps=t.max_steps,
        logging_steps=t.logging_steps,
        eval_steps=t.eval_steps,
        save_steps=t.save_steps if t.save_steps is not None else t.eval_steps,
        save_total_limit=t.save_total_limit,
        eval_batch_size=t.eval_batch_size if t.eval_batch_size is not None else t.batch_size,
        max_eval_samples=t.max_eval_samples,
        max_grad_norm=cfg.optim.max_grad_norm,
        num_workers=resolve_num_workers(t.num_workers, device or torch.device("cpu"), world),
        seed=cfg.seed,
        micro_batch_tokens=t.micro_batch_tokens,
        packing=t.packing,
        profile_steps=t.profile_steps,
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


def name_deepspeed_accelerator(uses_deepspeed: bool) -> None:
    """Tells DeepSpeed (when not in use, on a machine without CUDA) that its accelerator is the CPU.

    accelerate imports DeepSpeed, when installed, just to recognise its engine when unwrapping a model, and
    DeepSpeed then warns "Setting accelerator to CPU" on every CPU run; named, it picks the same accelerator
    without the warning.
    """
    if not uses_deepspeed and not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def run(cfg: DictConfig, run_dir: Path, state: RunState) -> dict:
    """Trains and returns {"ckpt": Path, "sft": summary}."""
    sft_dir = Path(run_dir) / "sft"
    sft_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)  # LoRA dropout and init draw from the global RNG: same seed, same run
    device = resolve_device(cfg)
    # cpu=True makes accelerate's own CPU processes (gloo); DeepSpeed on the CPU (DS_ACCELERATOR=cpu) needs
    # cpu=False and gloo named, or accelerate counts one process where DeepSpeed runs several
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"
    name_deepspeed_accelerator(deepspeed)
    on_cpu = device.type == "cpu"
    accelerator = Accelerator(
        mixed_precision=mixed_precision(cfg, device),
        cpu=on_cpu and not deepspeed,
        kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")] if on_cpu and deepspeed else None,
    )
    configure_deepspeed(accelerator, cfg)
    device = accelerator.device

    # ----- setup: data (read and checked before any weight loads; a checkpoint of other LoRA settings is
    # refused before any loads too), model, optimizer
    raw_rows = read_dataset(cfg.dataset, cfg.seed, image_limit(cfg.model))
    resume_from = checkpoint_to_resume(cfg.trainer.resume, sft_dir)
    if resume_from is not None:
        lora = None if cfg.lora.name == "none" else {"r": cfg.lora.r, "lora_alpha": cfg.lora.alpha}
        check_tuning_settings(resume_from, lora)
    family = family_from_config(cfg.model)
    bundle = family.load_bundle(
        state.model_path, dtype=weights_dtype(cfg, device), device=device, allow_download=cfg.model.trust_hub
    )
    model = prepare_model(cfg, bundle, family, device)
    sharded = accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
    compiled = resolve_compile(
        cfg.trainer.compile, device, cfg.model.family, accelerator.num_processes, sharded
    )
    vision = family.vision_attention_of(bundle)
    log.info(
        "compile: %s; gradient checkpointing: %s%s",
        "on" if compiled else "off",
        "on" if checkpointing_of(cfg, device) else "off",
        f"; vision attention: {vision}" if vision else "",
    )
    pad_to = 1
    graphs = compiled and device.type == "cuda"
    if compiled:
        # On a GPU: compiled layers replayed as CUDA graphs (the step is otherwise launch-bound); batches
        # padded to a multiple of 128 so that only a few shapes are ever recorded.
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        family.compile_model(bundle, graphs)
        pad_to = 128 if graphs else 1
    counts = count_parameters(model)
    log.info("%s", counts)
    images = ImageFiles()
    splits = split_dataset(
        raw_rows,
        cfg.dataset,
        cfg.seed,
        family.token_counter(bundle, cfg.dataset.max_length, cfg.dataset.truncation, images),
        problems_path=sft_dir / "dataset_problems.jsonl",
    )

    def make_set(rows):
        return family.dataset(bundle, rows, cfg.dataset.max_length, cfg.dataset.truncation, images)

    train_set, val_set = make_set(splits.train), make_set(splits.val)
    world = accelerator.num_processes
    settings = loop_settings(cfg, world, device)
    budget = settings.micro_batch_tokens > 0
    optim = optim_settings(cfg)
    log.info("optimizer: AdamW, lr %g", optim.lr)
    optimizer = build_optimizer(model, optim, device)
    model, optimizer = accelerator.prepare(model, optimizer)
    kind = str(accelerator.distributed_type).split(".")[-1]
    log.info("engine: %s, %d process(es), device %s", kind, world, accelerator.device)
    if not budget:
        micro = f"{settings.batch_size} row(s)"
    elif settings.packing:
        micro = f"packed rows of up to {settings.micro_batch_tokens} tokens"
    else:
        micro = f"up to {settings.micro_batch_tokens} padded tokens"
    log.info(
        "optimizer step: %d rows (batch %d x grad_accum %d x %d process(es)); micro-batches: %s; "
        "%d data worker(s)",
        settings.batch_size * settings.grad_accum * world,
        settings.batch_size,
        settings.grad_accum,
        world,
        micro,
        settings.num_workers,
    )
    total = planned_steps(len(train_set), settings, world)
    scheduler = build_scheduler(optimizer, optim, max(total, 1))
    resolved = OmegaConf.to_container(cfg, resolve=True)
    # The pipeline's run-wide tracker when there is one; a stage run on its own gets (and closes) its own.
    own_tracker = state.tracker is None or not accelerator.is_main_process
    tracker = (
        build_tracker(cfg.tracking, Path(run_dir), resolved, is_main_process=accelerator.is_main_process)
        if own_tracker
        else state.tracker
    )
    trainer = Trainer(
        accelerator,
        model,
        optimizer,
        scheduler,
        train_set,
        val_set,
        settings,
        sft_dir,
        save_extra=lambda: {
            "run_cfg": cfg,
            "base_path": bundle.base_path,
            "write_full": family.checkpoint_writer(bundle),
        },
        pad_id=family.pad_id(bundle),
        pad_to_multiple=pad_to,
        tracker=tracker,
        lengths=train_set.token_counts() if budget else None,
        val_lengths=val_set.token_counts() if budget else None,
        preallocate_grads=graphs and accelerator.distributed_type != DistributedType.DEEPSPEED,
        collate=family.training_collate(bundle, pad_to, settings.packing),
        eval_collate=family.eval_collate(bundle),
        forward=family.loss_outputs,
        read_full=family.checkpoint_reader(bundle),
    )
    resumed = trainer.resume(cfg.trainer.resume)

    # ----- train
    started = time.perf_counter()
    try:
        final = trainer.train()
    except BaseException:
        if own_tracker:
            tracker.finish()
        raise

    # ----- cleanup: plot, summary, tracker
    last = sft_dir / "last"
    best = sft_dir / "best"
    summary = {
        "global_step": final.global_step,
        "total_steps": trainer.total_steps,
        "last_checkpoint": str(last.resolve()) if last.exists() else None,
        "best_checkpoint": str(best.resolve()) if best.exists() else None,
        "best_eval_loss": final.best_metric,
        "train_seconds": round(final.train_seconds, 2),
        "wall_seconds_this_process": round(time.perf_counter() - started, 2),
        "peak_memory_gb": round(torch.cuda.max_memory_allocated() / 1024**3, 3)
        if device.type == "cuda"
        else None,
        "trainable_params": counts.trainable,
        "total_params": counts.total,
        "train_rows": len(train_set),
        "val_rows": len(val_set),
        "resumed_from": str(resumed) if resumed else None,
        "eval_history": final.history,
    }
    if accelerator.is_main_process:
        plot_losses(sft_dir / "logging.jsonl", sft_dir / "loss.png")
        atomic_write_json(sft_dir / "summary.json", summary)
        tracker.summary({k: v for k, v in summary.items() if k != "eval_history"})
        if cfg.tracking.log_model and last.exists():
            tracker.log_artifact(last.resolve(), name=f"{cfg.experiment_name}-adapter", type="model")
        if own_tracker:
            tracker.finish()
        log.info(
            "sft: %d steps, last %s, best %s",
            final.global_step,
            summary["last_checkpoint"],
            summary["best_checkpoint"],
        )
    ckpt = best if best.exists() else last
    return {"ckpt": ckpt.resolve() if ckpt.exists() else None, "sft": summary}
