"""Loading what a stage works with: the model (base, adapter or merged checkpoint), its tokenizer and processor."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel

from .checkpoint import ADAPTER_CONFIG, CheckpointError, check_adapter_folder, load_model, resolve_model_path
from .modeling import MiniCPMV
from .processor import MiniCPMVImageProcessor
from .tokenizer import MiniCPMVTokenizer

log = logging.getLogger(__name__)

BASE_POINTER = "base_model.json"  # written into every checkpoint: which base folder it was trained on


@dataclass
class ModelBundle:
    model: MiniCPMV | PeftModel
    tokenizer: MiniCPMVTokenizer
    processor: MiniCPMVImageProcessor
    base_path: Path  # the base model folder (tokenizer and processor come from here or the checkpoint)
    kind: str  # "base" | "adapter" | "full"

    @property
    def core(self) -> MiniCPMV:
        """Returns the MiniCPMV module under any PEFT wrapper."""
        model = self.model
        return model.get_base_model() if isinstance(model, PeftModel) else model


def checkpoint_kind(path: Path) -> str:
    """Returns "adapter" for a PEFT folder, "full" for a model folder; raises for anything else."""
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if (path / ADAPTER_CONFIG).is_file():
        return "adapter"
    if (path / "config.json").is_file():
        return "full"
    raise CheckpointError(
        f"{path} is neither a LoRA checkpoint ({ADAPTER_CONFIG}) nor a model folder (config.json)"
    )


def base_model_path(model_path: str, allow_download: bool) -> Path:
    """Returns the local base model folder (absolute), downloading a hub id only when allowed."""
    return resolve_model_path(model_path, allow_download).absolute()


def _adapter_base(ckpt: Path, fallback: Path) -> Path:
    pointer = ckpt / BASE_POINTER
    if pointer.is_file():
        recorded = Path(json.loads(pointer.read_text())["base_model_path"])
        if recorded.is_dir():
            return recorded
        log.warning("base model %s recorded in %s is gone; using %s", recorded, pointer, fallback)
    return fallback


def load_bundle(
    model_path: str,
    *,
    ckpt: str | Path | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    allow_download: bool = False,
    max_slice_nums: int | None = None,
    slice_mode: bool | None = None,
    trainable_adapter: bool = False,
) -> ModelBundle:
    """Returns the model (base, or base + adapter, or a full checkpoint) with its tokenizer and processor."""
    base = base_model_path(model_path, allow_download)
    kind = "base"
    source = base
    if ckpt is not None:
        ckpt = Path(ckpt)
        kind = checkpoint_kind(ckpt)
        if kind == "full":
            source = ckpt
        else:
            check_adapter_folder(ckpt)  # whole files, before any weight loads
            base = source = _adapter_base(ckpt, base)
    model = load_model(source, dtype=dtype, device=device)
    if kind == "adapter":
        try:
            model = PeftModel.from_pretrained(model, str(ckpt), is_trainable=trainable_adapter)
        except RuntimeError as err:  # size mismatch: an adapter of another base model
            raise CheckpointError(f"adapter {ckpt} does not fit base model {base}: {err}") from err
        model.to(device)
    tok_folder = source if (source / "tokenizer.model").is_file() else base
    tokenizer = MiniCPMVTokenizer.from_pretrained(tok_folder)
    overrides = {}
    if max_slice_nums is not None:
        overrides["max_slice_nums"] = max_slice_nums
    if slice_mode is not None:
        overrides["slice_mode"] = slice_mode
    processor = MiniCPMVImageProcessor.from_pretrained(tok_folder, **overrides)
    return ModelBundle(model=model, tokenizer=tokenizer, processor=processor, base_path=base, kind=kind)
