"""merge: fold a LoRA checkpoint into its base model and write a standalone checkpoint in the official layout.

    python -m pipeline stages=[merge] ckpt=outputs/<exp>/<time>/sft/checkpoint-40

Like `swift export --merge_lora true`, the result goes to `<ckpt>-merged` (or merge.output) and loads like
the base model: model.path=<ckpt>-merged. Reads: ckpt, model, dataset, merge, seed. The merge runs on
merge.device (cpu by default, so a model that does not fit the GPU still merges) in the base checkpoint's
dtype. The written folder is reloaded and its logits are compared with the adapter model's on
merge.verify_samples held-out rows; the stage fails when they differ by more than the dtype allows.
Writes run_dir/merge/merge_info.json. Returns {"merged": output folder}.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from pipeline.config import BASE_CKPT, DTYPE_NAMES, dtype_named, resolve_device
from pipeline.data.images import ImageFiles
from pipeline.data.prepare import prepare_splits
from pipeline.families import family_from_config, image_limit, video_limit
from pipeline.families.base import Bundle, Family, FamilyError
from pipeline.families.checkpoints import (
    BASE_POINTER,
    MODEL_CONFIG,
    CheckpointError,
    checkpoint_kind,
    parse_size,
)
from pipeline.stages.state import RunState
from pipeline.utils.io import atomic_write_json

log = logging.getLogger(__name__)

INFO_FILE = "merge_info.json"
# Largest allowed |merged - adapter| logit, relative to the largest |logit| (at least 1). In fp32 only the
# summation order differs; in 16-bit the merged weight W + BA is rounded once to the weight dtype, while the
# adapter model adds BA's output to the rounded W x, so a few ulps of the logits scale separate them.
RELATIVE_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}


class MergeError(RuntimeError):
    """The merge cannot run or produced a checkpoint that does not match its adapter model."""


def checkpoint_to_merge(cfg: DictConfig, state: RunState) -> Path:
    """Returns the LoRA checkpoint folder to merge: this run's sft result, else cfg.ckpt; refuses others."""
    ckpt = state.weights_for("merge", cfg)
    if ckpt is None and state.ckpt_set:
        raise MergeError(
            "merge has no adapter to merge: this run's sft saved no checkpoint (lower "
            f"trainer.save_steps) or ckpt={BASE_CKPT} was given; set ckpt=<run>/sft/checkpoint-N"
        )
    if ckpt is None:
        raise MergeError(
            f"merge needs a LoRA checkpoint but ckpt={cfg.ckpt if cfg.ckpt else 'null'}; "
            "set ckpt=<run>/sft/checkpoint-N (or an earlier run folder)"
        )
    ckpt = Path(ckpt)
    if not ckpt.exists():
        raise FileNotFoundError(
            f"checkpoint {ckpt} does not exist; give a LoRA checkpoint folder or a run folder"
        )
    if checkpoint_kind(ckpt) == "full":
        shards = family_from_config(cfg.model).weight_files(ckpt)
        raise MergeError(
            f"{ckpt} is a full fine-tuning checkpoint: it has no adapter to merge and is already a "
            f"standalone model in the official layout (weights in {ckpt}/{{{', '.join(shards)}}}); load "
            f"it with model.path={ckpt}, and drop merge from stages"
        )
    return ckpt


def adapter_base_folder(cfg: DictConfig, ckpt: Path, model_path: str) -> Path:
    """Returns the base model folder the adapter was trained on: its base_model.json, else model.path."""
    pointer = ckpt / BASE_POINTER
    if pointer.is_file():
        recorded = Path(json.loads(pointer.read_text(encoding="utf-8"))["base_model_path"])
        if (recorded / MODEL_CONFIG).is_file():
            return recorded
        log.warning(
            "base model %s recorded in %s is gone; using model.path=%s", recorded, pointer, model_path
        )
    return family_from_config(cfg.model).base_folder(model_path, cfg.model.trust_hub)


def checkpoint_dtype(folder: Path) -> torch.dtype:
    """Returns the dtype a checkpoint folder's config.json records (torch_dtype or dtype); float32 if none."""
    config = json.loads((folder / MODEL_CONFIG).read_text(encoding="utf-8"))
    name = config.get("torch_dtype") or config.get("dtype") or "float32"
    name = str(name).replace("torch.", "")
    if name not in DTYPE_NAMES:
        raise MergeError(
            f"{folder / MODEL_CONFIG}: torch_dtype={name} is not one of {', '.join(DTYPE_NAMES)}"
        )
    return dtype_named(name)


def output_folder(cfg: DictConfig, ckpt: Path, base: Path) -> Path:
    """Returns where the merged checkpoint goes: merge.output, else `<ckpt>-merged`; never over its inputs."""
    out = Path(cfg.merge.output).expanduser() if cfg.merge.output else ckpt.with_name(f"{ckpt.name}-merged")
    resolved = out.resolve()
    for name, folder in (("the adapter checkpoint", ckpt), ("the base model", base)):
        if resolved == folder.resolve():
            raise MergeError(f"merge.output={out} is {name}; choose another folder (it would be overwritten)")
    if out.is_file() or (out.is_dir() and any(out.iterdir()) and not (out / MODEL_CONFIG).is_file()):
        raise MergeError(
            f"merge.output={out} exists and is not a model folder; choose an empty or new folder "
            "(an earlier merge result there would be replaced)"
        )
    return out


def verification_samples(
    cfg: DictConfig, family: Family, bundle: Bundle, n: int, problems_path: Path
) -> tuple[list[Any], str]:
    """Returns up to `n` held-out samples and "held-out", or generated ones and "dummy" without data."""
    images = ImageFiles()
    try:
        splits = prepare_splits(
            cfg.dataset,
            cfg.seed,
            family.token_counter(bundle, cfg.dataset.max_length, cfg.dataset.truncation, images),
            image_limit(cfg.model),
            problems_path=problems_path,
            video_limit=video_limit(cfg.model),
        )
        rows = (splits.val or splits.train)[:n]
    except (OSError, ValueError) as err:  # a missing or broken data set: the merge itself does not need it
        log.warning("merge: held-out rows unavailable (%s); checking on %d generated inputs", err, n)
        rows = []
    if rows:
        dataset = family.dataset(bundle, rows, cfg.dataset.max_length, cfg.dataset.truncation, images)
        return [dataset[i] for i in range(len(dataset))], "held-out"
    return family.dummy_samples(bundle, n, cfg.seed), "dummy"


@torch.inference_mode()
def sample_logits(
    model: torch.nn.Module,
    samples: list[Any],
    desc: str,
    logits_of: Callable[[torch.nn.Module, Any], torch.Tensor],
) -> list[torch.Tensor]:
    """Returns each sample's fp32 logits [T, vocab] on the CPU, one sample per forward (no padding).

    `logits_of(model, sample)` is the model family's forward (Family.logits_fn)."""
    return [logits_of(model, sample) for sample in tqdm(samples, desc=desc, unit="sample", leave=False)]


def compare_logits(reference: list[torch.Tensor], merged: list[torch.Tensor]) -> tuple[float, float]:
    """Returns (max |merged - reference|, max |reference|) over all samples."""
    diff = max((float((m - r).abs().max()) for r, m in zip(reference, merged, strict=True)), default=0.0)
    scale = max((float(r.abs().max()) for r in reference), default=0.0)
    return diff, scale


def run(cfg: DictConfig, run_dir: Path, state: RunState) -> dict:
    """Returns {"merged": the standalone checkpoint folder} after merging, writing and verifying it."""
    merge_dir = Path(run_dir) / "merge"
    merge_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    # ----- setup: which adapter, which base, where to, in which dtype
    ckpt = checkpoint_to_merge(cfg, state)
    base = adapter_base_folder(cfg, ckpt, state.model_path)
    out = output_folder(cfg, ckpt, base)
    dtype = checkpoint_dtype(base)
    device = resolve_device(str(cfg.merge.device))
    shard_bytes = parse_size(cfg.merge.shard_size)
    log.info(
        "merge: adapter %s onto base %s (%s, on %s) -> %s",
        ckpt,
        base,
        str(dtype).replace("torch.", ""),
        device,
        out,
    )
    family = family_from_config(cfg.model)
    try:
        bundle = family.load_bundle(str(base), ckpt, dtype=dtype, device=device)
    except (CheckpointError, FamilyError) as err:
        raise MergeError(f"cannot load adapter {ckpt} onto base {base}: {err}") from err
    model = bundle.model.eval()

    # ----- reference logits of the adapter model, before the merge changes its weights in place
    n = int(cfg.merge.verify_samples)
    samples, inputs = [], ""
    if n:
        samples, inputs = verification_samples(cfg, family, bundle, n, merge_dir / "dataset_problems.jsonl")
    logits_of = family.logits_fn(bundle, device)  # holds what encodes, not the model
    reference = sample_logits(model, samples, "adapter logits", logits_of)

    # ----- merge and write
    merged = model.merge_and_unload(progressbar=True, safe_merge=True)
    try:
        family.check_merged(merged, base)
    except FamilyError as err:
        raise MergeError(str(err)) from err
    family.save_merged(merged, bundle, out, shard_bytes, dtype, base)
    del model, merged, bundle  # the reloaded copy below must not sit beside a second full model
    if device.type == "cuda":
        torch.cuda.empty_cache()

    # ----- verify: the folder on disk reproduces the adapter model's logits
    diff = scale = None
    tolerance = None
    if samples:
        reloaded = family.load_merged(out, dtype, device)
        merged_logits = sample_logits(reloaded, samples, "merged logits", logits_of)
        diff, scale = compare_logits(reference, merged_logits)
        tolerance = RELATIVE_TOLERANCE[dtype] * max(scale, 1.0)
        del reloaded
    else:
        log.warning("merge: merge.verify_samples=0, the merged checkpoint is not compared with the adapter")
    info = {
        "adapter": str(ckpt),
        "base": str(base),
        "output": str(out.resolve()),
        "dtype": str(dtype).replace("torch.", ""),
        "device": str(device),
        "shard_size": str(cfg.merge.shard_size),
        "shards": family.weight_files(out),
        "verify_inputs": inputs or None,
        "verify_samples": len(samples),
        "max_abs_logits_diff": diff,
        "logits_scale": scale,
        "tolerance": tolerance,
        "verified": None if diff is None else diff <= tolerance,
        "seconds": round(time.perf_counter() - started, 2),
    }
    atomic_write_json(merge_dir / INFO_FILE, info)
    if diff is not None:
        print(
            f"merge: max |logits(merged) - logits(adapter)| = {diff:.3g} over {len(samples)} {inputs} "
            f"sample(s) (logits scale {scale:.3g}, tolerance {tolerance:.3g})"
        )
        if diff > tolerance:
            raise MergeError(
                f"merged checkpoint {out} does not reproduce adapter {ckpt}: max logits difference "
                f"{diff:.3g} exceeds {tolerance:.3g} ({dtype}); the folder is kept for inspection, details "
                f"in {merge_dir / INFO_FILE}"
            )
    log.info("merge: standalone checkpoint written to %s", out)
    return {"merged": out.resolve()}
