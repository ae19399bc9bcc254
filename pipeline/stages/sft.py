"""sft: fine-tune the configured model family (LoRA on q/k/v or every linear layer, or full) on the configured dataset.

    python -m pipeline +experiment=lora_qkv stages=[sft]

Reads: model, lora, dataset, optim, trainer, tracking. Writes into run_dir/sft: checkpoint-N/ (adapter or
full weights + optimizer/scheduler/RNG state + config), logging.jsonl, loss.png, summary.json, and the
`last` / `best` pointers. Returns {"ckpt": best (else last) checkpoint, "sft": summary}.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from omegaconf import DictConfig, OmegaConf
from torch import nn

from pipeline.config import BASE_CKPT, ConfigError, last_round_only
from pipeline.data.images import ImageFiles
from pipeline.data.prepare import RawRows, keep_rows, read_dataset, split_dataset
from pipeline.data.rows import Row
from pipeline.data.summary import report_summary, summarize_dataset
from pipeline.families import family_from_config, image_limit, video_limit
from pipeline.families.base import Family
from pipeline.families.checkpoints import adapter_base, checkpoint_kind, parameters_in_folder
from pipeline.families.lora_init import is_residual
from pipeline.runinfo import resolve_ckpt, seed_everything
from pipeline.stages.engine import launch_of, prepare_engine, start_accelerator
from pipeline.stages.state import RunState
from pipeline.training.batching import budget_sizes
from pipeline.training.checkpoints import TrainerState, check_tuning_settings, load_adapter_weights
from pipeline.training.loop import (
    FamilyHooks,
    RunOutputs,
    Trainer,
    TrainingData,
    checkpoint_to_resume,
)
from pipeline.training.optim import TrainableSummary, count_parameters
from pipeline.training.plan import (
    Launch,
    TrainingPlan,
    plan_training,
    resolve_weights_dtype,
)
from pipeline.training.plot import plot_losses
from pipeline.training.residual_lora import ResidualAdapter
from pipeline.utils.io import atomic_write_json
from pipeline.utils.secrets import redact_config
from pipeline.utils.tracking import Tracker, build_tracker

log = logging.getLogger(__name__)


def run(cfg: DictConfig, run_dir: Path, state: RunState) -> dict:
    """Trains and returns {"ckpt": Path, "sft": summary}."""
    sft_dir = Path(run_dir) / "sft"
    sft_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)  # LoRA dropout and init draw from the global RNG: same seed, same run
    accelerator = start_accelerator(cfg)
    family = family_from_config(cfg.model)
    plan = plan_stage(cfg, family, launch_of(accelerator), state.model_path)

    start = sft_start(cfg, state)
    if start.adapter is not None or start.full is not None:
        log.info("sft: training on from %s", start)
    resume_from = checkpoint_to_resume(cfg.trainer.resume, sft_dir)
    # read and checked before any weight loads (so is a resume's tuning); no undesirable answer to imitate
    rows = keep_rows(read_rows(cfg, resume_from), undesirable_problem, cfg.dataset.on_error)
    model = build_model(cfg, family, plan, start.model_path, start.base_name, resume_from=resume_from)
    if start.adapter is not None and resume_from is None:
        load_adapter_weights(start.adapter, model.module)
    data = build_data(cfg, family, model.bundle, rows, plan, sft_dir)
    parts = family.parameter_parts(model.module) if plan.part_lrs else None
    engine = prepare_engine(accelerator, model.module, cfg, plan, len(data.train_set), parts)
    with stage_tracker(cfg, Path(run_dir), state, accelerator) as tracker:
        outputs = RunOutputs(sft_dir, cfg, model.bundle.base_path, tracker, model.residual)
        trainer = Trainer(engine, data, family_hooks(family, model.bundle), plan.loop, outputs)
        resumed = trainer.resume(cfg.trainer.resume)
        started = time.perf_counter()
        final = trainer.train()
        summary = summarize(trainer, final, model.counts, resumed, time.perf_counter() - started)
        if accelerator.is_main_process:
            report(cfg, sft_dir, summary, tracker)
    return {"ckpt": chosen_checkpoint(sft_dir), "sft": summary}


def plan_stage(cfg: DictConfig, family: Family, launch: Launch, model_path: str) -> TrainingPlan:
    """Returns the training plan of a stage that trains `family` from `model_path` (sft, dpo), after logging
    it and checking the family's kernels against it, before any weight loads."""
    caps = family.capabilities
    plan = plan_training(
        cfg,
        launch,
        compiles=caps.compiles and cfg.model.quantization == "none",  # bitsandbytes' layers run eagerly
        packs_padding_free=family.packs_padding_free_on(launch.device),
        compiled_shapes=caps.compiled_shapes,
        compiles_vision=family.compiles_vision_on(launch.device, resolve_weights_dtype(cfg, launch.device)),
        vision_by_default=caps.compiles_vision_by_default,
        # full fine-tuning's budget on large cards, and the size a trained tower's budget is declared for
        parameters=parameters_in_folder(model_path),
        trained_tower_budget=caps.trained_tower_budget,
        checkpoints_tower_only=caps.checkpoints_tower_only,
        trained_tower_card_gib=caps.trained_tower_card_gib,
        trained_tower_max_parameters=caps.trained_tower_max_parameters,
    )
    log.info("%s", plan.describe())
    family.check_kernels(plan.launch.device, plan.compile)
    return plan


@dataclass(frozen=True)
class StartingPoint:
    """The weights sft or dpo starts from (the `ckpt` key): a model folder (the base, or a full checkpoint)
    and, to train on, an adapter."""

    model_path: str
    adapter: Path | None = None
    full: Path | None = None  # the full checkpoint model_path is

    @property
    def base_name(self) -> str | None:
        """How a new adapter names its base: the full checkpoint it trains on, else the default."""
        return str(self.full) if self.full is not None else None

    def __str__(self) -> str:
        return str(self.adapter or self.full or f"the base model {self.model_path}")


def starting_point(ckpt: Path | None, model_path: str) -> StartingPoint:
    """Returns where training starts: `ckpt` (a checkpoint folder, resolved; None: the base model at
    `model_path`)."""
    if ckpt is None:
        return StartingPoint(model_path)
    if checkpoint_kind(Path(ckpt)) == "full":
        return StartingPoint(str(ckpt), full=Path(ckpt))
    return StartingPoint(str(adapter_base(Path(ckpt), Path(model_path))), adapter=Path(ckpt))


def sft_start(cfg: DictConfig, state: RunState) -> StartingPoint:
    """Returns the weights sft trains on from: the `ckpt` key's checkpoint (an adapter of the same LoRA
    settings trains on as that adapter; a full checkpoint is the model trained), else the base model. A fresh
    optimizer, schedule and data order either way; trainer.resume is for continuing an interrupted run."""
    ckpt = None if cfg.ckpt in (None, BASE_CKPT) else resolve_ckpt(cfg.ckpt)
    start = starting_point(ckpt, state.model_path)
    if start.adapter is not None and cfg.lora.name == "none":
        raise ConfigError(
            f"ckpt={cfg.ckpt} is a LoRA adapter and lora=none asks for full fine-tuning: merge it first "
            "(stages=[merge] ckpt=<it>) and train from the merged folder (model.path=<merged>), or train the "
            "adapter on with lora=qkv/all and its settings"
        )
    refuse_residual_on_adapter(cfg, start)
    return start


def refuse_residual_on_adapter(cfg: DictConfig, start: StartingPoint) -> None:
    """Raises ConfigError where training on an adapter (ckpt=) meets lora.init_weights=pissa/olora, which
    would start a new adapter from the base weights."""
    if start.adapter is not None and is_residual(cfg.lora.init_weights):
        raise ConfigError(
            f"ckpt={cfg.ckpt} is an adapter to train on, and lora.init_weights={cfg.lora.init_weights} would "
            "start a new one from the base weights; drop one of them"
        )


# ----- the data
def read_rows(cfg: DictConfig, resume_from: Path | None) -> RawRows:
    """Returns the dataset's rows, read and checked (no model needed); refuses the checkpoint to resume
    (`resume_from`, None: a new run) where it was trained with other tuning settings, before any weight loads
    too."""
    rows = read_dataset(cfg.dataset, cfg.seed, image_limit(cfg.model), video_limit(cfg.model))
    if resume_from is not None:
        lora = (
            None
            if cfg.lora.name == "none"
            else {
                "r": cfg.lora.r,
                "lora_alpha": cfg.lora.alpha,
                "use_dora": bool(cfg.lora.use_dora),
                "use_rslora": bool(cfg.lora.use_rslora),
                "residual": is_residual(cfg.lora.init_weights),
            }
        )
        check_tuning_settings(resume_from, lora)
    return rows


def undesirable_problem(row: Row) -> str | None:
    """The problem of a row sft must not imitate: a labelled row whose answer is undesirable."""
    if row.label is False:
        return (
            "an undesirable answer (label false): sft imitates its answers; train on labelled rows with "
            "+experiment=dpo preference.loss_type=kto"
        )
    return None


def build_data(
    cfg: DictConfig,
    family: Family,
    bundle: Any,
    rows: RawRows,
    plan: TrainingPlan,
    sft_dir: Path,
) -> TrainingData:
    """Returns the training and validation sets of the rows that fit (problems into
    sft/dataset_problems.jsonl, the dataset summary into sft/dataset_summary.json), encoded by the family on
    access, with its collates (of static shapes for compiled layers) and, for micro-batches cut by a token
    budget, every row's token count. Up front, each row is only counted (text tokens and image headers)."""
    loop = plan.loop
    images = ImageFiles()
    last_round = last_round_only(cfg.dataset.loss_scale, pairs=False)
    splits = split_dataset(
        rows,
        cfg.dataset,
        cfg.seed,
        family.token_counter(bundle, cfg.dataset.max_length, cfg.dataset.truncation, images, last_round),
        problems_path=sft_dir / "dataset_problems.jsonl",
    )
    summary = summarize_dataset(
        [*rows.rows, *(rows.val_rows or [])],
        splits.train,
        splits.val,
        max_length=cfg.dataset.max_length,
        skipped=len({problem.origin for problem in splits.problems}),
        image_tokens=family.image_token_counter(bundle, images),
        resolution_setting=family.resolution_setting,
    )
    report_summary(summary, sft_dir / "dataset_summary.json")

    def encoded(split):
        return family.dataset(
            bundle, split, cfg.dataset.max_length, cfg.dataset.truncation, images, last_round=last_round
        )

    train_set, val_set = encoded(splits.train), encoded(splits.val)
    lengths = val_lengths = None
    if loop.token_budget:
        weight = resolve_patch_weight(
            cfg.trainer.patch_weight, family, bundle, bool(plan.gradient_checkpointing)
        )
        counter = family.patch_counter(bundle, images) if weight > 0 else None
        if counter is not None:
            kept = resolve_patch_weight(cfg.trainer.patch_weight, family, bundle)
            log.info(
                "token budget: language-model tokens + vision patches x %.3g%s",
                weight,
                f" (the trained tower's blocks checkpointed; {kept:.3g} kept)" if weight < kept else "",
            )

        def sizes(split, dataset):
            patches = [counter(row) for row in split] if counter is not None else None
            return budget_sizes(dataset.token_counts(), patches, weight)

        lengths, val_lengths = sizes(splits.train, train_set), sizes(splits.val, val_set)
    return TrainingData(
        train_set,
        val_set,
        collate=family.training_collate(bundle, loop.pad_to_multiple, loop.packing, plan.compile),
        eval_collate=family.eval_collate(bundle),
        lengths=lengths,
        val_lengths=val_lengths,
    )


def resolve_patch_weight(value: Any, family: Family, bundle: Any, tower_checkpointed: bool = False) -> float:
    """Returns trainer.patch_weight: as given; auto = the family's (its vision tower's parameters over its
    language model's; less where the plan checkpoints the trained tower's blocks, `tower_checkpointed`:
    Family.patch_weight); 0 for a family that counts tokens only (config validation refuses a weight there)."""
    if value == "auto":
        return family.patch_weight(bundle, tower_checkpointed)
    weight = float(value)
    return weight if family.capabilities.counts_patches else 0.0


# ----- the model
@dataclass(frozen=True)
class PreparedModel:
    """The loaded model as it trains: the family's bundle, the module with only the configured parameters
    trainable (LoRA-wrapped unless full; checkpointing and compile as planned) and its parameter counts."""

    bundle: Any
    module: nn.Module
    counts: TrainableSummary
    # an adapter started from the base weights (lora.init_weights=pissa/olora): its initial half, which every
    # checkpoint stores beside the trained one
    residual: ResidualAdapter | None = None


def build_model(
    cfg: DictConfig,
    family: Family,
    plan: TrainingPlan,
    model_path: str,
    base_name: str | None = None,
    resume_from: Path | None = None,
) -> PreparedModel:
    """Loads the base model at `model_path` (the run state's) in the plan's weights dtype onto the run's
    device and prepares it for training; `base_name`: how an adapter names its base (default: model.path's
    hub id or folder). A quantized base (model.quantization) is loaded on the CPU and quantized on its way to
    the device. An adapter started from the base weights (lora.init_weights=pissa/olora) that resumes from
    `resume_from` gets the residual base it stopped with from the checkpoint, not from a new decomposition."""
    bundle = family.load_quantized(
        model_path,
        quantization=cfg.model.quantization,
        dtype=plan.weights_dtype,
        device=plan.launch.device,
        allow_download=cfg.model.trust_hub,
    )
    family.attend_in(bundle, plan.compute_dtype)
    fused = family.apply_fused_kernels(bundle, compiled=plan.compile)  # before LoRA wraps the modules
    residual = cfg.lora.name != "none" and is_residual(cfg.lora.init_weights)
    lora = cfg.lora
    if residual and resume_from is not None:
        lora = OmegaConf.merge(cfg.lora, {"init_weights": "true"})  # the checkpoint holds the start
    started = time.perf_counter()
    module = family.prepare_training(
        bundle, lora, plan.gradient_checkpointing, base_name or base_model_name(cfg, bundle)
    )
    adapter_start = None
    if residual:
        adapter_start = (
            ResidualAdapter.restore(module, resume_from)
            if resume_from is not None
            else ResidualAdapter.snapshot(module, cfg.lora.init_weights)
        )
        log.info(
            "lora.init_weights=%s: %d adapted weights %s in %.1f s",
            cfg.lora.init_weights,
            len(adapter_start.initial) // 2,
            "made residual again from the checkpoint" if resume_from is not None else "decomposed",
            time.perf_counter() - started,
        )
    if plan.compile:
        # On a GPU: compiled layers replayed as CUDA graphs (the step is otherwise launch-bound), batches
        # padded to a multiple of 128 (the plan's pad_to_multiple) so that only a few shapes are recorded.
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        family.compile_model(bundle, plan.cuda_graphs, vision=plan.compile_vision)
    counts = count_parameters(module)
    vision = family.vision_attention_of(bundle)
    quantized = cfg.model.quantization
    log.info(
        "model: %s%s; fused kernels: %s%s",
        counts,
        f"; vision attention: {vision}" if vision else "",
        "liger" if fused else "off",
        f"; language model in {quantized} (bitsandbytes)" if quantized != "none" else "",
    )
    return PreparedModel(bundle, module, counts, adapter_start)


def base_model_name(cfg: DictConfig, bundle) -> str:
    """Returns how the adapter names its base: the hub id when model.path is one, else the local folder."""
    path = str(cfg.model.path)
    if not cfg.model.build_if_missing and not Path(path).expanduser().exists() and cfg.model.trust_hub:
        return path
    return str(Path(bundle.base_path).resolve())


def family_hooks(family: Family, bundle: Any) -> FamilyHooks:
    """Returns what the loop takes from the family: its summed loss, and its full-weight writer and reader."""
    return FamilyHooks(
        forward=family.loss_outputs,
        write_full=family.checkpoint_writer(bundle),
        read_full=family.checkpoint_reader(bundle),
        to_device=family.to_device,
        resolution_setting=family.resolution_setting,
        sample_lengths=family.token_sample_lengths,
    )


# ----- tracking and the summary
@contextmanager
def stage_tracker(
    cfg: DictConfig, run_dir: Path, state: RunState, accelerator: Accelerator
) -> Iterator[Tracker]:
    """Yields the pipeline's run-wide tracker when there is one; a stage run on its own gets its own, which
    is finished on the way out (a failure included)."""
    own = state.tracker is None or not accelerator.is_main_process
    if not own:
        yield state.tracker
        return
    resolved = OmegaConf.to_container(redact_config(cfg), resolve=True)
    tracker = build_tracker(cfg.tracking, run_dir, resolved, is_main_process=accelerator.is_main_process)
    try:
        yield tracker
    finally:
        tracker.finish()


def summarize(
    trainer: Trainer, final: TrainerState, counts: TrainableSummary, resumed: Path | None, seconds: float
) -> dict:
    """Returns summary.json's content: steps, checkpoints, the best checkpoint's metric, times, memory, sizes."""
    sft_dir = trainer.sft_dir
    last, best = sft_dir / "last", sft_dir / "best"
    on_cuda = trainer.acc.device.type == "cuda"
    return {
        "global_step": final.global_step,
        "total_steps": trainer.total_steps,
        "last_checkpoint": str(last.resolve()) if last.exists() else None,
        "best_checkpoint": str(best.resolve()) if best.exists() else None,
        "metric_for_best_model": trainer.s.best_metric,
        "best_metric": final.best_metric,
        "train_seconds": round(final.train_seconds, 2),
        "wall_seconds_this_process": round(seconds, 2),
        "peak_memory_gb": round(torch.cuda.max_memory_allocated() / 1024**3, 3) if on_cuda else None,
        "trainable_params": counts.trainable,
        "total_params": counts.total,
        "train_rows": len(trainer.data.train_set),
        "val_rows": len(trainer.data.val_set),
        "resumed_from": str(resumed) if resumed else None,
        "stopped_early_at": final.stopped_early_at,  # trainer.early_stopping_patience (None: ran its plan)
        "eval_history": final.history,
    }


def report(cfg: DictConfig, sft_dir: Path, summary: dict, tracker: Tracker, stage: str = "sft") -> None:
    """Writes loss.png and summary.json, gives the tracker the summary (and the last checkpoint when
    tracking.log_model), and logs where the training stage's checkpoints are. Main process only."""
    plot_losses(sft_dir / "logging.jsonl", sft_dir / "loss.png")
    atomic_write_json(sft_dir / "summary.json", summary)
    tracker.summary({k: v for k, v in summary.items() if k != "eval_history"})
    last = sft_dir / "last"
    if cfg.tracking.log_model and last.exists():
        tracker.log_artifact(last.resolve(), name=f"{cfg.experiment_name}-adapter", type="model")
    log.info(
        "%s: %d steps, last %s, best %s",
        stage,
        summary["global_step"],
        summary["last_checkpoint"],
        summary["best_checkpoint"],
    )


def chosen_checkpoint(sft_dir: Path) -> Path | None:
    """Returns the best checkpoint, else the last, else None."""
    ckpt = sft_dir / "best" if (sft_dir / "best").exists() else sft_dir / "last"
    return ckpt.resolve() if ckpt.exists() else None
