"""dpo: preference training (DPO, IPO, SimPO, CPO, ORPO and kin) on pairs of a chosen and a rejected answer,
and KTO on binary feedback (rows labelled desirable or not), for every family.

    python -m pipeline +experiment=dpo                                  # the tiny twin, the bundled pairs
    python -m pipeline +experiment=dpo ckpt=outputs/lora_qkv/<time>     # after sft: that model is the reference
    python -m pipeline +experiment=dpo dataset=custom dataset.path=pairs.jsonl preference.loss_type=ipo
    python -m pipeline +experiment=dpo dataset=custom dataset.path=feedback.jsonl preference.loss_type=kto

Under kto the rows (a pair: one desirable and one undesirable) are laid out as pairs too: each row's answer,
then its KL sample, the row's prompt with another row's answer (feedback_rows).

Where it starts (`ckpt`): the base model (unset or `base`); an sft adapter checkpoint (or its run folder),
whose adapter trains on, with that run's LoRA settings; or a full sft checkpoint, which is then the model a
new adapter (or full fine-tuning) starts from. The reference is that starting model (pipeline/training/
preference.py): under a new LoRA adapter the same weights with the adapter disabled; otherwise log-
probabilities computed in one pass before training and cached in dpo/reference_logps.safetensors.
The loop, its plan, its checkpoints and resume are sft's (pipeline/training/loop.py), with the preference
objective. Reads: model, lora, dataset (preference pairs: pipeline/data/pairs.py), preference, optim,
trainer, tracking, ckpt. Writes into run_dir/dpo what sft writes into run_dir/sft (checkpoints, logging.jsonl
with the rewards of the chosen and rejected answers, their margin, the accuracy and the log-probabilities,
loss.png, summary.json). Returns {"ckpt": best (else last) checkpoint, "dpo": summary}.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from pipeline.config import ConfigError, last_round_only
from pipeline.data.images import ImageFiles
from pipeline.data.prepare import RawRows, keep_rows, split_dataset
from pipeline.data.rows import DatasetError, Row, is_url
from pipeline.families import family_from_config
from pipeline.families.base import Family
from pipeline.families.lora_init import is_residual
from pipeline.runinfo import seed_everything
from pipeline.stages.engine import launch_of, prepare_engine, start_accelerator
from pipeline.stages.sft import (
    StartingPoint,
    build_model,
    chosen_checkpoint,
    family_hooks,
    plan_stage,
    read_rows,
    refuse_residual_on_adapter,
    report,
    resolve_patch_weight,
    stage_tracker,
    starting_point,
    summarize,
)
from pipeline.stages.state import RunState
from pipeline.training.batching import budget_sizes
from pipeline.training.checkpoints import load_adapter_weights
from pipeline.training.loop import RunOutputs, Trainer, TrainingData, TrainingEngine, checkpoint_to_resume
from pipeline.training.plan import TrainingPlan
from pipeline.training.preference import (
    CACHE_FILE,
    CachedReference,
    NoAdapterReference,
    PairCollate,
    PairDataset,
    PreferenceLoss,
    PreferenceSettings,
    Reference,
    cache_key,
    compute_reference_table,
    reference_table,
)

log = logging.getLogger(__name__)


def run(cfg: DictConfig, run_dir: Path, state: RunState) -> dict:
    """Trains on the preference pairs and returns {"ckpt": Path, "dpo": summary}."""
    dpo_dir = Path(run_dir) / "dpo"
    dpo_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)
    accelerator = start_accelerator(cfg)
    family = family_from_config(cfg.model)
    plan = plan_stage(cfg, family, launch_of(accelerator), state.model_path)
    start = starting_point(state.ckpt, state.model_path)
    refuse_residual_on_adapter(cfg, start)
    settings = PreferenceSettings.from_config(cfg.preference)
    kind = reference_kind(cfg, settings, start)
    log.info("dpo: %s, beta %g, from %s; reference: %s", settings.loss_type, settings.beta, start, kind)

    resume_from = checkpoint_to_resume(cfg.trainer.resume, dpo_dir)
    rows = read_pairs(cfg, resume_from)  # read and checked before any weight loads
    model = build_model(cfg, family, plan, start.model_path, start.base_name, resume_from=resume_from)
    if start.adapter is not None:
        load_adapter_weights(start.adapter, model.module)
    data = build_pair_data(cfg, family, model.bundle, rows, plan, dpo_dir)
    parts = family.parameter_parts(model.module) if plan.part_lrs else None
    reuse_images = (
        kind == "no_adapter"
        and cfg.preference.share_image_features
        and family.images_outside_adapter(model.module)
    )
    engine = prepare_engine(accelerator, model.module, cfg, plan, len(data.train_set), parts)
    reference = build_reference(kind, cfg, family, engine, data, plan, dpo_dir, start, reuse_images)
    objective = PreferenceLoss(family.sequence_logps, settings, reference)
    with stage_tracker(cfg, Path(run_dir), state, accelerator) as tracker:
        outputs = RunOutputs(dpo_dir, cfg, model.bundle.base_path, tracker, model.residual)
        trainer = Trainer(engine, data, family_hooks(family, model.bundle), plan.loop, outputs, objective)
        resumed = trainer.resume(cfg.trainer.resume)
        started = time.perf_counter()
        final = trainer.train()
        summary = summarize(trainer, final, model.counts, resumed, time.perf_counter() - started)
        if accelerator.is_main_process:
            report(cfg, dpo_dir, summary, tracker, stage="dpo")
    return {"ckpt": chosen_checkpoint(dpo_dir), "dpo": summary}


# ----- the reference
def reference_kind(cfg: DictConfig, settings: PreferenceSettings, start: StartingPoint) -> str | None:
    """Returns where the reference comes from: "no_adapter" (the policy with its adapter disabled), "cached"
    (computed before training), or None for a reference-free loss; preference.reference=auto picks the first
    when a new LoRA adapter trains (no bias of the base trains with it), else the cache."""
    if not settings.needs_reference:
        return None
    # a new adapter whose disabling gives back the starting model: none trained on, no bias trained with it, and
    # not started from the base weights (lora.init_weights=pissa/olora train on the residual base)
    new_adapter = (
        cfg.lora.name != "none"
        and start.adapter is None
        and cfg.lora.bias == "none"
        and not is_residual(cfg.lora.init_weights)
    )
    asked = str(cfg.preference.reference)
    if asked == "no_adapter" and not new_adapter:
        why = (
            "training on an sft adapter"
            if start.adapter is not None
            else f"lora.init_weights={cfg.lora.init_weights}"
            if is_residual(cfg.lora.init_weights)
            else f"lora.bias={cfg.lora.bias}"
        )
        raise ConfigError(
            f"preference.reference=no_adapter: {why}, the model with its adapter disabled is not the model "
            "training starts from; use preference.reference=cached (or auto)"
        )
    if asked == "auto":
        return "no_adapter" if new_adapter else "cached"
    return asked


def build_reference(
    kind: str | None,
    cfg: DictConfig,
    family: Family,
    engine: TrainingEngine,
    data: TrainingData,
    plan: TrainingPlan,
    dpo_dir: Path,
    start: StartingPoint,
    reuse_images: bool = False,
) -> Reference | None:
    """Returns the reference: the adapter disabled (on the policy's image features with `reuse_images`), or
    the table of every pair's log-probabilities under the starting model, read from the run folder's cache or
    computed now (before any resume loads trained weights)."""
    accelerator = engine.accelerator
    if kind is None:
        return None
    if kind == "no_adapter":
        if reuse_images:
            log.info(
                "reference: the adapter leaves the vision tower untouched, so it takes the policy's image features"
            )
        return NoAdapterReference(family.sequence_logps, accelerator.unwrap_model, reuse_images)
    datasets = [data.train_set, data.val_set] if data.val_set is not None else [data.train_set]
    pairs = sum(len(d) for d in datasets)
    loop = plan.loop
    budget = (loop.eval_batch_size, loop.micro_batch_tokens, 1)

    def compute():
        return compute_reference_table(
            engine.model,
            family.sequence_logps,
            datasets,
            data.eval_collate,
            accelerator,
            budget,
            loop.num_workers,
        )

    key = cache_key(cache_identity(cfg, family, plan, start, datasets))
    table = reference_table(dpo_dir / CACHE_FILE, key, compute, pairs, accelerator)
    return CachedReference(table.to(accelerator.device))


def cache_identity(
    cfg: DictConfig, family: Family, plan: TrainingPlan, start: StartingPoint, datasets: Sequence[PairDataset]
) -> dict:
    """Returns what the cached reference depends on: every pair (its text and its images' files), the
    starting weights' files, the family's encoding settings and the precision."""
    pairs = []
    for dataset in datasets:
        for row in dataset.rows:
            pairs.append([row.origin, row.system, row.history, row.query, row.response, row.rejected])
            pairs.append([_file_identity(ref) for ref in row.images])
    return {
        "pairs": pairs,
        "model": _weights_identity(Path(start.model_path)),
        "adapter": _weights_identity(start.adapter) if start.adapter is not None else None,
        "family": family.name,
        "settings": family.settings,
        "max_length": cfg.dataset.max_length,
        "truncation": cfg.dataset.truncation,
        "last_round": last_round_only(cfg.dataset.loss_scale, pairs=True),
        "dtype": str(plan.weights_dtype),
        "mixed_precision": plan.launch.mixed_precision,
    }


def _weights_identity(folder: Path) -> list:
    return [
        [p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(Path(folder).glob("*.safetensors"))
    ]


def _file_identity(ref: str) -> list:
    if is_url(ref) or not Path(ref).is_file():
        return [ref]
    stat = Path(ref).stat()
    return [ref, stat.st_size, stat.st_mtime_ns]


# ----- the pairs
def read_pairs(cfg: DictConfig, resume_from: Path | None) -> RawRows:
    """Returns the dataset's rows, read and checked (no model needed), every one a preference pair (kto: or a
    labelled row): any other row is a problem naming its file:line (dropped under dataset.on_error=skip)."""
    kto = cfg.preference.loss_type == "kto"

    def problem_of(row: Row) -> str | None:
        if row.rejected is not None or (kto and row.label is not None):
            return None
        if kto:
            return "neither labelled (label: true or false) nor a preference pair (rejected_response, or rejected)"
        if row.label is not None:
            return "a labelled row (binary feedback), not a preference pair: train on it with preference.loss_type=kto"
        return "not a preference pair: no rejected answer (rejected_response, or rejected)"

    rows = keep_rows(read_rows(cfg, resume_from), problem_of, cfg.dataset.on_error)
    if not rows.rows:
        what = "labelled rows or preference pairs" if kto else "preference pairs"
        raise DatasetError(f"dataset {cfg.dataset.name} holds no {what} to train on")
    return rows


class PairCounter:
    """Counts a pair's two answers with the family's token counter: returns the longer (validation: both must
    fit dataset.max_length) and keeps both for the token budget."""

    def __init__(self, count: Callable[[Row], int | None]) -> None:
        self.count = count
        self.sizes: dict[int, tuple[int, int]] = {}

    def __call__(self, row: Row) -> int | None:
        chosen = self.count(row)
        if row.rejected is None:  # kto's labelled row: its one answer
            if chosen is not None:
                self.sizes[id(row)] = (chosen, 0)
            return chosen
        rejected = self.count(dataclasses.replace(row, response=row.rejected))
        if chosen is None or rejected is None:
            return None
        self.sizes[id(row)] = (chosen, rejected)
        return max(chosen, rejected)


def warn_unbalanced(preference: DictConfig, labels: Sequence[bool]) -> None:
    """Warns where the weighted desirable rows over the weighted undesirable ones fall outside [1, 4/3], the
    range KTO's paper recommends (as TRL does), naming a desirable_weight that brings it there."""
    good, bad = sum(labels), len(labels) - sum(labels)
    if not good or not bad:
        kind = "desirable" if good else "undesirable"
        log.warning("kto: every training row is %s; KTO learns from both kinds", kind)
        return
    dw, uw = preference.desirable_weight, preference.undesirable_weight
    ratio = dw * good / (uw * bad)
    if not 1.0 <= ratio <= 4 / 3:
        log.warning(
            "kto: desirable_weight x %d desirable rows / (undesirable_weight x %d undesirable) = %.2f, outside "
            "[1, 4/3] where KTO's paper keeps it; e.g. preference.desirable_weight=%.3g with undesirable_weight=%g",
            good,
            bad,
            ratio,
            uw * bad / good,
            uw,
        )


# how many other rows' answers kto tries, in its cycle, for a row's KL sample that fits dataset.max_length
KL_TRIES = 8


def feedback_rows(
    split: list[Row], counter: PairCounter, max_length: int, truncates: bool, seed: int
) -> tuple[list[Row], list[tuple[int, int]]]:
    """Returns kto's rows of a split (a pair gives its chosen answer labelled desirable and its rejected one
    labelled undesirable) with, as `rejected`, the answer of each one's KL sample, and every row's token
    counts (its own, its KL sample's).

    The KL samples pair each row's prompt and images with another row's answer: the next row's in a cycle
    through the split in a seeded order (TRL pairs each prompt with its batch neighbour's answer), or the
    first of the following KL_TRIES whose sample fits max_length, else the row's own answer."""
    rows: list[Row] = []
    sizes: list[int] = []
    for row in split:
        own, other = counter.sizes[id(row)]
        if row.rejected is None:
            rows.append(dataclasses.replace(row, num_tokens=own))
            sizes.append(own)
        else:
            rows.append(dataclasses.replace(row, rejected=None, label=True, num_tokens=own))
            rows.append(
                dataclasses.replace(row, response=row.rejected, rejected=None, label=False, num_tokens=other)
            )
            sizes += [own, other]
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    place = {index: k for k, index in enumerate(order)}
    out, counts = [], []
    for i, row in enumerate(rows):
        answer, kl_size = row.response, sizes[i]
        for step in range(1, min(KL_TRIES, len(rows) - 1) + 1):
            j = order[(place[i] + step) % len(order)]
            size = counter.count(dataclasses.replace(row, response=rows[j].response))
            if size is not None and (truncates or size <= max_length):
                answer, kl_size = rows[j].response, min(size, max_length)  # truncated to it where longer
                break
        out.append(dataclasses.replace(row, rejected=answer))
        counts.append((sizes[i], kl_size))
    return out, counts


def build_pair_data(
    cfg: DictConfig, family: Family, bundle: Any, rows: RawRows, plan: TrainingPlan, dpo_dir: Path
) -> TrainingData:
    """Returns the training and validation pairs that fit (problems into dpo/dataset_problems.jsonl),
    encoded by the family, with its collates made pair collates and each pair's size in the token budget
    (its two answers' tokens, its vision patches once)."""
    loop = plan.loop
    images = ImageFiles()
    # the answers' log-probabilities are the final answer's (the history, the same in both, is context)
    last_round = last_round_only(cfg.dataset.loss_scale, pairs=True)
    counter = PairCounter(
        family.token_counter(bundle, cfg.dataset.max_length, cfg.dataset.truncation, images, last_round)
    )
    splits = split_dataset(
        rows, cfg.dataset, cfg.seed, counter, problems_path=dpo_dir / "dataset_problems.jsonl"
    )
    weight = (
        resolve_patch_weight(cfg.trainer.patch_weight, family, bundle, bool(plan.gradient_checkpointing))
        if loop.token_budget
        else 0.0
    )
    patches = family.patch_counter(bundle, images) if weight > 0 else None

    kto = cfg.preference.loss_type == "kto"

    def pair_set(split: list[Row], offset: int) -> PairDataset:
        labels = None
        if kto:  # each row's sample and its KL sample, the other row's answer in `rejected`
            split, sizes = feedback_rows(
                split, counter, cfg.dataset.max_length, cfg.dataset.truncation != "delete", cfg.seed + offset
            )
            labels = [bool(row.label) for row in split]
        else:
            sizes = [counter.sizes[id(row)] for row in split]
        chosen = [dataclasses.replace(row, num_tokens=c) for row, (c, _) in zip(split, sizes, strict=True)]
        rejected = [
            dataclasses.replace(row, response=row.rejected, num_tokens=r)
            for row, (_, r) in zip(split, sizes, strict=True)
        ]

        def encoded(answers: list[Row]):
            return family.dataset(
                bundle, answers, cfg.dataset.max_length, cfg.dataset.truncation, images, last_round=last_round
            )

        budget = budget_sizes(
            [c + r for c, r in sizes], [patches(row) for row in split] if patches else None, weight
        )
        return PairDataset(encoded(chosen), encoded(rejected), budget, offset, rows=split, labels=labels)

    train_set = pair_set(splits.train, 0)
    val_set = pair_set(splits.val, len(train_set))
    if kto:
        for name, dataset in (("training", train_set), ("validation", val_set)):
            good = sum(dataset.labels or ())
            log.info(
                "kto: %d %s rows, %d desirable, %d undesirable", len(dataset), name, good, len(dataset) - good
            )
        warn_unbalanced(cfg.preference, train_set.labels or [])
    else:
        log.info("dpo: %d training pairs, %d validation pairs", len(train_set), len(val_set))
    return TrainingData(
        train_set,
        val_set,
        collate=PairCollate(
            family.training_collate(bundle, loop.pad_to_multiple, loop.packing, plan.compile)
        ),
        eval_collate=PairCollate(family.eval_collate(bundle)),
        lengths=train_set.token_counts() if loop.token_budget else None,
        val_lengths=val_set.token_counts() if loop.token_budget else None,
    )
