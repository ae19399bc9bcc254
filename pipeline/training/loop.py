"""The training loop, on accelerate directly rather than transformers' Trainer.

Why not Trainer: the loss here is a token-weighted sum computed inside the model on supervised positions
only (no full-vocabulary logits), normalised by the supervised tokens of the whole accumulation window
across all ranks, so 1 and N processes give the same gradient for the same global batch; and exact resume
(same losses from the resumed step on), atomic checkpoints and signal-triggered saves are simpler to get
right in a loop of our own. accelerate still provides the engines (DDP, FSDP, DeepSpeed) and autocast;
under DeepSpeed the loop drives the engine's backward/step itself at its own accumulation boundary.

Data order: epoch e shuffles the training rows with seed + e; optimizer step s of that epoch takes the
window of `batch_size * grad_accum * world_size` rows at s, and rank r takes every world_size-th row of
it. An incomplete last window is dropped. Resuming at step s therefore needs no replay of the loader.
How a rank's rows of the window are cut into micro-batches (fixed groups of batch_size, or groups filled to
a token budget) is decided by pipeline/training/batching.py; the loss is the same either way.

What the loop minimises is its `Objective`: sft's is the token loss (`TokenLoss`: summed over supervised
tokens, normalised by the window's supervised tokens); dpo's (pipeline/training/preference.py) sums a loss
over preference pairs, normalised by the window's pairs. A row of the data is then a pair.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import signal
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from accelerate import Accelerator, DistributedType
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from pipeline.families.base import IGNORE_INDEX, PAIRS
from pipeline.stage_names import TRAINING_EVAL_STATS
from pipeline.training.batching import plan_window
from pipeline.training.checkpoints import (
    STATE_FILE,
    ReadFull,
    TrainerState,
    WriteFull,
    check_resume_plan,
    list_checkpoints,
    load_training_checkpoint,
    point,
    remove_partial_checkpoints,
    rotate_checkpoints,
    save_training_checkpoint,
)
from pipeline.training.neftune import EmbeddingNoise
from pipeline.training.plan import LoopSettings, cpu_cores
from pipeline.training.profiling import (
    StepProfiler,
    compile_counts,
    compile_stats,
    deliberate,
    graph_break_reasons,
)
from pipeline.training.residual_lora import ResidualAdapter
from pipeline.utils.io import append_jsonl, atomic_write_text
from pipeline.utils.memory import out_of_memory_message, resolution_knob

if TYPE_CHECKING:
    from pipeline.families.base import LossSums
    from pipeline.utils.tracking import Tracker

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """Training cannot go on; the message says at which step and what to try."""


class StopRequested(KeyboardInterrupt):
    """SIGINT/SIGTERM arrived; a checkpoint was written before stopping. `signal_name` says which."""

    def __init__(self, message: str, signal_name: str = "SIGINT") -> None:
        super().__init__(message)
        self.signal_name = signal_name


# rows of the dataset -> one batch the family's forward takes
Collate = Callable[[list], dict]


@dataclass(frozen=True)
class TrainingEngine:
    """What accelerate prepared: its accelerator, and the model, optimizer and learning-rate schedule it
    wrapped (DDP / FSDP; under DeepSpeed the model is DeepSpeed's engine, which steps and clips itself)."""

    accelerator: Accelerator
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any  # a torch LR scheduler


@dataclass(frozen=True)
class TrainingData:
    """The rows and how they become batches: the model family's collates, and (micro-batches cut by a token
    budget) every row's token count by index."""

    train_set: Dataset
    val_set: Dataset | None
    collate: Collate  # training micro-batches (padded to the plan's multiple, or packed)
    eval_collate: Collate
    lengths: Sequence[int] | None = None
    val_lengths: Sequence[int] | None = None


@dataclass(frozen=True)
class FamilyHooks:
    """What only the model family knows: a batch's loss summed over its supervised tokens (with their count
    and the correctly predicted ones), and how its full weights are written and read back."""

    forward: Callable[[nn.Module, dict], LossSums]
    write_full: WriteFull
    read_full: ReadFull
    # a batch onto the model's device (Family.to_device: the family's host-side inputs stay where they are)
    to_device: Callable[[dict, torch.device], dict]
    # each token's sample length in a collated batch (Family.token_sample_lengths), for NEFTune's noise
    sample_lengths: Callable[[dict], torch.Tensor]
    # the setting that sets how many image tokens a picture costs (Family.resolution_setting), for advice
    resolution_setting: str = ""


@dataclass
class ObjectiveSums:
    """One micro-batch's loss summed over its units (supervised tokens for sft, pairs for dpo), and the
    statistics logged beside it (the objective's stat_names), summed over the same units."""

    loss_sum: torch.Tensor
    stats: dict[str, torch.Tensor]


class Objective(Protocol):
    """What the loop minimises: a loss summed over the units of each micro-batch, normalised by the units of
    the whole accumulation window on all processes; its statistics are logged as means over the units (in
    the bar, logging.jsonl and the tracker; `eval_<name>` on the validation rows), or over what another of
    its statistics counts (`stat_counts`)."""

    name: str  # the training stage's name: the bar's label
    stat_names: tuple[str, ...]
    # a statistic -> the statistic that counts the units it is summed over (its mean is over those, NaN
    # where none was seen); the others are means over all units
    stat_counts: Mapping[str, str]

    def units(self, batch: dict) -> int:
        """Returns how many units (what the loss is normalised by) a collated micro-batch holds."""

    def sums(self, model: nn.Module, batch: dict) -> ObjectiveSums:
        """Returns the micro-batch's loss and statistics, summed over its units."""


class TokenLoss:
    """sft's objective: the family's cross-entropy summed over the supervised tokens; token accuracy beside it."""

    name = "sft"
    stat_names = TRAINING_EVAL_STATS["sft"]
    stat_counts: Mapping[str, str] = {}

    def __init__(self, forward: Callable[[nn.Module, dict], LossSums]) -> None:
        self.forward = forward

    def units(self, batch: dict) -> int:
        return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())

    def sums(self, model: nn.Module, batch: dict) -> ObjectiveSums:
        out = self.forward(model, batch)
        return ObjectiveSums(out.loss_sum, {"token_acc": out.num_correct})


def stat_means(objective: Objective, sums: Sequence[float], units: float) -> dict[str, float]:
    """Returns the objective's statistics from their sums (in stat_names' order): each over `units`, or over
    the sum of the statistic that counts its own units (Objective.stat_counts; NaN where that is 0)."""
    by_name = dict(zip(objective.stat_names, sums, strict=True))
    means = {}
    for name, value in by_name.items():
        count = by_name[objective.stat_counts[name]] if name in objective.stat_counts else units
        means[name] = value / count if count > 0 else math.nan
    return means


def window_mean(values: Sequence[float]) -> float:
    """Returns the mean of a logging window's values of one statistic, leaving out the steps that saw none
    of its units (NaN); NaN when none did."""
    seen = [v for v in values if not math.isnan(v)]
    return sum(seen) / len(seen) if seen else math.nan


@dataclass(frozen=True)
class RunOutputs:
    """Where the run writes: its folder (checkpoints, logging.jsonl, profile/), what every checkpoint
    records beside the weights (the run's config, the base model's folder), and the tracker if any."""

    folder: Path
    run_cfg: DictConfig
    base_path: Path
    tracker: Tracker | None = None
    # an adapter started from the base weights: each checkpoint stores it as a LoRA of the original base
    residual: ResidualAdapter | None = None


def steps_per_epoch(n_rows: int, settings: LoopSettings, world: int) -> int:
    return n_rows // (settings.batch_size * settings.grad_accum * world)


def planned_steps(n_rows: int, settings: LoopSettings, world: int) -> int:
    """Returns the optimizer steps of the run: max_steps when set, else epochs x full windows per epoch."""
    if settings.max_steps > 0:
        return settings.max_steps
    return settings.epochs * steps_per_epoch(n_rows, settings, world)


def epoch_order(n_rows: int, seed: int, epoch: int) -> list[int]:
    """Returns the shuffled row order of `epoch`."""
    return torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed + epoch)).tolist()


def window_indices(
    n_rows: int, seed: int, epoch: int, step: int, size: int, rank: int, world: int
) -> list[int]:
    """Returns this rank's row indices for optimizer step `step` of `epoch`."""
    window = epoch_order(n_rows, seed, epoch)[step * size : (step + 1) * size]
    return window[rank::world]


class SignalGuard:
    """Turns SIGINT/SIGTERM into a flag checked between optimizer steps (restored on exit)."""

    def __init__(self) -> None:
        self.requested: str | None = None
        self._old: dict[int, object] = {}

    def __enter__(self) -> SignalGuard:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested is not None:  # a second Ctrl-C: stop at once
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        log.warning("%s received: saving a checkpoint after this step, then stopping", self.requested)

    def __exit__(self, *exc) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def _memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1024**3
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    except ImportError:  # pragma: no cover - not on Linux
        return float("nan")


def loader_options(num_workers: int, on_cuda: bool) -> dict:
    """Returns the DataLoader's worker options: pinned memory on a GPU, prefetching with workers."""
    options: dict = {"num_workers": num_workers, "pin_memory": on_cuda}
    if num_workers > 0:
        options["prefetch_factor"] = 4
    return options


# A logging window whose steps waited this share of their time on the data loader warns (once a run, on a GPU)
DATA_WAIT_WARN_PCT = 20.0


class LoaderWait:
    """The time the loop spends waiting for the data loader's next step of micro-batches, and its share of a
    logging window (`data_wait_pct` in the log): near 0 the loader keeps ahead of the device; a large share is
    the device idling while rows are read, decoded and collated (a GPU step is queued asynchronously, and each
    step reads its loss back, so the host's wait is the device's)."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock
        self.waited = 0.0
        self._mark = 0.0

    def next(self, groups: Iterator[list[dict]]) -> list[dict]:
        started = self.clock()
        try:
            return next(groups)
        finally:
            self.waited += self.clock() - started

    def window_pct(self, elapsed: float) -> float:
        """Returns the share (%) of `elapsed` seconds spent waiting since the last call."""
        waited, self._mark = self.waited - self._mark, self.waited
        return round(100.0 * min(waited / max(elapsed, 1e-9), 1.0), 1)


def loader_wait_warning(pct: float, workers: int, device: torch.device) -> str | None:
    """Returns what to tell a user whose GPU steps waited `pct`% of their time on `workers` data workers, or
    None where that is no bottleneck worth a warning (below DATA_WAIT_WARN_PCT, or the CPU, where the loop
    and the loader share the same cores)."""
    if device.type != "cuda" or pct < DATA_WAIT_WARN_PCT:
        return None
    cores = cpu_cores()
    return (
        f"the GPU waited on the data loader for {pct:.0f}% of the steps' time: {workers} data worker(s) read, "
        f"decode and collate rows slower than the model trains. Raise trainer.num_workers (this machine has "
        f"{cores} CPU cores), or store the images nearer the size the model sees"
    )


def batch_samples(batch: dict) -> int:
    """Returns the samples a collated micro-batch holds: its rows, or the samples of a packed row (its
    `num_samples`, or MiniCPM-V-2's segment_ids); for preference pairs, the pairs."""
    if PAIRS in batch:
        return int(batch[PAIRS])
    if "num_samples" in batch:
        return int(batch["num_samples"])
    if "segment_ids" in batch:
        return int(batch["segment_ids"].max()) + 1
    return len(batch["input_ids"])


def out_of_memory_advice(
    when: str, settings: LoopSettings, batches: list[dict], resolution_setting: str, evaluating: bool = False
) -> str:
    """Returns what to tell a user whose run ran out of GPU memory `when` ("at step 3") in one of the collated
    micro-batches `batches`: which knob bounds a micro-batch in this run's regime, with a value to try, then
    the others, cheapest first. With a token budget (`micro_batch_tokens`, the default) the budget bounds a
    micro-batch, training's and evaluation's, and the batch sizes do not; in the fixed regime
    trainer.batch_size does (trainer.eval_batch_size `evaluating`)."""
    largest = max((batch["attention_mask"].numel() for batch in batches), default=0)
    where = f"{when} (its largest of {len(batches)} micro-batch(es): {largest} padded tokens)"
    if settings.micro_batch_tokens > 0:
        budget = settings.micro_batch_tokens
        first = (
            f"trainer.micro_batch_tokens={max(budget // 2, 128)} (now {budget}: the tokens a micro-batch holds, "
            f"its vision patches counted at trainer.patch_weight)"
        )
    elif evaluating:
        first = f"a smaller trainer.eval_batch_size (now {settings.eval_batch_size})"
    else:
        first = (
            f"a smaller trainer.batch_size (now {settings.batch_size}) with a larger trainer.grad_accum (the "
            f"same rows a step)"
        )
    knobs = [
        first,
        *([] if evaluating else ["model.gradient_checkpointing=true"]),
        "a smaller dataset.max_length",
        *resolution_knob(resolution_setting),
        *([] if evaluating else ["lora=qkv instead of all/none"]),
    ]
    return out_of_memory_message(where, knobs)


def checkpoint_to_resume(resume: str, sft_dir: Path) -> Path | None:
    """Returns the checkpoint trainer.resume names: the newest complete one of sft_dir (auto), the folder
    given, or None (never, or auto with none yet)."""
    if resume == "never":
        return None
    if resume == "auto":
        found = list_checkpoints(sft_dir)
        return found[-1] if found else None
    ckpt = Path(resume)
    if not (ckpt / STATE_FILE).is_file():
        raise TrainingError(
            f"trainer.resume={resume}: not a complete checkpoint folder (no trainer_state.json)"
        )
    return ckpt


class Trainer:
    """The training loop over its collaborators: the prepared engine, the data, the model family's hooks,
    the loop's settings (the training plan's) and where the run writes."""

    def __init__(
        self,
        engine: TrainingEngine,
        data: TrainingData,
        family: FamilyHooks,
        settings: LoopSettings,
        outputs: RunOutputs,
        objective: Objective | None = None,
    ) -> None:
        accelerator = engine.accelerator
        self.acc = accelerator
        self.model = engine.model
        self.optimizer = engine.optimizer
        self.scheduler = engine.scheduler
        self.data = data
        self.family = family
        self.objective = objective if objective is not None else TokenLoss(family.forward)
        self.s = settings
        self.outputs = outputs
        self.sft_dir = outputs.folder
        self.tracker = outputs.tracker
        # DeepSpeed: the prepared model is its engine, which steps, clips and checkpoints by itself
        self.deepspeed = engine.model if accelerator.distributed_type == DistributedType.DEEPSPEED else None
        self.world = accelerator.num_processes
        self.rank = accelerator.process_index
        n_rows = len(data.train_set)
        self.per_epoch = steps_per_epoch(n_rows, settings, self.world)
        if self.per_epoch == 0:
            raise TrainingError(
                f"{n_rows} training rows do not fill one optimizer step of batch_size "
                f"{settings.batch_size} x grad_accum {settings.grad_accum} x {self.world} process(es); "
                f"lower trainer.batch_size / trainer.grad_accum or add data"
            )
        self.total_steps = planned_steps(n_rows, settings, self.world)
        if settings.early_stopping_patience is not None and len(data.val_set) == 0:
            raise TrainingError(
                f"trainer.early_stopping_patience={settings.early_stopping_patience} watches {settings.best_metric}, "
                "and the run has no validation rows: set dataset.test_ratio > 0 or dataset.val_path, or "
                "trainer.early_stopping_patience=null"
            )
        self.state = TrainerState(total_steps=self.total_steps, best_metric_name=settings.best_metric)
        self.log_path = self.sft_dir / "logging.jsonl"
        self._compiled_before = compile_counts()  # another run in this process (a sweep) compiled those
        self._warned_breaks = False
        self.loader_wait = LoaderWait()
        self._warned_wait = False
        # Engines that gather weights in every forward need the same number of micro-batches on every rank.
        self.equal_micro_batches = self.world > 1 and accelerator.distributed_type in (
            DistributedType.FSDP,
            DistributedType.DEEPSPEED,
        )
        self._order: tuple[int, list[int]] | None = None
        # NEFTune: noise on the input embeddings while training (trainer.neftune_noise_alpha)
        self.noise = None
        if settings.neftune_alpha > 0:
            embeddings = accelerator.unwrap_model(self.model).get_input_embeddings()
            self.noise = EmbeddingNoise(embeddings, settings.neftune_alpha)

    # ----- resume
    def resume(self, resume: str) -> Path | None:
        """Restores the newest complete checkpoint (auto) or the one given; returns it, or None. A partial
        checkpoint folder an earlier attempt left (killed while saving) is removed first: it is never resumed
        from, and a full fine-tuning one holds as much disk as a whole checkpoint."""
        if self.acc.is_main_process:
            remove_partial_checkpoints(self.sft_dir)
        ckpt = checkpoint_to_resume(resume, self.sft_dir)
        if ckpt is None:
            return None
        check_resume_plan(ckpt, self.total_steps)
        self.state = load_training_checkpoint(
            ckpt,
            self.acc.unwrap_model(self.model),
            self.optimizer,
            self.scheduler,
            read_full=self.family.read_full,
            engine=self.deepspeed,
        )
        self.state.total_steps = self.total_steps
        self._watch_best_metric()
        halved = self.state.micro_batch_tokens
        if halved and self.s.halves_on_oom and halved < self.s.micro_batch_tokens:
            log.info("resuming at the token budget the run halved to: %d", halved)
            self.s = self.s.at_budget(halved)
        if self.acc.is_main_process and self.log_path.exists():
            # Drop log lines written after the checkpoint, so the log reads as one uninterrupted run.
            kept = [
                line
                for line in self.log_path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= self.state.global_step
            ]
            atomic_write_text(self.log_path, "".join(line + "\n" for line in kept))
        log.info("resumed from %s at step %d", ckpt, self.state.global_step)
        return ckpt

    def _watch_best_metric(self) -> None:
        """A resumed run that names another trainer.metric_for_best_model starts the best value and early
        stopping's count anew: the checkpoint's best was another metric's."""
        name = self.state.best_metric_name or "eval_loss"  # checkpoints older than the field
        self.state.best_metric_name = self.s.best_metric
        if name == self.s.best_metric:
            return
        log.info(
            "trainer.metric_for_best_model is %s, the checkpoint's best was by %s: the best checkpoint and early "
            "stopping's count start again from the next evaluation",
            self.s.best_metric,
            name,
        )
        self.state.best_metric = self.state.patience_best = None
        self.state.evals_without_gain = 0

    # ----- data
    def _micro_batches(self, step: int) -> list[list[int]]:
        """Returns this rank's micro-batches (row indices) for optimizer step `step`."""
        epoch, in_epoch = divmod(step, self.per_epoch)
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, epoch_order(len(self.data.train_set), self.s.seed, epoch))
        size = self.s.batch_size * self.s.grad_accum * self.world
        window = self._order[1][in_epoch * size : (in_epoch + 1) * size]
        plans = plan_window(
            [window[r :: self.world] for r in range(self.world)],
            self.data.lengths,
            self.s.batch_size,
            self.s.micro_batch_tokens,
            self.s.pad_to_multiple,
            equal_counts=self.equal_micro_batches,
            packed=self.s.packing,
        )
        return plans[self.rank]

    def _loader(self, start_step: int) -> Iterator[list[dict]]:
        """Yields, per optimizer step, the list of this rank's collated micro-batches."""
        plan: list[list[int]] = []
        counts: list[int] = []
        for step in range(start_step, self.total_steps):
            micro = self._micro_batches(step)
            plan.extend(micro)
            counts.append(len(micro))
        loader = DataLoader(
            self.data.train_set,
            batch_sampler=plan,
            collate_fn=self.data.collate,
            **loader_options(self.s.num_workers, self.acc.device.type == "cuda"),
            # Its own generator: a loader's iterator otherwise draws a seed from the global RNG, which would
            # shift the dropout masks of a resumed run against an uninterrupted one.
            generator=torch.Generator().manual_seed(self.s.seed),
        )
        group: list[dict] = []
        steps = iter(counts)
        want = next(steps, 0)
        for batch in loader:
            group.append(batch)
            if len(group) == want:
                yield group
                group = []
                want = next(steps, 0)

    def _ensure_grads(self) -> None:
        for p in self.model.parameters():
            if p.requires_grad and p.grad is None:
                p.grad = torch.zeros_like(p)

    # ----- one optimizer step
    def _step(self, micro: list[dict]) -> dict:
        device = self.acc.device
        objective = self.objective
        local_units = sum(objective.units(b) for b in micro)
        total = torch.tensor(float(local_units), device=device)
        total = self.acc.reduce(total, reduction="sum") if self.world > 1 else total
        total_units = max(float(total), 1.0)
        # the loss, then every statistic, summed over this rank's units
        sums = torch.zeros(1 + len(objective.stat_names), device=device)
        seen_tokens = 0
        padded_tokens = 0
        if self.s.preallocate_grads:
            self._ensure_grads()
        for i, batch in enumerate(micro):
            seen_tokens += int(batch["attention_mask"].sum())
            padded_tokens += batch["attention_mask"].numel()
            noise = _null() if self.noise is None else self.noise.lengths(self.family.sample_lengths(batch))
            batch = self.family.to_device(batch, device)
            sync = i == len(micro) - 1
            ctx = self.acc.no_sync(self.model) if not sync and self.world > 1 else _null()
            with ctx, noise, self.acc.autocast():
                out = objective.sums(self.model, batch)
            # DDP averages gradients over ranks; multiplying by world keeps the global mean over units.
            scaled = out.loss_sum * self.world / total_units
            if self.deepspeed is not None:
                # the window is this loop's (DeepSpeed's own accumulation count stays 1, so no rescaling);
                # at its last micro-batch the engine reduces, clips and steps the optimizer
                self.deepspeed.set_gradient_accumulation_boundary(sync)
                self.deepspeed.backward(scaled)
                if sync:
                    self.deepspeed.step()
            else:
                self.acc.backward(scaled)
            sums += torch.stack(
                [
                    out.loss_sum.detach().float(),
                    *(out.stats[k].detach().float() for k in objective.stat_names),
                ]
            ).to(device)
        if self.world > 1:
            sums = self.acc.reduce(sums, reduction="sum")
        loss_sum, *stat_sums = sums.tolist()
        loss = loss_sum / total_units
        if not math.isfinite(loss):
            raise TrainingError(
                f"loss is {loss} at step {self.state.global_step + 1}: lower optim.lr, check the data rows of "
                f"this step, use bf16 instead of fp16 (trainer.mixed_precision), or keep optim.max_grad_norm > 0"
            )
        grad_norm = None
        if self.deepspeed is not None:
            norm = self.deepspeed.get_global_grad_norm()
            grad_norm = None if norm is None else float(norm)
        elif self.s.max_grad_norm and self.s.max_grad_norm > 0:
            grad_norm = float(self.acc.clip_grad_norm_(self.model.parameters(), self.s.max_grad_norm))
        self.optimizer.step()  # under DeepSpeed a no-op: the engine stepped above
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=not self.s.preallocate_grads)
        return {
            "loss": loss,
            **stat_means(objective, stat_sums, total_units),
            "grad_norm": grad_norm,
            "tokens": seen_tokens,
            "padded_tokens": padded_tokens,
            "micro_batches": len(micro),
            "samples": sum(batch_samples(b) for b in micro),
        }

    # ----- evaluation (the objective's loss and statistics on the validation rows)
    def evaluate(self) -> dict:
        """Returns the objective's eval loss and statistics over the validation rows ({} without any); out
        of GPU memory, at half the token budget where it may halve (LoopSettings.halved)."""
        while True:
            try:
                return self._evaluate()
            except torch.OutOfMemoryError as err:
                smaller = self.s.halved()
                if smaller is None:
                    when = f"evaluating at step {self.state.global_step}"
                    batch = getattr(err, "batch", None)
                    advice = out_of_memory_advice(
                        when, self.s, [batch] if batch else [], self.family.resolution_setting, True
                    )
                    raise TrainingError(advice + self._halved_note()) from err
            self.model.train()
            self._halve_budget(smaller, f"evaluating at step {self.state.global_step}")

    @torch.no_grad()
    def _evaluate(self) -> dict:
        val_set = self.data.val_set
        if val_set is None or len(val_set) == 0:
            return {}
        n = len(val_set) if self.s.max_eval_samples is None else min(len(val_set), self.s.max_eval_samples)
        plans = plan_window(
            [list(range(n))[r :: self.world] for r in range(self.world)],
            self.data.val_lengths,
            self.s.eval_batch_size,
            self.s.micro_batch_tokens,
        )
        batches = plans[self.rank]
        # Under FSDP / ZeRO-3 each forward gathers weights with the other processes, so every process runs
        # as many batches as the one with the most; a filler batch (row 0) counts for nothing.
        most = max(len(p) for p in plans)
        counted = len(batches)
        batches += [[0]] * (most - counted)
        loader = DataLoader(
            val_set,
            batch_sampler=batches,
            collate_fn=self.data.eval_collate,
            **loader_options(self.s.num_workers, self.acc.device.type == "cuda"),
            generator=torch.Generator().manual_seed(self.s.seed),
        )
        self.model.eval()
        objective = self.objective
        # the loss, the units, then every statistic
        sums = torch.zeros(2 + len(objective.stat_names), device=self.acc.device)
        for i, batch in enumerate(loader):
            batch = self.family.to_device(batch, self.acc.device)
            try:
                with self.acc.autocast():
                    out = objective.sums(self.model, batch)
            except torch.OutOfMemoryError as err:
                err.batch = batch  # for the advice: its size
                raise
            if i < counted:
                stats = [out.stats[k].float() for k in objective.stat_names]
                units = torch.tensor(float(objective.units(batch)), device=self.acc.device)
                sums += torch.stack([out.loss_sum.float(), units, *stats]).to(self.acc.device)
        self.model.train()
        if self.world > 1:
            sums = self.acc.reduce(sums, reduction="sum")
        loss_sum, units, *stat_sums = sums.tolist()
        units = max(units, 1.0)
        stats = {f"eval_{k}": v for k, v in stat_means(objective, stat_sums, units).items()}
        return {"eval_loss": loss_sum / units, **stats}

    # ----- checkpointing
    def save(self) -> Path | None:
        """Writes a checkpoint (every process takes part: FSDP shards are gathered); returns its path."""
        self.acc.wait_for_everyone()
        path = save_training_checkpoint(
            self.sft_dir,
            self.acc.unwrap_model(self.model),
            self.optimizer,
            self.scheduler,
            self.state,
            self.outputs.run_cfg,
            self.outputs.base_path,
            write_full=self.family.write_full,
            engine=self.deepspeed,
            only_model=self.s.save_only_model,
            residual=self.outputs.residual,
        )
        if self.acc.is_main_process:
            point(self.sft_dir / "last", path)
            protect = {self.state.best_checkpoint} if self.state.best_checkpoint else set()
            rotate_checkpoints(self.sft_dir, self.s.save_total_limit, protect | {path.name})
        self.acc.wait_for_everyone()
        return path

    def _record_eval(self, metrics: dict, saving: bool) -> None:
        self.state.history.append({"step": self.state.global_step, **metrics})
        value = metrics.get(self.s.best_metric)
        # Only a step that is also saved can become "best": the pointer must name an existing folder.
        if saving and value is not None and self._improves(value, self.state.best_metric, 0.0):
            self.state.best_metric = value
            self.state.best_checkpoint = f"checkpoint-{self.state.global_step}"

    def _improves(self, value: float, best: float | None, threshold: float) -> bool:
        """Returns whether `value` of trainer.metric_for_best_model beats `best` (None: nothing yet) by more
        than `threshold`, in the metric's direction."""
        if best is None:
            return True
        return value > best + threshold if self.s.greater_is_better else value < best - threshold

    def _log(self, record: dict) -> None:
        # a statistic that saw none of its units (NaN: stat_means) is left out of the record
        record = {k: v for k, v in record.items() if not (isinstance(v, float) and math.isnan(v))}
        if self.acc.is_main_process:
            append_jsonl(self.log_path, record)
            if self.tracker is not None:
                self.tracker.log(
                    {
                        k: v
                        for k, v in record.items()
                        if isinstance(v, (int, float)) and k != "step" and v is not None
                    },
                    step=record["step"],
                )

    def _warn_graph_breaks(self, stats: dict[str, int]) -> None:
        """Warns once when compiled code broke into pieces (slower steps than a whole graph), with why;
        `stats`: compile_stats of this run."""
        if self._warned_breaks or not stats.get("graph_breaks"):
            return
        self._warned_breaks = True
        reasons = graph_break_reasons()
        if deliberate(graph_break_reasons(limit=None)):  # every reason, not only the ones shown
            # kernels kept outside the graph on purpose (flash-linear-attention, the PyTorch fallback of packed
            # linear-attention layers): the code around them compiles whole
            log.info("torch.compile runs around functions kept out of its graphs: %s", "; ".join(reasons))
            return
        log.warning(
            "torch.compile split compiled code at graph breaks (steps run slower than whole graphs): %s",
            "; ".join(reasons),
        )

    def _warn_data_wait(self, pct: float) -> None:
        """Warns once a run when a logging window's steps waited on the data loader (loader_wait_warning)."""
        message = None if self._warned_wait else loader_wait_warning(pct, self.s.num_workers, self.acc.device)
        if message:
            self._warned_wait = True
            log.warning(message)

    def _saving_on_bad_data(self, groups: Iterator[list[dict]]) -> Iterator[list[dict]]:
        """Yields the loader's groups; when one cannot be built (an image broken or gone since it was
        checked), saves the steps done so far before raising TrainingError naming the row.

        Building a group touches no weights, so the checkpoint is exactly the state after the last step.
        With several processes only the failing one knows, and a checkpoint needs them all: it only raises.
        """
        while True:
            try:
                group = self.loader_wait.next(groups)
            except StopIteration:
                return
            except Exception as err:
                step = self.state.global_step
                if step > 0 and self.world == 1 and not (self.sft_dir / f"checkpoint-{step}").is_dir():
                    self.save()
                found = list_checkpoints(self.sft_dir)
                kept = f"newest checkpoint: {found[-1]}" if found else "no checkpoint yet"
                reason = str(err).strip()
                if "Traceback" in reason:  # from a DataLoader worker: the last line is the error itself
                    reason = reason.splitlines()[-1]
                raise TrainingError(
                    f"the batch of step {step + 1} could not be built: {reason}; {kept}; fix or drop that "
                    "row and rerun the same command into the same run folder to resume"
                ) from err
            yield group

    # ----- out of GPU memory under trainer.micro_batch_tokens=auto
    def _halve_budget(self, smaller: LoopSettings, when: str) -> None:
        """Drops what the failed step or evaluation left (its gradients, the allocator's cached blocks) and
        goes on at the budget of `smaller`: the step is redone with the same rows in smaller micro-batches
        (the same loss: it is summed over the step's tokens), and checkpoints record the budget for a resume."""
        self.optimizer.zero_grad(set_to_none=not self.s.preallocate_grads)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        log.warning(
            "out of GPU memory %s with micro-batches of up to %d tokens: trainer.micro_batch_tokens=auto "
            "retries at %d (set trainer.micro_batch_tokens=%d to start there)",
            when,
            self.s.micro_batch_tokens,
            smaller.micro_batch_tokens,
            smaller.micro_batch_tokens,
        )
        self.s = smaller
        self.state.micro_batch_tokens = smaller.micro_batch_tokens

    def _halved_note(self) -> str:
        """What the out-of-memory advice adds where auto halved the budget before giving up."""
        if self.state.micro_batch_tokens is None:
            return ""
        return (
            f" (trainer.micro_batch_tokens=auto halved the budget down to {self.s.micro_batch_tokens} tokens, "
            f"its smallest)"
        )

    # ----- the loop
    def train(self) -> TrainerState:
        self.model.train()
        window: list[dict] = []
        last_saved = None
        start = self.state.global_step
        bar = tqdm(
            total=self.total_steps,
            initial=start,
            desc=self.objective.name,
            disable=not self.acc.is_main_process,
            dynamic_ncols=True,
        )
        speed = Speedometer(self.per_epoch, self.world)
        t_window = time.perf_counter()
        t_start = time.perf_counter()
        if self._patience_spent():
            log.info(
                "the run stopped early at step %d (%d evaluations without a better %s, "
                "trainer.early_stopping_patience=%d): nothing left to train; a larger patience or "
                "trainer.early_stopping_patience=null goes on from its last checkpoint",
                self.state.stopped_early_at or start,
                self.state.evals_without_gain,
                self.s.best_metric,
                self.s.early_stopping_patience,
            )
            bar.close()
            return self.state
        self.state.stopped_early_at = None  # a run that stopped early and goes on with more patience
        if start == 0:
            # The starting point, so every run shows how far training moved the eval loss.
            metrics = self.evaluate()
            if metrics:
                self.state.history.append({"step": 0, **metrics})
                self._log({"step": 0, **metrics})
        profiler = StepProfiler(
            self.s.profile_steps, self.sft_dir / "profile", self.acc.device, self.acc.is_main_process
        )
        with SignalGuard() as guard, profiler:
            groups = self._saving_on_bad_data(self._loader(start))
            while (micro := next(groups, None)) is not None:
                smaller = None
                try:
                    result = self._step(micro)
                except torch.OutOfMemoryError as err:
                    smaller = self.s.halved()
                    if smaller is None:
                        advice = out_of_memory_advice(
                            f"at step {self.state.global_step + 1}",
                            self.s,
                            micro,
                            self.family.resolution_setting,
                        )
                        raise TrainingError(advice + self._halved_note()) from err
                if smaller is not None:  # outside the handler: the failed step's tensors are released
                    groups.close()
                    self._halve_budget(smaller, f"at step {self.state.global_step + 1}")
                    groups = self._saving_on_bad_data(self._loader(self.state.global_step))
                    continue
                self.state.global_step += 1
                profiler.step()
                self.state.tokens_seen += result["tokens"]
                window.append(result)
                step = self.state.global_step
                bar.update(1)
                speed.add(result)
                bar.set_postfix_str(f"loss {result['loss']:.4f}, {speed.describe(step)}", refresh=False)
                if step % self.s.logging_steps == 0 or step == self.total_steps:
                    elapsed = max(time.perf_counter() - t_window, 1e-9)
                    compiled = compile_stats(self._compiled_before)
                    waited = self.loader_wait.window_pct(elapsed)
                    self._log(
                        {
                            "step": step,
                            "epoch": round(step / self.per_epoch, 4),
                            "loss": sum(r["loss"] for r in window) / len(window),
                            **{
                                name: window_mean([r[name] for r in window])
                                for name in self.objective.stat_names
                            },
                            "lr": self.scheduler.get_last_lr()[0],
                            "grad_norm": window[-1]["grad_norm"],
                            **throughput(window, elapsed, self.world),
                            "micro_batches": round(sum(r["micro_batches"] for r in window) / len(window), 2),
                            "epoch_eta_s": round(speed.epoch_eta(step), 1),
                            "memory_gb": round(_memory_gb(self.acc.device), 3),
                            "data_wait_pct": waited,
                            **compiled,
                        }
                    )
                    self._warn_graph_breaks(compiled)
                    # the window that holds the run's first step holds the workers' start-up too
                    if step - len(window) > start:
                        self._warn_data_wait(waited)
                    window, t_window = [], time.perf_counter()
                do_eval = step % self.s.eval_steps == 0 or step == self.total_steps
                do_save = step % self.s.save_steps == 0 or step == self.total_steps or guard.requested
                if do_eval:
                    paused = time.perf_counter()
                    budget = self.s.micro_batch_tokens
                    metrics = self.evaluate()
                    speed.pause(time.perf_counter() - paused)
                    if self.s.micro_batch_tokens != budget and step < self.total_steps:
                        # the evaluation halved the budget: the steps ahead are cut into micro-batches anew
                        groups.close()
                        groups = self._saving_on_bad_data(self._loader(step))
                    if metrics:
                        stop_early = self._count_patience(metrics[self.s.best_metric])
                        do_save = do_save or stop_early
                        self._record_eval(metrics, saving=bool(do_save))
                        self._log({"step": step, **metrics})
                        bar.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
                if do_save:
                    self.state.train_seconds += time.perf_counter() - t_start
                    t_start = time.perf_counter()
                    last_saved = self.save()
                    speed.pause(time.perf_counter() - t_start)
                    if self.state.best_checkpoint == f"checkpoint-{step}" and self.acc.is_main_process:
                        point(self.sft_dir / "best", last_saved)
                if guard.requested:
                    bar.close()
                    raise StopRequested(
                        f"stopped by {guard.requested} at step {step}; checkpoint {last_saved}",
                        guard.requested,
                    )
                if step >= self.total_steps:
                    break
                if self.state.stopped_early_at == step:
                    log.info(
                        "early stopping at step %d of %d: %d evaluations without a better %s than %.6g "
                        "(trainer.early_stopping_patience); checkpoint %s",
                        step,
                        self.total_steps,
                        self.state.evals_without_gain,
                        self.s.best_metric,
                        self.state.patience_best,
                        last_saved,
                    )
                    break
        bar.close()
        return self.state

    def _count_patience(self, value: float) -> bool:
        """Counts an evaluation (its value of trainer.metric_for_best_model) for early stopping; returns whether
        the run stops at this step (its state then says so, and the checkpoint written at this step records it)."""
        patience = self.s.early_stopping_patience
        if patience is None:
            return False
        if self._improves(value, self.state.patience_best, self.s.early_stopping_threshold):
            self.state.patience_best, self.state.evals_without_gain = value, 0
        else:
            self.state.evals_without_gain += 1
        if self._patience_spent() and self.state.global_step < self.total_steps:
            self.state.stopped_early_at = self.state.global_step
            return True
        return False

    def _patience_spent(self) -> bool:
        patience = self.s.early_stopping_patience
        return patience is not None and self.state.evals_without_gain >= patience


def throughput(results: list[dict], seconds: float, world: int) -> dict:
    """Returns samples/s, real (unpadded) tokens/s and the padding share of the given steps, all processes."""
    tokens = sum(r["tokens"] for r in results)
    padded = sum(r.get("padded_tokens", r["tokens"]) for r in results)
    return {
        "samples_per_s": sum(r["samples"] for r in results) * world / seconds,
        "tokens_per_s": tokens * world / seconds,
        "padding_pct": round(100.0 * (1 - tokens / padded), 2) if padded else 0.0,
    }


class Speedometer:
    """Running speed of the training steps (evaluation and saving excluded) for the bar and the log."""

    def __init__(self, per_epoch: int, world: int) -> None:
        self.per_epoch = per_epoch
        self.world = world
        self.started = time.perf_counter()
        self.paused = 0.0
        self.steps = 0
        self.totals = {"samples": 0, "tokens": 0, "padded_tokens": 0}

    def add(self, result: dict) -> None:
        self.steps += 1
        if self.steps == 1:  # the first step holds warm-up (workers, compilation): time from its end
            self.started = time.perf_counter()
            self.paused = 0.0
            return
        for key in self.totals:
            self.totals[key] += result.get(key, result["tokens"])

    def pause(self, seconds: float) -> None:
        self.paused += seconds

    def seconds_per_step(self) -> float | None:
        if self.steps < 2:
            return None
        return max(time.perf_counter() - self.started - self.paused, 1e-9) / (self.steps - 1)

    def epoch_eta(self, step: int) -> float:
        """Seconds to the end of the current epoch at the running speed (0 until measurable)."""
        per_step = self.seconds_per_step()
        return 0.0 if per_step is None else ((-step) % self.per_epoch) * per_step

    def describe(self, step: int) -> str:
        per_step = self.seconds_per_step()
        if per_step is None:
            return "warming up"
        stats = throughput([self.totals], per_step * (self.steps - 1), self.world)
        eta = self.epoch_eta(step)
        return (
            f"{stats['samples_per_s']:.1f} samples/s, {stats['tokens_per_s']:.0f} tok/s, "
            f"pad {stats['padding_pct']:.0f}%, epoch ETA {int(eta // 60)}m{int(eta % 60):02d}s"
        )


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
