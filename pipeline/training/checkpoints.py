"""Training checkpoints: written atomically, found again for resume, rotated, and pointed at by last/best.

A checkpoint folder `sft/checkpoint-N/` holds the weights (a PEFT adapter in safetensors, or the full
model in its family's own layout, written and read back by the family's writer and reader),
`optimizer.pt` / `scheduler.pt` / `rng_state.pt` (plain tensors and numbers, read back with
`weights_only=True`; `rng_state_<rank>.pt` for every further process), `trainer_state.json`, the run's
resolved `config.yaml` and `base_model.json` (no `optimizer.pt` where that config has
trainer.save_only_model). It is built under a temporary name and renamed into place, so a folder named
`checkpoint-N` is always complete.

One format whatever the engine: weights and optimizer state go through torch's distributed-checkpoint
state-dict API (`get_model_state_dict` / `set_model_state_dict` and the optimizer pair), which gathers
FSDP-sharded parameters and optimizer states into full tensors on rank 0 when saving and shards them again
when loading, and is a plain `state_dict()` for one process or DDP. So a checkpoint written by 4 FSDP
processes resumes on 1 process and merges like any other. Under several processes every rank calls
`save_training_checkpoint` / `load_training_checkpoint` (they are collective); only rank 0 writes weights.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import re
import shutil
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from peft import PeftModel, get_peft_model_state_dict
from safetensors.torch import load_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from pipeline.families.checkpoints import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    BASE_POINTER,
    CheckpointError,
    check_adapter_folder,
    read_json_file,
)
from pipeline.training.residual_lora import ResidualAdapter, residual_settings, trained_half
from pipeline.utils.io import file_mode
from pipeline.utils.secrets import redact_config

log = logging.getLogger(__name__)
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"
RUN_CONFIG = "config.yaml"  # the run's resolved config, in every checkpoint
# the base model's tokenizer and processor files, copied beside the weights when the writer left them out
TOKENIZER_FILES = (
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "preprocessor_config.json",
)

# The model family's full weights in its own layout (MiniCPM-V-2's official shards, a transformers model's
# save_pretrained): `write(model, folder, state_dict)` writes the gathered weights into the folder, and
# `read(folder)` returns a full checkpoint's weights under the model's own parameter names.
WriteFull = Callable[[nn.Module, Path, Mapping[str, torch.Tensor]], None]
ReadFull = Callable[[Path], dict[str, torch.Tensor]]


@dataclass
class TrainerState:
    global_step: int = 0
    # the best checkpoint's value of the metric named (trainer.metric_for_best_model as logged; None in
    # checkpoints older than the field: eval_loss)
    best_metric: float | None = None
    best_metric_name: str | None = None
    best_checkpoint: str | None = None
    tokens_seen: int = 0
    train_seconds: float = 0.0
    history: list[dict] = field(default_factory=list)  # eval results by step
    total_steps: int | None = None  # the steps its run planned (None in checkpoints older than this field)
    # the token budget trainer.micro_batch_tokens=auto halved to after running out of GPU memory (None: the
    # planned one), which a resumed run starts from
    micro_batch_tokens: int | None = None
    # early stopping (trainer.early_stopping_patience): the best value of that metric any evaluation reached,
    # how many evaluations since have not improved on it, and the step at which the run stopped for that (None:
    # it did not)
    patience_best: float | None = None
    evals_without_gain: int = 0
    stopped_early_at: int | None = None


def checkpoint_step(path: Path) -> int | None:
    m = CHECKPOINT_RE.match(path.name)
    return int(m.group(1)) if m else None


def list_checkpoints(sft_dir: Path) -> list[Path]:
    """Returns complete checkpoint folders, oldest first."""
    if not sft_dir.is_dir():
        return []
    found = [
        p
        for p in sft_dir.iterdir()
        if p.is_dir() and checkpoint_step(p) is not None and (p / STATE_FILE).is_file()
    ]
    return sorted(found, key=checkpoint_step)


def remove_partial_checkpoints(sft_dir: Path) -> None:
    """Removes the temporary folders of checkpoints whose writing an earlier process did not finish (killed
    mid-save); only the process that holds the run folder calls it."""
    for folder in sorted(sft_dir.glob(".tmp-checkpoint-*")):
        if folder.is_dir():
            shutil.rmtree(folder, ignore_errors=True)
            log.warning("removed %s: a checkpoint an earlier attempt did not finish writing", folder)


def _save_rng(path: Path) -> None:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    # Python's and numpy's states are tuples of plain numbers; convert to tensors for weights_only loading.
    py = state["python"]
    np_state = state["numpy"]
    torch.save(
        {
            "python_version": py[0],
            "python_state": torch.tensor(py[1], dtype=torch.int64),
            "python_gauss": py[2],
            "numpy_state": torch.from_numpy(np_state[1].astype(np.int64)),
            "numpy_pos": int(np_state[2]),
            "numpy_has_gauss": int(np_state[3]),
            "numpy_gauss": float(np_state[4]),
            "torch": state["torch"],
            "cuda": state["cuda"],
        },
        path,
    )


def restore_rng(path: Path) -> None:
    s = torch.load(path, weights_only=True)
    random.setstate((s["python_version"], tuple(s["python_state"].tolist()), s["python_gauss"]))
    np.random.set_state(
        (
            "MT19937",
            s["numpy_state"].numpy().astype(np.uint32),
            s["numpy_pos"],
            s["numpy_has_gauss"],
            s["numpy_gauss"],
        )
    )
    torch.set_rng_state(s["torch"])
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if _rank_world()[1] > 1:
        dist.barrier()


def rng_file(rank: int) -> str:
    return "rng_state.pt" if rank == 0 else f"rng_state_{rank}.pt"


def _gather_options(model) -> StateDictOptions:
    # LoRA: only the trainable weights are gathered (the frozen base is not saved anyway)
    return StateDictOptions(
        full_state_dict=True, cpu_offload=True, ignore_frozen_params=isinstance(model, PeftModel)
    )


def _frozen_tensors_of_saved_modules(model, weights: dict) -> dict[str, torch.Tensor]:
    """Returns the frozen tensors of a LoRA model's `modules_to_save` copies that `weights` lacks (the gather
    skips frozen parameters, and PEFT saves such a module whole: MiniCPM-V-2's resampler holds a frozen
    position table)."""
    if not isinstance(model, PeftModel):
        return {}
    return {
        name: tensor.detach().cpu()
        for name, tensor in model.state_dict().items()
        if ".modules_to_save." in name and name not in weights
    }


def _inner_optimizer(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the torch optimizer


def save_training_checkpoint(
    sft_dir: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    state: TrainerState,
    run_cfg: DictConfig,
    base_path: Path,
    *,
    write_full: WriteFull,
    engine=None,
    only_model: bool = False,
    residual: ResidualAdapter | None = None,
) -> Path:
    """Writes `sft_dir/checkpoint-<step>` atomically and returns it. Collective: every process calls it.
    `only_model` (trainer.save_only_model) leaves the optimizer's state out (see load_training_checkpoint).
    `residual`: the initial half of an adapter started from the base weights (lora.init_weights=pissa/olora);
    the adapter is then stored as a LoRA of twice the rank on the original base (residual_lora.py).

    A LoRA model's adapter goes in PEFT's layout; full weights in the model family's, through its
    `write_full(model, folder, state_dict)`.

    `model` is the unwrapped model (no DDP wrapper; FSDP-sharded parameters are fine). Under DeepSpeed,
    `engine` is its engine: the weights are gathered through it (ZeRO-3: partitions into whole tensors)
    and the optimizer state is its own sharded checkpoint in `deepspeed/`.
    """
    rank, _ = _rank_world()
    final = sft_dir / f"checkpoint-{state.global_step}"
    tmp = sft_dir / f".tmp-checkpoint-{state.global_step}"
    with _partial_removed_on_failure(sft_dir, tmp, final, rank):
        if rank == 0:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        _barrier()
        if engine is not None:
            weights, optim_state = _deepspeed_weights(engine, model), None
        else:
            weights = get_model_state_dict(model, options=_gather_options(model))
            weights.update(_frozen_tensors_of_saved_modules(model, weights))
            optim_state = (
                None
                if only_model
                else get_optimizer_state_dict(
                    model, _inner_optimizer(optimizer), options=_gather_options(model)
                )
            )
        if rank == 0:
            if isinstance(model, PeftModel):
                model.save_pretrained(str(tmp), safe_serialization=True, state_dict=weights)
                if residual is not None:
                    residual.convert(tmp)
            else:
                write_full(model, tmp, weights)
            if optim_state is not None:
                torch.save(optim_state, tmp / "optimizer.pt")
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            (tmp / STATE_FILE).write_text(json.dumps(asdict(state), indent=2) + "\n")
            (tmp / RUN_CONFIG).write_text(OmegaConf.to_yaml(redact_config(run_cfg), resolve=True))
            (tmp / BASE_POINTER).write_text(json.dumps({"base_model_path": str(base_path.resolve())}) + "\n")
            for name in TOKENIZER_FILES:
                if (base_path / name).is_file() and not (tmp / name).exists():
                    shutil.copyfile(base_path / name, tmp / name)  # a new file: mode from the umask
        del weights, optim_state
        _barrier()  # the full model's writer replaces the folder: each rank's files go in after it
        _save_rng(tmp / rng_file(rank))
        if engine is not None and not only_model:
            engine.save_checkpoint(
                str(tmp / DEEPSPEED_DIR), tag=DEEPSPEED_TAG, exclude_frozen_parameters=True
            )
        _barrier()
        if rank == 0:
            mode = file_mode()
            for f in tmp.rglob("*"):
                if f.is_file():
                    # safetensors writes 0600 whatever the umask; every file gets the mode open() would give
                    os.chmod(f, mode)
                    with open(f, "rb") as fh:
                        os.fsync(fh.fileno())
            if final.exists():  # an earlier, interrupted run reached the same step: replace it
                shutil.rmtree(final)
            tmp.rename(final)
    _barrier()
    return final


DEEPSPEED_DIR, DEEPSPEED_TAG = "deepspeed", "state"


@contextlib.contextmanager
def _partial_removed_on_failure(sft_dir: Path, tmp: Path, final: Path, rank: int) -> Iterator[None]:
    """Around a checkpoint's write: where it fails, the partial folder `tmp` goes (it would only take the
    disk's space; the earlier checkpoints stay) and CheckpointWriteError says what failed and where to resume
    from; after an interrupt the folder goes too and the interrupt is raised as it is."""
    try:
        yield
    except BaseException as exc:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        if not isinstance(exc, Exception):  # an interrupt: stop as asked
            raise
        raise CheckpointWriteError(_write_failure(sft_dir, final, exc)) from exc


class CheckpointWriteError(OSError):
    """A training checkpoint could not be written (a full disk, say): its partial folder is removed, the
    earlier checkpoints are kept, and the message names the folder, the cause and where to resume."""


def _write_failure(sft_dir: Path, final: Path, exc: Exception) -> str:
    """Returns the message of a checkpoint that could not be written: what failed and why, the space left
    on the disk, and the newest complete checkpoint a rerun resumes from."""
    reason = f"{type(exc).__name__}: {str(exc).strip()}".rstrip(": ")
    try:
        free = f"; {shutil.disk_usage(sft_dir).free / 1e9:.1f} GB are free on its disk"
    except OSError:
        free = ""
    earlier = [ckpt for ckpt in list_checkpoints(sft_dir) if ckpt != final]
    if earlier:
        resume = (
            f"the newest complete checkpoint, {earlier[-1]}, is kept: make room (or save less often: "
            "trainer.save_steps, trainer.save_total_limit) and rerun the same command into the same run folder "
            "to resume from it"
        )
    else:
        resume = "no earlier checkpoint of this run exists"
    return f"{final}: the checkpoint could not be written ({reason}); its partial folder was removed{free}. {resume}"


def _deepspeed_weights(engine, model) -> dict[str, torch.Tensor]:
    """The whole weights on rank 0: ZeRO-3 gathers its partitions (collectively); ZeRO-2 keeps whole
    weights on every rank, read like any unsharded model's."""
    if not engine.zero_optimization_partition_weights():
        return get_model_state_dict(model, options=_gather_options(model))
    weights = engine._zero3_consolidated_16bit_state_dict(
        exclude_frozen_parameters=isinstance(model, PeftModel)
    )
    return {n: p.detach().cpu() for n, p in (weights or {}).items()}


def adapter_to_model_keys(model: PeftModel, adapter: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Returns a saved adapter's tensors under the model's own parameter names.

    PEFT saves LoRA weights without the adapter name (and modules_to_save under their module's name); the
    inverse is read off PEFT's own mapping, run on numbered placeholders of every parameter name.
    """
    names = [n for n, _ in model.named_parameters()]
    labels = {n: torch.tensor([i]) for i, n in enumerate(names)}
    saved_as = get_peft_model_state_dict(model, state_dict=labels, save_embedding_layers=False)
    to_model = {key: names[int(label)] for key, label in saved_as.items()}
    unknown = sorted(set(adapter) - set(to_model))
    if unknown:
        raise ValueError(f"adapter has keys this model lacks, first: {unknown[:5]}")
    return {to_model[k]: v for k, v in adapter.items()}


def load_training_checkpoint(
    ckpt: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    *,
    read_full: ReadFull,
    engine=None,
) -> TrainerState:
    """Restores weights, optimizer, scheduler and RNG from a checkpoint; returns its trainer state.

    A LoRA model's adapter is read from PEFT's layout; full weights by the model family's
    `read_full(folder)` (the layout its `write_full` wrote), under the model's own parameter names.

    Collective under several processes: rank 0 reads the weights and optimizer state and broadcasts them,
    each process keeps its shard (FSDP) or a copy (DDP), and restores its own RNG file.

    A checkpoint written with trainer.save_only_model holds no optimizer state: the optimizer keeps the
    zero moments of its start, with a warning, and DeepSpeed cannot resume from it (its engine restores
    weights and optimizer together).
    """
    rank, world = _rank_world()
    check_same_tuning(ckpt, model)
    only_model = written_without_optimizer(ckpt)
    if only_model:
        log.warning(
            "%s holds no optimizer state (trainer.save_only_model=true): training resumes from its weights, "
            "step, schedule and data order, with the optimizer's moments starting again from zero",
            ckpt,
        )
    if engine is not None:
        if only_model:
            raise CheckpointError(
                f"{ckpt}: written with trainer.save_only_model=true, it holds no DeepSpeed state to resume "
                f"from; start anew from its weights (model.path, or trainer.resume=never)"
            )
        _load_deepspeed(ckpt, engine, world)
    else:
        _load_weights_and_optimizer(ckpt, model, optimizer, rank, world > 1, read_full, not only_model)
    scheduler.load_state_dict(_torch_file(ckpt / "scheduler.pt", "the learning-rate schedule's state"))
    own = ckpt / rng_file(rank)
    rng = own if own.is_file() else ckpt / rng_file(0)
    try:
        restore_rng(rng)
    except Exception as err:
        raise CheckpointError(f"{rng}: cannot restore the random-number state ({_why(err)})") from err
    return read_trainer_state(ckpt)


def load_adapter_weights(ckpt: Path, model: PeftModel) -> None:
    """Loads an adapter checkpoint's weights (no optimizer state) into the model's own adapter of the same
    settings: training goes on from them (dpo from an sft adapter). Refuses other LoRA settings, naming them.
    An adapter started from the base weights is read as what its checkpoint stores: a LoRA of twice its
    training rank on the original base."""
    check_same_tuning(ckpt, model, resuming=False)
    weights = adapter_to_model_keys(model, load_file(str(ckpt / ADAPTER_WEIGHTS)))
    own = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in weights.items():
            own[name].copy_(value.to(own[name].dtype))


def _why(err: Exception) -> str:
    """Return the error's type and first line."""
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


def _torch_file(path: Path, what: str):
    """Return the contents of a torch.save file; a missing or damaged one is a CheckpointError naming it."""
    if not path.is_file():
        raise CheckpointError(f"{path} is missing ({what}); the checkpoint is incomplete")
    try:
        return torch.load(path, weights_only=True)
    except Exception as err:
        raise CheckpointError(
            f"{path}: cannot be read ({_why(err)}); the file is damaged (an interrupted copy or write?)"
        ) from err


def read_trainer_state(ckpt: Path) -> TrainerState:
    """Return the trainer state in `ckpt`/trainer_state.json; raise CheckpointError naming what is wrong."""
    data = read_json_file(ckpt / STATE_FILE, "the trainer's step and history")
    try:
        return TrainerState(**data)
    except TypeError as err:
        raise CheckpointError(f"{ckpt / STATE_FILE}: unexpected content ({err})") from None


def check_resume_plan(ckpt: Path, total_steps: int) -> None:
    """Raise CheckpointError when `ckpt` ends a finished run and the config plans more steps than it had.

    The learning-rate schedule is a function of the planned steps: a finished run's has decayed to its end
    (0 for cosine and linear), and a longer plan would pick it up mid-way on another curve, so that is
    refused. A run stopped before its end that resumes with another plan is told in a warning what happens.
    """
    state = read_trainer_state(ckpt)
    planned, step = state.total_steps, state.global_step
    if planned is None or planned == total_steps:
        return
    if step >= planned and total_steps > step:
        raise CheckpointError(
            f"{ckpt} ends a finished run of {planned} steps, whose learning-rate schedule has decayed to its "
            f"end; this config plans {total_steps} steps, and resuming would continue at step {step + 1} "
            f"on the schedule of a {total_steps}-step run (a jump back up). To train for {total_steps} steps, "
            "start a new run (another run folder, or trainer.resume=never); to keep this run, resume it with "
            f"its own settings (trainer.max_steps={planned}, see its config.yaml)"
        )
    log.warning(
        "%s was saved by a run planned for %d steps; this config plans %d: training continues at step %d on "
        "the learning-rate schedule of a %d-step run",
        ckpt,
        planned,
        total_steps,
        step + 1,
        total_steps,
    )


def check_same_tuning(ckpt: Path, model, resuming: bool = True) -> None:
    """Raise CheckpointError when the checkpoint was trained with other tuning settings than `model` has.

    A LoRA checkpoint must match the config's rank, alpha, targets and fully trained modules, and a full
    fine-tuning checkpoint needs lora=none; the message names the setting, the checkpoint's value and the
    config's.
    """
    if not isinstance(model, PeftModel):
        check_tuning_settings(ckpt, None)
        return
    current = model.peft_config["default"]
    check_tuning_settings(
        ckpt,
        {
            "r": current.r,
            "lora_alpha": current.lora_alpha,
            "use_dora": current.use_dora,
            "use_rslora": current.use_rslora,
        },
        {"target_modules": current.target_modules, "modules_to_save": current.modules_to_save},
        resuming,
    )


def check_tuning_settings(
    ckpt: Path, lora: dict | None, modules: dict | None = None, resuming: bool = True
) -> None:
    """Raise CheckpointError when `ckpt` was trained with other settings than these (no model needed).

    `lora` holds the config's {"r", "lora_alpha", "use_dora", "use_rslora"} (None: full fine-tuning);
    `modules`, when known, the
    PEFT config's {"target_modules", "modules_to_save"}.
    """
    is_adapter = (ckpt / ADAPTER_CONFIG).is_file()
    if lora is None:
        if is_adapter:
            raise CheckpointError(
                f"{ckpt} is a LoRA checkpoint, the config asks for full fine-tuning (lora=none); resume with "
                "the run's lora settings, or start anew (trainer.resume=never or another run folder)"
            )
        return
    if not is_adapter:
        raise CheckpointError(
            f"{ckpt}: no {ADAPTER_CONFIG}, so a full fine-tuning checkpoint (lora=none), and the config asks "
            "for LoRA; resume with lora=none, or start anew (trainer.resume=never or another run folder)"
        )
    saved = check_adapter_folder(ckpt)
    residual = residual_settings(ckpt)
    if resuming:  # a residual adapter trains at the rank it records, and its checkpoints store twice that
        saved = {**saved, **(residual or {}), "residual": residual is not None}
    differences = []
    if "residual" in lora and lora["residual"] != saved.get("residual", False):
        kind = {True: "from the base weights (pissa/olora)", False: "as a plain LoRA"}
        differences.append(
            f"the checkpoint's adapter started {kind[bool(saved.get('residual'))]}, the config's starts "
            f"{kind[bool(lora['residual'])]} (lora.init_weights)"
        )
    for key, label in (
        ("r", "lora.r"),
        ("lora_alpha", "lora.alpha"),
        ("use_dora", "lora.use_dora"),
        ("use_rslora", "lora.use_rslora"),
    ):
        short = key.replace("lora_", "")
        if key in saved and key in lora and saved[key] != lora[key]:
            differences.append(
                f"the checkpoint has {short}={saved[key]}, the config asks {short}={lora[key]} ({label})"
            )
    for key, label in (
        ("target_modules", "lora.name / lora.target_modules"),
        ("modules_to_save", "lora.modules_to_save"),
    ):
        if modules is not None and key in saved and _as_set(saved[key]) != _as_set(modules[key]):
            differences.append(f"the checkpoint's {key} differ from the config's ({label})")
    if differences:
        raise CheckpointError(
            f"cannot resume from {ckpt}: " + "; ".join(differences) + ". Resume with the run's settings "
            "(they are in its config.yaml), or start anew (trainer.resume=never or another run folder)"
        )


def _as_set(value) -> set | str | None:
    if value is None or isinstance(value, str):
        return value
    return set(value)


def _load_deepspeed(ckpt: Path, engine, world: int) -> None:
    folder = ckpt / DEEPSPEED_DIR
    if not (folder / DEEPSPEED_TAG).is_dir():
        raise FileNotFoundError(
            f"{ckpt}: no DeepSpeed state ({DEEPSPEED_DIR}/{DEEPSPEED_TAG}); a checkpoint written without "
            f"DeepSpeed resumes without it (or start anew with trainer.resume=never)"
        )
    saved = len(list((folder / DEEPSPEED_TAG).glob("*optim_states.pt")))
    if saved != world:
        raise ValueError(
            f"{folder / DEEPSPEED_TAG}: DeepSpeed state of {saved} processes, this run has {world}; resume "
            f"with --num_processes {saved}, or start anew from its weights (model.path / trainer.resume=never)"
        )
    path, _ = engine.load_checkpoint(
        str(folder), tag=DEEPSPEED_TAG, load_module_strict=False, load_lr_scheduler_states=False
    )
    if path is None:
        raise RuntimeError(f"{folder}: DeepSpeed could not load this state (another number of processes?)")
    if engine.zero_optimization_partition_weights():
        # loading leaves some ZeRO-3 weights gathered on some ranks only; release them all, so that every
        # rank starts the next step from the same state (ZeRO-3 checks that the ranks fetch alike)
        engine.empty_partition_cache()


def written_without_optimizer(ckpt: Path) -> bool:
    """Returns whether the checkpoint was written with trainer.save_only_model (its config.yaml says so): it
    has no optimizer state by design, where a missing optimizer.pt otherwise is a damaged checkpoint."""
    try:
        saved = OmegaConf.load(ckpt / RUN_CONFIG)
    except Exception:  # an older or damaged checkpoint: its optimizer state is expected, and read as such
        return False
    return bool(OmegaConf.select(saved, "trainer.save_only_model", default=False))


def _load_weights_and_optimizer(
    ckpt: Path, model, optimizer, rank: int, spread: bool, read_full: ReadFull, with_optimizer: bool = True
) -> None:
    weights: dict[str, torch.Tensor] = {}
    strict = not isinstance(model, PeftModel)
    if isinstance(model, PeftModel):
        adapter = ckpt / ADAPTER_WEIGHTS  # whole and matching the config: check_same_tuning
        if rank == 0 or not spread:  # a residual adapter's trained half (residual_lora.py)
            weights = adapter_to_model_keys(model, trained_half(ckpt, load_file(str(adapter))))
    elif rank == 0 or not spread:
        weights = read_full(ckpt)
    set_model_state_dict(
        model,
        weights,
        options=StateDictOptions(full_state_dict=True, strict=strict, broadcast_from_rank0=spread),
    )
    if not with_optimizer:
        return
    optim_state = (
        _torch_file(ckpt / "optimizer.pt", "the optimizer's state") if rank == 0 or not spread else {}
    )
    set_optimizer_state_dict(
        model,
        _inner_optimizer(optimizer),
        optim_state,
        options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=spread),
    )


def rotate_checkpoints(sft_dir: Path, keep: int | None, protect: set[str]) -> list[Path]:
    """Deletes the oldest checkpoints beyond `keep` (never a protected name); returns what was deleted."""
    if keep is None or keep <= 0:
        return []
    ckpts = list_checkpoints(sft_dir)
    removable = [p for p in ckpts if p.name not in protect]
    excess = len(ckpts) - keep
    deleted = []
    for path in removable[: max(excess, 0)]:
        shutil.rmtree(path)
        deleted.append(path)
    return deleted


def point(link: Path, target: Path) -> None:
    """Makes `link` a relative symlink to `target`, replacing any earlier one atomically."""
    tmp = link.with_name(f".{link.name}.tmp")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(os.path.relpath(target, link.parent))
    os.replace(tmp, link)
