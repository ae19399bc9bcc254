"""Loading what a stage works with: the model (base, adapter or merged checkpoint), its tokenizer and processor."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from pipeline.families.base import peft_base
from pipeline.families.checkpoints import CheckpointError, adapter_base, check_adapter_folder, checkpoint_kind

from .checkpoint import load_model, resolve_model_path
from .modeling import MiniCPMV
from .processor import MiniCPMVImageProcessor
from .tokenizer import MiniCPMVTokenizer

if TYPE_CHECKING:
    from peft import PeftModel

log = logging.getLogger(__name__)


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
        return peft_base(self.model)


def base_model_path(model_path: str, allow_download: bool) -> Path:
    """Returns the local base model folder (absolute), downloading a hub id only when allowed."""
    return resolve_model_path(model_path, allow_download).absolute()


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
            base = source = adapter_base(ckpt, base)
    model = load_model(source, dtype=dtype, device=device)
    if kind == "adapter":
        from peft import PeftModel

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
