"""The training plan: every `auto` setting of the sft stage resolved once, into one typed, frozen record.

`plan_training` builds it from the config, from where the run executes (`Launch`: the device, the number of
processes, the engine accelerate started and its mixed precision) and from what the model family can do
(`compiles`: whether its layers can be compiled; `compiled_shapes`: which batches they take;
`packs_padding_free`: whether it attends packed rows by variable-length attention); no decision looks at a
family's name. The stage logs it once (`TrainingPlan.describe`) and hands out its parts: the weights dtype
and activation checkpointing to the model, compile and CUDA graphs to the family, the learning rate to the
optimizer, `loop` to the Trainer.

    mixed precision          trainer.mixed_precision auto: bf16 on a GPU that has it (else fp16), none on CPU
    weights dtype            LoRA: model.dtype (auto: bf16, else fp16, on a GPU; fp32 on CPU); full: fp32
    compile                  trainer.compile auto: see resolve_compile
    vision blocks compiled   trainer.compile_vision auto: see resolve_compile_vision
    packing                  trainer.packing auto: see resolve_packing
    gradient checkpointing   model.gradient_checkpointing auto: see resolve_checkpointing
    CUDA graphs              compiled on a GPU, for a family whose compiled layers take any padded batch
                             (MiniCPM-V-2); batches then padded to a multiple of 128, gradients preallocated
    static buckets           compiled for packed rows only (the HF-native families): rows rounded up to a
                             quarter of the budget (see static_bucket)
    data workers             trainer.num_workers auto: see resolve_num_workers
    grad_accum               trainer.grad_accum null: ms-swift's ceil(16 / (batch_size x processes))
    save_steps, eval batch   null: eval_steps and batch_size, as ms-swift
    learning rate            optim.lr null: the model's recipe, model.lora_lr (LoRA) or model.full_lr (full);
                             optim.vit_lr / optim.aligner_lr: the vision tower's / projector's own
"""

from __future__ import annotations

import importlib.util
import math
import os
from dataclasses import dataclass, replace
from typing import Any

import torch
from omegaconf import DictConfig

from pipeline.config import ConfigError, best_metric_name, resolve_dtype
from pipeline.families.base import Checkpointing
from pipeline.families.packing import static_floor

# ms-swift's default global batch: its gradient_accumulation_steps defaults to ceil(16 / batch / processes)
DEFAULT_GLOBAL_BATCH = 16
# the largest micro-batch budget that auto still checkpoints (trainer=low_memory's)
CHECKPOINT_BUDGET = 1024
# batches of a run replayed as CUDA graphs are padded to a multiple of this, so few shapes are recorded
GRAPH_PAD_MULTIPLE = 128
# trainer.micro_batch_tokens=auto: the budget of a LoRA run on a card of at least LARGE_CARD_GIB (80 GB
# cards: one micro-batch a 16-row step of COCO-shaped Qwen2.5-VL rows, 38% MFU against 19% at 4096 on an
# H200, 32 GB peak; bench/RESULTS.md), else DEFAULT_BUDGET (18 GB peak for MiniCPM-V-2, 14 for Qwen2.5-VL-3B)
DEFAULT_BUDGET = 4096
LARGE_CARD_BUDGET = 16384
LARGE_CARD_GIB = 60
# full fine-tuning's state per trained parameter: fp32 weight, its gradient and AdamW's two moments; auto gives
# it LARGE_CARD_BUDGET where that state takes at most FULL_STATE_SHARE of a large card (MiniCPM-V 4.6's 1.3B
# parameters: ~21 GB of 80), DEFAULT_BUDGET where the card is mostly state (MiniCPM-V-2 ~54 GB, Qwen2.5-VL-3B
# ~60, Qwen3-VL-4B ~71: 62-73 GB peak at 4096 on an H100, bench/RESULTS.md)
FULL_STATE_BYTES = 16
# by optim.name: bitsandbytes' 8-bit AdamW keeps the fp32 weight and gradient and two 8-bit moments
STATE_BYTES = {"adamw_torch": FULL_STATE_BYTES, "adamw_bnb_8bit": 10}
OPTIMIZER_LABELS = {"adamw_torch": "AdamW", "adamw_bnb_8bit": "AdamW 8-bit (bitsandbytes)"}  # the plan's log
FULL_STATE_SHARE = 0.5
# LoRA that trains the vision tower keeps the tower's activations without checkpointing on a card of at least
# TOWER_CARD_GIB where its family declares the budget that bounds them (Capabilities.trained_tower_budget):
# MiniCPM-V-2 lora=all at 2048 tokens, 43.2 GB peak and 24.43 samples/s against 19.13 with every block
# checkpointed in one micro-batch (H100 80GB; bench/RESULTS.md, "Eleventh GPU calls")
TOWER_CARD_GIB = 75
# trainer.micro_batch_tokens=auto halves the budget of a step that ran out of GPU memory down to this (below
# it a micro-batch holds a row or two of most data: the run stops with the out-of-memory advice instead)
SMALLEST_HALVED_BUDGET = 512
# the dtype autocast computes in, by accelerate's mixed-precision mode
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# engines that shard weights (and optimizer state) over the processes
SHARDING_ENGINES = ("FSDP", "DEEPSPEED")


@dataclass(frozen=True)
class Launch:
    """Where the run executes, as the engine was started: the device of this process, the number of
    processes, accelerate's distributed type by name (NO, MULTI_CPU, MULTI_GPU, FSDP, DEEPSPEED, ...) and
    the mixed-precision mode it runs with (see resolve_mixed_precision)."""

    device: torch.device
    processes: int = 1
    engine: str = "NO"
    mixed_precision: str = "no"

    @property
    def sharded(self) -> bool:
        return self.engine in SHARDING_ENGINES

    @property
    def deepspeed(self) -> bool:
        return self.engine == "DEEPSPEED"


@dataclass(frozen=True)
class LoopSettings:
    """What the training loop runs by: the trainer section with every null and auto resolved."""

    batch_size: int
    grad_accum: int
    epochs: int
    max_steps: int
    logging_steps: int
    eval_steps: int
    save_steps: int
    save_total_limit: int | None
    eval_batch_size: int
    max_eval_samples: int | None
    max_grad_norm: float
    num_workers: int
    seed: int
    # micro-batches filled to this many padded tokens (0: fixed micro-batches of batch_size)
    micro_batch_tokens: int = 0
    packing: bool = False  # each micro-batch one packed row (padding-free), within micro_batch_tokens
    profile_steps: int = 0  # > 0: torch.profiler over that many optimizer steps, into sft/profile/
    pad_to_multiple: int = 1  # batches padded to a multiple of this many tokens (CUDA graphs: 128)
    # Compiled layers replayed as CUDA graphs return their gradients in the graphs' memory pool, which the
    # next micro-batch's replay reuses. Gradients that already exist are added to in place, so with gradient
    # accumulation every trainable parameter holds its own .grad from the first micro-batch on.
    preallocate_grads: bool = False
    save_only_model: bool = False  # checkpoints without the optimizer's state (trainer.save_only_model)
    # trainer.micro_batch_tokens=auto in one process without CUDA graphs, FSDP or DeepSpeed: a step (or an
    # evaluation) that runs out of GPU memory is retried at half the budget, down to SMALLEST_HALVED_BUDGET
    halves_on_oom: bool = False
    neftune_alpha: float = 0.0  # trainer.neftune_noise_alpha (0: no noise on the embeddings)
    # the evaluation metric (as logged: eval_<name>) that picks the best checkpoint and that early stopping
    # watches, and whether a larger value is the better one (trainer.metric_for_best_model, greater_is_better)
    best_metric: str = "eval_loss"
    greater_is_better: bool = False
    # trainer.early_stopping_patience (None: never) and _threshold: evaluations in a row without a better value
    # of best_metric (by more than the threshold) after which training ends
    early_stopping_patience: int | None = None
    early_stopping_threshold: float = 0.0

    @property
    def token_budget(self) -> bool:
        """Whether micro-batches are cut by tokens (and so need every row's token count)."""
        return self.micro_batch_tokens > 0

    def halved(self) -> LoopSettings | None:
        """Returns these settings at half the token budget (halves_on_oom), or None where the budget may not
        halve (given explicitly, several processes) or is down to SMALLEST_HALVED_BUDGET."""
        if not self.halves_on_oom or self.micro_batch_tokens < 2 * SMALLEST_HALVED_BUDGET:
            return None
        return self.at_budget(self.micro_batch_tokens // 2)

    def at_budget(self, budget: int) -> LoopSettings:
        """Returns these settings with micro-batches of up to `budget` tokens. The padding stays: the collate
        the run built pads to it, and compiled packed rows keep the static lengths of the budget the run
        started with (their ladder covers any shorter row, and the shapes compiled so far stay in use)."""
        return replace(self, micro_batch_tokens=budget)


@dataclass(frozen=True)
class TrainingPlan:
    """The sft stage's resolved settings: one record, built once (plan_training) and logged once."""

    launch: Launch
    weights_dtype: torch.dtype  # the dtype the weights are held in while training
    # True, False, "vision" (the vision tower's blocks only) or a share in (0, 1): the vision tower's blocks
    # and that share of the language model's decoder layers (families.base.checkpointed_layers)
    gradient_checkpointing: Checkpointing
    compile: bool  # the family compiles its layers (trainer.compile)
    cuda_graphs: bool  # compiled layers replayed as CUDA graphs
    lr: float
    loop: LoopSettings
    # the rates of the vision tower and the projector where optim.vit_lr / optim.aligner_lr set them
    part_lrs: tuple[tuple[str, float], ...] = ()
    # the family also compiles its vision tower's blocks, on padded patch sequences (trainer.compile_vision)
    compile_vision: bool = False
    optimizer: str = "adamw_torch"  # optim.name

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype the model's matrix products run in: the weights' where they are half precision (LoRA on
        a GPU), else the mixed-precision autocast's (full fine-tuning's fp32 weights under bf16), else fp32."""
        if self.weights_dtype in (torch.bfloat16, torch.float16):
            return self.weights_dtype
        return AUTOCAST_DTYPES.get(self.launch.mixed_precision, self.weights_dtype)

    @property
    def rows_per_step(self) -> int:
        """Rows of one optimizer step, all processes together."""
        return self.loop.batch_size * self.loop.grad_accum * self.launch.processes

    def describe(self) -> str:
        """Returns the plan as a few lines for the log."""
        launch, loop = self.launch, self.loop

        def on(flag: bool) -> str:
            return "on" if flag else "off"

        if not loop.token_budget:
            micro = f"{loop.batch_size} row(s)"
        elif loop.packing:
            micro = f"packed rows of up to {loop.micro_batch_tokens} tokens (padding-free)"
        else:
            micro = f"up to {loop.micro_batch_tokens} padded tokens"
        if loop.pad_to_multiple > 1 and loop.packing and self.compile and not self.cuda_graphs:
            micro += (
                f", rounded up to static lengths (four per doubling, from {static_floor(loop.pad_to_multiple)} "
                "tokens)"
            )
        elif loop.pad_to_multiple > 1:
            micro += f", padded to a multiple of {loop.pad_to_multiple}"
        lines = [
            f"engine: {launch.engine}, {launch.processes} process(es), device {launch.device}; "
            f"mixed precision: {launch.mixed_precision}; weights in {str(self.weights_dtype).split('.')[-1]}",
            f"compile: {on(self.compile)}{' (vision blocks too)' if self.compile_vision else ''}; "
            f"CUDA graphs: {on(self.cuda_graphs)}; "
            f"gradient checkpointing: {checkpointing_text(self.gradient_checkpointing)}",
            f"optimizer: {OPTIMIZER_LABELS[self.optimizer]}, lr {self.lr:g}"
            + "".join(f"; {part} lr {lr:g}" for part, lr in self.part_lrs)
            + (f"; NEFTune noise alpha {loop.neftune_alpha:g}" if loop.neftune_alpha else ""),
            f"optimizer step: {self.rows_per_step} rows (batch {loop.batch_size} x grad_accum "
            f"{loop.grad_accum} x {launch.processes} process(es)); micro-batches: {micro}; "
            f"{loop.num_workers} data worker(s)",
        ]
        return "training plan:\n  " + "\n  ".join(lines)


def plan_training(
    cfg: DictConfig,
    launch: Launch,
    *,
    compiles: bool,
    packs_padding_free: bool = False,
    compiled_shapes: str = "padded",
    compiles_vision: bool = False,
    vision_by_default: bool = True,
    parameters: int | None = None,
    trained_tower_budget: int = 0,
    checkpoints_tower_only: bool = False,
    trained_tower_card_gib: int = TOWER_CARD_GIB,
    trained_tower_max_parameters: int = 0,
) -> TrainingPlan:
    """Returns the run's training plan, from the model family's capabilities: `compiles`, whether it compiles
    its layers when trainer.compile asks for it; `packs_padding_free`, whether it packs rows without a mask
    (for trainer.packing=auto); `compiled_shapes`, "padded" = its compiled layers take any batch and replay
    as CUDA graphs on a GPU, "packed" = they take packed rows of static lengths only (no CUDA graphs), so
    compile needs packing; `compiles_vision`, whether it can compile its vision tower's blocks in this run
    (Family.compiles_vision_on), and `vision_by_default`, whether trainer.compile_vision=auto does;
    `parameters`, the base model's parameter count where it is known before loading (for full fine-tuning's
    budget: resolve_micro_batch_tokens); `trained_tower_budget`, the budget within which LoRA that trains
    the family's vision tower keeps its activations on a card of `trained_tower_card_gib` or more, for models
    of up to `trained_tower_max_parameters` (Capabilities.trained_tower_budget and the two after it), and
    `checkpoints_tower_only`, whether such LoRA beyond that budget checkpoints the tower's blocks only
    (Capabilities.checkpoints_tower_only)."""
    device, processes = launch.device, launch.processes
    t = cfg.trainer
    shards = processes if launch.sharded else 1
    tower_trains = lora_trains_tower(cfg.lora)
    tower_budget = tower_budget_on(
        device,
        cfg.lora.name,
        tower_trains,
        trained_tower_budget,
        trained_tower_card_gib,
        trained_tower_max_parameters,
        parameters,
    )
    optimizer = str(cfg.optim.get("name", "adamw_torch"))
    if optimizer == "adamw_bnb_8bit" and launch.engine == "FSDP":
        # its kernels take plain tensors, and FSDP2's parameters are sharded DTensors (the first step fails)
        raise ConfigError(
            "optim.name=adamw_bnb_8bit: bitsandbytes' 8-bit AdamW cannot step FSDP's sharded parameters; "
            "shard with DeepSpeed instead (bench/accelerate/deepspeed_zero3.yaml: the 8-bit AdamW runs inside "
            "ZeRO) or set optim.name=adamw_torch"
        )
    budget = resolve_micro_batch_tokens(
        t.micro_batch_tokens,
        device,
        cfg.lora.name,
        parameters,
        shards,
        tower_budget,
        STATE_BYTES[optimizer],
    )
    packing = resolve_packing(t.packing, device, packs_padding_free, budget)
    packed_only = compiled_shapes == "packed"
    compiled = resolve_compile(
        t.compile, device, compiles and (packing or not packed_only), processes, launch.sharded
    )
    if compiled and packed_only and not packing:
        raise ValueError(
            "trainer.compile=true: this model family compiles packed rows of static lengths only; "
            "set trainer.packing=true (with trainer.micro_batch_tokens > 0) or trainer.compile=false"
        )
    graphs = compiled and device.type == "cuda" and not packed_only
    if graphs:
        pad_to_multiple = GRAPH_PAD_MULTIPLE
    elif compiled and packed_only:
        pad_to_multiple = static_bucket(budget)
    else:
        pad_to_multiple = 1
    loop = LoopSettings(
        batch_size=t.batch_size,
        grad_accum=accumulation_steps(t.grad_accum, t.batch_size, processes),
        epochs=t.epochs,
        max_steps=t.max_steps,
        logging_steps=t.logging_steps,
        eval_steps=t.eval_steps,
        save_steps=t.save_steps if t.save_steps is not None else t.eval_steps,
        save_total_limit=t.save_total_limit,
        save_only_model=t.save_only_model,
        best_metric=best_metric_name(t.metric_for_best_model),
        greater_is_better=(
            t.greater_is_better
            if t.greater_is_better is not None
            else not t.metric_for_best_model.endswith("loss")
        ),
        early_stopping_patience=t.early_stopping_patience,
        early_stopping_threshold=float(t.early_stopping_threshold),
        eval_batch_size=t.eval_batch_size if t.eval_batch_size is not None else t.batch_size,
        max_eval_samples=t.max_eval_samples,
        max_grad_norm=cfg.optim.max_grad_norm,
        num_workers=resolve_num_workers(t.num_workers, device, processes),
        seed=cfg.seed,
        micro_batch_tokens=budget,
        packing=packing,
        profile_steps=t.profile_steps,
        pad_to_multiple=pad_to_multiple,
        # DeepSpeed's engine keeps gradients in its own buffers
        preallocate_grads=graphs and not launch.deepspeed,
        # one process: several would have to agree on the retry (the others wait in their collectives); not
        # where CUDA graphs replay (a recording cut short by running out of memory is not known to recover), nor
        # under FSDP / DeepSpeed (their engines keep gradient buffers and counters of their own)
        halves_on_oom=t.micro_batch_tokens == "auto"
        and budget > 0
        and processes == 1
        and not graphs
        and not launch.sharded,
        neftune_alpha=float(t.get("neftune_noise_alpha") or 0.0),
    )
    return TrainingPlan(
        launch=launch,
        weights_dtype=resolve_weights_dtype(cfg, device),
        gradient_checkpointing=resolve_checkpointing(
            cfg.model.gradient_checkpointing,
            device,
            cfg.lora.name,
            budget,
            tower_trains,
            tower_budget,
            checkpoints_tower_only,
        ),
        compile=compiled,
        compile_vision=resolve_compile_vision(
            t.get("compile_vision", "auto"), compiled, compiles_vision, vision_by_default
        ),
        cuda_graphs=graphs,
        lr=resolve_lr(cfg),
        part_lrs=resolve_part_lrs(cfg),
        loop=loop,
        optimizer=optimizer,
    )


def static_bucket(micro_batch_tokens: int) -> int:
    """Returns the bucket of the static lengths packed rows of compiled layers are rounded up to: a quarter
    of the micro-batch budget in multiples of 128; the lengths are pipeline/families/packing.py's
    `static_length` ladder (four per doubling) from a quarter of the bucket up."""
    quarter = max(int(micro_batch_tokens), 4 * GRAPH_PAD_MULTIPLE) // 4
    return -(-quarter // GRAPH_PAD_MULTIPLE) * GRAPH_PAD_MULTIPLE


def resolve_mixed_precision(choice: str, device: torch.device) -> str:
    """Returns accelerate's mixed-precision mode for trainer.mixed_precision: as given; auto = bf16 on a GPU
    that has it (else fp16), no on CPU."""
    if choice != "auto":
        return "no" if choice == "no" else choice
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"


def resolve_weights_dtype(cfg: DictConfig, device: torch.device) -> torch.dtype:
    """Returns the dtype the weights are held in while training.

    LoRA: the frozen base in the model dtype (bf16 on GPU; the adapters stay fp32 under PEFT);
    full fine-tuning: fp32 master weights under bf16 autocast, so small updates are not rounded away.
    """
    if cfg.lora.name == "none":
        return torch.float32
    return resolve_dtype(cfg, device)


def resolve_part_lrs(cfg: DictConfig) -> tuple[tuple[str, float], ...]:
    """Returns ((part, lr), ...) for the parts whose rate optim.vit_lr ("vision") and optim.aligner_lr
    ("projector") set; the others train at the run's lr."""
    given = (("vision", cfg.optim.get("vit_lr")), ("projector", cfg.optim.get("aligner_lr")))
    return tuple((part, float(lr)) for part, lr in given if lr is not None)


def resolve_lr(cfg: DictConfig) -> float:
    """Returns optim.lr, or for null the model's recipe: model.lora_lr with LoRA and model.full_lr for full
    fine-tuning (ms-swift's 1e-4 / 1e-5 for MiniCPM-V-2)."""
    lr = cfg.optim.lr
    if lr is None:
        lr = cfg.model.full_lr if cfg.lora.name == "none" else cfg.model.lora_lr
    return float(lr)


def accumulation_steps(grad_accum: int | None, batch_size: int, processes: int) -> int:
    """Returns trainer.grad_accum, or for null ms-swift's ceil(16 / (batch_size x processes))."""
    if grad_accum is not None:
        return int(grad_accum)
    return math.ceil(DEFAULT_GLOBAL_BATCH / batch_size / processes)


def resolve_num_workers(value: Any, device: torch.device, processes: int = 1) -> int:
    """Returns DataLoader workers: N as given; auto = 0 on CPU (the main process is faster there), on a
    GPU this process's share of the CPU cores less one for the training process, at most 8."""
    if value != "auto":
        return int(value)
    if device.type != "cuda":
        return 0
    return max(0, min(8, cpu_cores() // max(processes, 1) - 1))


def cpu_cores() -> int:
    """Returns the CPU cores this process may run on (its affinity where the OS reports one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def resolve_compile(value: Any, device: torch.device, compiles: bool, processes: int, sharded: bool) -> bool:
    """Returns whether sft compiles the model's layers: true/false as given; auto = on where the family
    compiles this run's batches (`compiles`: MiniCPM-V-2 any batch, the HF-native families packed rows) on an
    Ampere-or-newer CUDA device with triton, in a single unsharded process, off elsewhere (CPU, older cards,
    unpacked batches of a family that compiles packed rows only, several processes, FSDP/DeepSpeed)."""
    if value != "auto":
        return bool(value)
    single = compiles and processes == 1 and not sharded
    return device.type == "cuda" and single and compiles_on(device)


def resolve_compile_vision(
    value: Any, compiled: bool, compiles_vision: bool, by_default: bool = True
) -> bool:
    """Returns whether the family's vision blocks compile too: false as given; auto = where the layers
    compile (`compiled`) and the family can compile its vision blocks in this run (`compiles_vision`: a
    tower that attends by variable-length attention) and compiles them by default (`by_default`:
    Capabilities.compiles_vision_by_default, off where a compiled tower measured no faster); true needs the
    first two and says which is missing."""
    if value is False:
        return False
    if value == "auto":
        return compiled and compiles_vision and by_default
    if not compiled:
        raise ValueError(
            "trainer.compile_vision=true compiles the vision blocks with the model's layers: trainer.compile "
            "resolves off for this run (set trainer.compile=true, or trainer.compile_vision=auto)"
        )
    if not compiles_vision:
        raise ValueError(
            "trainer.compile_vision=true: this model's vision blocks compile only over variable-length "
            "attention (model.vision_attention=varlen: a CUDA card of compute capability 8.0+, bf16/fp16 "
            "weights); set trainer.compile_vision=auto or false"
        )
    return True


def resolve_micro_batch_tokens(
    value: Any,
    device: torch.device,
    lora: str,
    parameters: int | None = None,
    shards: int = 1,
    tower_budget: int = 0,
    state_bytes: int = FULL_STATE_BYTES,
) -> int:
    """Returns trainer.micro_batch_tokens: as given; auto = `tower_budget` where it is set (tower_budget_on:
    LoRA that trains the vision tower without checkpointing); LARGE_CARD_BUDGET on a CUDA device of at least
    LARGE_CARD_GIB (fewer, larger micro-batches: fewer launches per sample, same loss) for LoRA, and for full
    fine-tuning where its state (`state_bytes` a parameter of the `parameters`: STATE_BYTES by optimizer;
    split over `shards` processes under FSDP/DeepSpeed) takes at most
    FULL_STATE_SHARE of the card; else DEFAULT_BUDGET (a card mostly taken by full fine-tuning's state, an
    unknown parameter count, smaller cards, the CPU)."""
    if value != "auto":
        return int(value)
    if tower_budget:
        return tower_budget
    card = card_bytes(device)
    if card < LARGE_CARD_GIB * 2**30:
        return DEFAULT_BUDGET
    if lora != "none":
        return LARGE_CARD_BUDGET
    if parameters is not None and parameters * state_bytes / max(shards, 1) <= FULL_STATE_SHARE * card:
        return LARGE_CARD_BUDGET
    return DEFAULT_BUDGET


def resolve_packing(
    value: Any, device: torch.device, packs_padding_free: bool, micro_batch_tokens: int
) -> bool:
    """Returns whether sft packs each micro-batch into one row: true/false as given; auto = on for a family
    whose packed rows are attended by variable-length attention (`packs_padding_free`: the HF-native
    families; MiniCPM-V-2's packing builds a T x T mask, which costs more than it saves) on a CUDA device
    with a token budget (micro_batch_tokens > 0, the packed row's length); off on the CPU (one sample at a
    time through every attention layer there) and in the plain regime."""
    if value != "auto":
        return bool(value)
    return device.type == "cuda" and packs_padding_free and micro_batch_tokens > 0


def compiles_on(device: torch.device) -> bool:
    """Returns whether torch.compile's GPU backend is expected to work on `device`: an Ampere or newer
    NVIDIA card (compute capability 8.0+, as the CUDA-graph path was measured on) with triton installed."""
    if device.type != "cuda" or not torch.cuda.is_available() or torch.version.hip is not None:
        return False
    return (
        torch.cuda.get_device_capability(device) >= (8, 0) and importlib.util.find_spec("triton") is not None
    )


def checkpointing_text(value: Checkpointing) -> str:
    """Returns how the plan's log line names a resolved model.gradient_checkpointing."""
    if value == "vision":
        return "vision tower only"
    if not isinstance(value, bool):
        return f"the vision tower and {value:g} of the language model's layers (the first ones)"
    return "on" if value else "off"


def resolve_checkpointing(
    value: Any,
    device: torch.device,
    lora: str,
    micro_batch_tokens: int,
    tower_trains: bool = False,
    tower_budget: int = 0,
    tower_only: bool = False,
) -> Checkpointing:
    """Returns whether sft checkpoints activations: true/false as given; a share in (0, 1) as given (the
    vision tower's blocks and that share of the language model's decoder layers, the first ones: a card with
    room for some of their activations recomputes fewer of them); "vision" = the vision tower's
    blocks only (their activations grow with the patches, which the language model's token budget does not
    bound; the language model's are bounded, and skipping their recompute saves a forward pass of it);
    auto = off for LoRA that leaves the vision tower frozen (lora=qkv) on a CUDA device with micro-batches
    of more than 1024 tokens (their activations are bounded by the budget: 18 GB peak for MiniCPM-V-2 at
    trainer=default's 4096), and for LoRA that trains the tower (`tower_trains`, lora=all) where the budget
    is within `tower_budget` (tower_budget_on: the family's budget that bounds the tower's activations, on
    a large card); for LoRA that trains the tower otherwise, "vision" where its family keeps the language
    model's activations (`tower_only`, Capabilities.checkpoints_tower_only: MiniCPM-V 4.6, whose recompute
    runs its linear-attention kernels twice) and on elsewhere (the tower's activations of every slice of
    every row in a micro-batch are kept for the backward: MiniCPM-V-2 lora=all ran out of an 80 GB H100 at
    its first step with 16 rows in one micro-batch and no checkpointing); on for full fine-tuning, budgets of
    1024 or less (trainer=low_memory), the plain regime (micro_batch_tokens=0) and the CPU (ms-swift's
    default)."""
    if value == "vision":
        return "vision"
    if isinstance(value, float) and 0 < value < 1:
        return value
    if value != "auto":
        return bool(value)
    if not (device.type == "cuda" and lora != "none" and micro_batch_tokens > CHECKPOINT_BUDGET):
        return True
    if not tower_trains or micro_batch_tokens <= tower_budget:
        return False
    return "vision" if tower_only else True


def card_bytes(device: torch.device) -> int:
    """Returns the memory of the CUDA card `device` in bytes; 0 for the CPU or where CUDA is not available."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return 0
    index = device.index if device.index is not None else torch.cuda.current_device()
    return torch.cuda.get_device_properties(index).total_memory


def tower_budget_on(
    device: torch.device,
    lora: str,
    tower_trains: bool,
    trained_tower_budget: int,
    card_gib: int = TOWER_CARD_GIB,
    max_parameters: int = 0,
    parameters: int | None = None,
) -> int:
    """Returns the micro-batch budget within which LoRA that trains the vision tower (`tower_trains`) keeps
    the tower's activations without checkpointing: the family's `trained_tower_budget` (a budget of
    language-model tokens that bounds the tower's patches too: MiniCPM-V-2's slices are 64 tokens and at most
    1,024 patches each) on a card of at least `card_gib` (the family's; TOWER_CARD_GIB unless it declares
    more) for a model of at most `max_parameters` (0: any; a family that declares a limit needs the model's
    `parameters` known); 0 (checkpointing) for full fine-tuning, whose state fills the card, smaller cards,
    larger models, the CPU and families that declare none."""
    if not (tower_trains and trained_tower_budget > 0 and lora != "none"):
        return 0
    if max_parameters and (parameters is None or parameters > max_parameters):
        return 0
    return trained_tower_budget if card_bytes(device) >= card_gib * 2**30 else 0


def lora_trains_tower(lora: Any) -> bool:
    """Returns whether the LoRA config `lora` (cfg.lora) trains weights of the vision tower: lora=all and
    full fine-tuning do (unless lora.freeze_vision); lora=qkv with its preset targets does not; custom
    target_modules are taken to (they may name the tower's modules)."""
    if lora.name == "none":
        return not lora.get("freeze_vision", False)
    return lora.name != "qkv" or bool(lora.get("target_modules"))
