"""MiniCPM-V-2: the project's own implementation (pipeline/families/minicpm_v2/) behind the family interface.

Nothing here re-implements the model: loading is `load_bundle`, encoding is `encode_example` (the
`minicpm-v` template of pipeline/families/minicpm_v2/template.py, token ids equal to ms-swift's), batching is
pipeline/families/minicpm_v2/collate.py, the LoRA presets and freeze switches are pipeline/families/minicpm_v2/lora.py, saving is the
official layout of pipeline/families/minicpm_v2/checkpoint.py and the twin is pipeline/families/minicpm_v2/tiny.py. This module only
maps the interface's conversation onto the template's (query, response, history, system, image) form.

Rules the template sets: one image per conversation, placed at the start of the first user message.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel
from PIL import Image
from torch import nn

from pipeline.families.base import IMAGE_TAG, EncodedSample, Family, FamilyError, FreezeGroups, Message
from pipeline.families.minicpm_v2.bundle import load_bundle
from pipeline.families.minicpm_v2.checkpoint import read_weights, resolve_model_path, save_checkpoint
from pipeline.families.minicpm_v2.collate import (
    Sample,
    collate_for_generation,
    collate_for_training,
    encode_example,
)
from pipeline.families.minicpm_v2.generation import GenerationSettings, generate
from pipeline.families.minicpm_v2.lora import apply_lora, build_lora_config, set_full_finetune
from pipeline.families.minicpm_v2.processor import MiniCPMVImageProcessor
from pipeline.families.minicpm_v2.tiny import build_tiny_twin
from pipeline.families.minicpm_v2.tokenizer import MiniCPMVTokenizer

# The official checkpoint's two-shard layout (the LLM in one shard, vision and resampler in the other).
SHARD_BYTES = 10 * 1000**3


@dataclass
class MiniCPMV2Processor:
    """What encodes for MiniCPM-V-2: its tokenizer, its image processor, and the folder they came from."""

    tokenizer: MiniCPMVTokenizer
    image_processor: MiniCPMVImageProcessor
    folder: Path  # side files (tokenizer, preprocessor config) are copied from here on save

    def save_pretrained(self, folder: str | Path) -> None:
        self.tokenizer.save_pretrained(folder)
        self.image_processor.save_pretrained(folder)


class MiniCPMV2(Family):
    name = "minicpm_v2"
    max_images = 1
    max_length = 2048
    setting_keys = ("max_slice_nums", "slice_mode")

    def resolve(self, path: str, allow_download: bool = False) -> Path:
        return resolve_model_path(path, allow_download)

    def load(
        self, path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
    ) -> tuple[nn.Module, MiniCPMV2Processor]:
        bundle = load_bundle(str(path), dtype=dtype, device=device, **self.settings)
        return bundle.model, MiniCPMV2Processor(bundle.tokenizer, bundle.processor, Path(path))

    def _rounds(self, messages: Sequence[Message]) -> tuple[str | None, list[tuple[str, str | None]]]:
        """Returns the system text and the (query, response) rounds; a trailing query has response None."""
        system = messages[0]["content"] if messages[0]["role"] == "system" else None
        turns = [m for m in messages if m["role"] != "system"]
        rounds = []
        for k in range(0, len(turns), 2):
            reply = turns[k + 1]["content"] if k + 1 < len(turns) else None
            rounds.append((turns[k]["content"], reply))
        return system, rounds

    def encode(
        self,
        processor: MiniCPMV2Processor,
        conversation: Sequence[Message],
        images: Sequence[Image.Image] = (),
        generation: bool = False,
    ) -> EncodedSample:
        messages = self.prepare_messages(conversation, images, generation)
        system, rounds = self._rounds(messages)
        first_query = rounds[0][0]
        if images:
            if not first_query.startswith(IMAGE_TAG):
                raise FamilyError(f"{self.name}: the image goes at the start of the first user message")
            rounds[0] = (first_query[len(IMAGE_TAG) :], rounds[0][1])
        query, response = rounds[-1]
        sample = encode_example(
            processor.tokenizer,
            processor.image_processor,
            query,
            response,
            history=rounds[:-1],
            system=system,
            image=images[0] if images else None,
            max_length=self.max_length,
        )
        if sample is None:
            raise FamilyError(f"{self.name}: the conversation is longer than {self.limits().describe()}")
        return EncodedSample(
            input_ids=sample.input_ids,
            labels=sample.labels,
            pixel_inputs={"pixel_values": sample.pixel_values, "image_bound": sample.image_bound},
        )

    @staticmethod
    def _samples(samples: Sequence[EncodedSample]) -> list[Sample]:
        return [
            Sample(
                s.input_ids,
                s.labels,
                list(s.pixel_inputs["image_bound"]),
                list(s.pixel_inputs["pixel_values"]),
            )
            for s in samples
        ]

    def collate_for_training(self, processor: MiniCPMV2Processor, samples: Sequence[EncodedSample]) -> dict:
        return collate_for_training(self._samples(samples), processor.tokenizer.pad_id)

    def collate_for_generation(self, processor: MiniCPMV2Processor, samples: Sequence[EncodedSample]) -> dict:
        return collate_for_generation(self._samples(samples), processor.tokenizer.pad_id)

    def generate(
        self,
        model: nn.Module,
        processor: MiniCPMV2Processor,
        batch: Mapping[str, Any],
        max_new_tokens: int = 64,
        **settings: Any,
    ) -> list[str]:
        core = model.get_base_model() if isinstance(model, PeftModel) else model
        tok = processor.tokenizer
        new = generate(
            core,
            batch["input_ids"],
            batch["attention_mask"],
            batch["pixel_values"],
            batch["image_bound"],
            settings=GenerationSettings(max_new_tokens=max_new_tokens, **settings),
            eos_token_id=tok.eos_id,
            pad_token_id=tok.pad_id,
        )
        texts = []
        for ids in new.tolist():
            kept = ids[: ids.index(tok.eos_id)] if tok.eos_id in ids else ids
            texts.append(tok.decode(kept))
        return texts

    def freeze_groups(self) -> FreezeGroups:
        return FreezeGroups(vision=("vpm",), projector=("resampler",), llm=("llm",))

    def lora_target_names(self, model: nn.Module, preset: str) -> list[str]:
        import re

        pattern = build_lora_config(model, preset, r=1, alpha=1, dropout=0.0).target_modules
        return [n for n, _ in model.named_modules() if re.fullmatch(pattern, n)]

    def lora_config(
        self,
        model: nn.Module,
        preset: str,
        r: int,
        alpha: float,
        dropout: float,
        target_modules: Sequence[str] | None = None,
        modules_to_save: Sequence[str] | None = None,
        base_model_path: str | None = None,
    ) -> LoraConfig:
        return build_lora_config(
            model,
            preset,
            r,
            alpha,
            dropout,
            target_modules=target_modules,
            modules_to_save=modules_to_save,
            base_model_path=base_model_path,
        )

    def apply_lora(self, model: nn.Module, config: LoraConfig) -> PeftModel:
        return apply_lora(model, config)

    def set_full_finetune(self, model: nn.Module, frozen: Sequence[str] = ()) -> None:
        unknown = [g for g in frozen if g not in ("vision", "projector", "llm")]
        if unknown:
            raise FamilyError(
                f"{self.name}: unknown freeze group(s) {unknown}; valid: vision, projector, llm"
            )
        try:
            set_full_finetune(
                model,
                freeze_vision="vision" in frozen,
                freeze_resampler="projector" in frozen,
                freeze_llm="llm" in frozen,
            )
        except ValueError as err:
            raise FamilyError(f"{self.name}: {err}") from err

    def save(self, model: nn.Module, processor: MiniCPMV2Processor, folder: str | Path) -> Path:
        return save_checkpoint(model, folder, max_shard_bytes=SHARD_BYTES, source_folder=processor.folder)

    def build_tiny(self, folder: str | Path, seed: int = 0) -> Path:
        # random weights; the pipeline's default twin is pre-trained on top of these by pipeline.training.twin
        return build_tiny_twin(folder, seed=seed)

    # -- what the stages call (each delegates to the project's MiniCPM-V-2 code) -------------------
    own_generation = True

    def base_folder(self, path: str, build_if_missing: bool, allow_download: bool) -> Path:
        from pipeline.families.minicpm_v2.bundle import base_model_path
        from pipeline.training.twin import model_folder

        return base_model_path(model_folder(path, build_if_missing), allow_download)

    def load_bundle(
        self,
        path: str,
        ckpt: str | Path | None = None,
        *,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        build_if_missing: bool = False,
        allow_download: bool = False,
    ) -> Any:
        from pipeline.training.twin import model_folder

        return load_bundle(
            model_folder(path, build_if_missing),
            ckpt=ckpt,
            dtype=dtype,
            device=device,
            allow_download=allow_download,
            **self.settings,
        )

    def prepare_training(
        self, bundle: Any, lora: Any, gradient_checkpointing: bool, base_name: str
    ) -> nn.Module:
        core = bundle.model
        if gradient_checkpointing:
            core.gradient_checkpointing_enable()
        if lora.name == "none":
            set_full_finetune(core, lora.freeze_vision, lora.freeze_resampler, lora.freeze_llm)
            return core
        for p in core.parameters():
            p.requires_grad_(False)
        lora_cfg = build_lora_config(
            core,
            lora.name,
            r=lora.r,
            alpha=lora.alpha,
            dropout=lora.dropout,
            target_modules=list(lora.target_modules) if lora.target_modules else None,
            modules_to_save=list(lora.modules_to_save),
            base_model_path=base_name,
            bias=lora.bias,
        )
        return apply_lora(core, lora_cfg)

    def pad_id(self, bundle: Any) -> int:
        return bundle.tokenizer.pad_id

    def compile_model(self, bundle: Any, graphs: bool) -> int:
        """Compiles every LLM decoder layer and vision block in place; with `graphs` the decoder layers are
        replayed as CUDA graphs (the step is otherwise launch-bound). Returns how many LLM layers."""
        bundle.core.compile_blocks("reduce-overhead" if graphs else None)
        return len(bundle.core.llm.model.layers)

    def device_of(self, bundle: Any) -> torch.device:
        return bundle.core.llm.lm_head.weight.device

    def token_counter(self, bundle: Any, max_length: int, truncation: str) -> Any:
        from pipeline.data.dataset import TokenCounter

        return TokenCounter(bundle.tokenizer, bundle.processor, max_length, truncation)

    def dataset(self, bundle: Any, rows: Sequence[Any], max_length: int, truncation: str) -> Any:
        from pipeline.data.dataset import SFTDataset

        return SFTDataset(rows, bundle.tokenizer, bundle.processor, max_length, truncation)

    def training_collate(self, bundle: Any, pad_to_multiple: int = 1, packed: bool = False) -> Any:
        from functools import partial

        from pipeline.families.minicpm_v2.collate import collate_packed

        fn = collate_packed if packed else collate_for_training
        return partial(fn, pad_id=bundle.tokenizer.pad_id, pad_to_multiple=pad_to_multiple)

    def eval_collate(self, bundle: Any) -> Any:
        from functools import partial

        return partial(collate_for_training, pad_id=bundle.tokenizer.pad_id)

    def loss_outputs(self, model: nn.Module, batch: Mapping[str, Any]) -> Any:
        return model(**batch)  # the model sums its loss over the supervised tokens itself

    def checkpoint_writer(self, bundle: Any) -> Any:
        def write(model: nn.Module, folder: Path, state: Mapping[str, torch.Tensor]) -> None:
            save_checkpoint(model, folder, source_folder=bundle.base_path, state=state)

        return write

    def checkpoint_reader(self, bundle: Any) -> Any:
        """Returns `read(folder) -> state dict`: a full checkpoint's weights in the official layout (what
        `checkpoint_writer` wrote), under the model's own names."""
        return read_weights

    def generate_rows(
        self, bundle: Any, rows: Sequence[Any], settings: Any, batch_size: int, **kw: Any
    ) -> list[str]:
        from pipeline.apps.generation import generate_for_rows

        return generate_for_rows(bundle, rows, settings, batch_size, **kw)

    def dummy_samples(self, bundle: Any, n: int, seed: int) -> list[Any]:
        from pipeline.stages.merge import dummy_samples

        return dummy_samples(bundle.tokenizer, bundle.processor, n, seed)

    def logits_fn(self, bundle: Any, device: torch.device) -> Any:
        from functools import partial

        return partial(minicpm_sample_logits, pad_id=bundle.tokenizer.pad_id, device=device)

    def check_merged(self, model: nn.Module, base: Path) -> None:
        from pipeline.stages.merge import check_merged_keys

        check_merged_keys(model, base)

    def save_merged(
        self, model: nn.Module, bundle: Any, folder: Path, shard_bytes: int, dtype: torch.dtype, base: Path
    ) -> None:
        from pipeline.stages import merge  # the merge stage's writer of the official layout

        merge.save_checkpoint(model, folder, max_shard_bytes=shard_bytes, dtype=dtype, source_folder=base)

    def load_merged(self, folder: Path, dtype: torch.dtype, device: torch.device) -> nn.Module:
        from pipeline.families.minicpm_v2.checkpoint import load_model

        return load_model(folder, dtype=dtype, device=device)

    def weight_files(self, folder: Path) -> list[str]:
        from pipeline.families.minicpm_v2.checkpoint import read_checkpoint_shapes

        return sorted({p.name for _, p in read_checkpoint_shapes(folder).values()})


def minicpm_sample_logits(model: nn.Module, sample: Any, pad_id: int, device: torch.device) -> torch.Tensor:
    """Returns one sample's fp32 logits [T, vocab] on the CPU (one forward, no padding)."""
    batch = collate_for_training([sample], pad_id)
    batch.pop("labels")
    batch["input_ids"] = batch["input_ids"].to(device)
    batch["attention_mask"] = batch["attention_mask"].to(device)
    batch["image_bound"] = [b.to(device) for b in batch["image_bound"]]
    logits = model(**batch, return_logits=True).logits
    return logits[0].float().cpu()
