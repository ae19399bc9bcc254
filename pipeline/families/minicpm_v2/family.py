"""MiniCPM-V-2: the project's own implementation (this folder) behind the family interface.

Nothing here re-implements the model: loading is bundle.py, encoding is the `minicpm-v` template of
template.py (token ids equal to ms-swift's) through collate.py, rows become samples in dataset.py, the LoRA
presets and freeze switches are lora.py, saving is the official layout of checkpoint.py, generation is
generation.py (batched, KV-cached, CUDA-graph decode) with its prompts in prompting.py, merge checks are
merge.py and the random twin is tiny.py. This module maps the interface onto them.

Rules the template sets: one image per conversation, placed at the start of the first user message (a
query's own <image> tag places it there instead). The chat and the server decode through serving.py: the
server's batches step by step, the chat's answers streamed.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image
from torch import nn

from pipeline.families import chunked_loss
from pipeline.families.base import (
    IMAGE_TAG,
    PAIR_KEYS,
    PAIRS,
    BatchDecoder,
    Bundle,
    Capabilities,
    Checkpointing,
    EncodedSample,
    Family,
    FamilyError,
    FreezeGroups,
    ImageSource,
    Message,
    RowLike,
    SequenceLogps,
    check_messages,
    checkpointed_layers,
    peft_base,
    shared_halves,
    unwrapped,
    with_lora_variant,
)
from pipeline.families.checkpoints import DEFAULT_SHARD_BYTES as SHARD_BYTES  # the official layout's

from . import merge as merge_checks
from .bundle import ModelBundle, base_model_path, load_bundle
from .checkpoint import load_model, read_checkpoint_shapes, read_weights, resolve_model_path, save_checkpoint
from .collate import Sample, collate_for_generation, collate_for_training, collate_packed, encode_example
from .dataset import SFTDataset, TokenCounter, slice_grid_for_size
from .generation import GenerationSettings, generate
from .lora import apply_lora, build_lora_config, set_full_finetune
from .processor import MiniCPMVImageProcessor
from .prompting import batch_to_device, encode_prompt, prompt_limit, response_ids
from .serving import MiniCPMV2StepDecoder, stream_tokens
from .tiny import build_tiny_twin
from .tokenizer import MiniCPMVTokenizer

if TYPE_CHECKING:
    from peft import LoraConfig, PeftModel


@dataclass
class MiniCPMV2Processor:
    """What encodes for MiniCPM-V-2: its tokenizer, its image processor, and the folder they came from."""

    tokenizer: MiniCPMVTokenizer
    image_processor: MiniCPMVImageProcessor
    folder: Path  # side files (tokenizer, preprocessor config) are copied from here on save

    def save_pretrained(self, folder: str | Path) -> None:
        self.tokenizer.save_pretrained(folder)
        self.image_processor.save_pretrained(folder)


def shared_pixels(pixel_values: list[list[Any]], pairs: int, packed: bool) -> list[list[Any]]:
    """Returns a pair batch's pixel lists with the rejected answers' images replaced by the chosen answers'
    own tensors (equal values, from the same image): one list per sample (padded; samples n + i take sample
    i's), or one list of every sample's images in order (packed; its second half takes the first's)."""
    if not packed:
        return pixel_values[:pairs] * 2
    flat = pixel_values[0]
    half = shared_halves(pairs, len(flat), "images")
    return [flat[:half] * 2]


class MiniCPMV2(Family):
    name = "minicpm_v2"
    model_type = "minicpmv"
    capabilities = Capabilities(
        display_name="MiniCPM-V-2",
        max_images=1,
        compiles=True,
        packs=True,
        # a slice is 64 image tokens and at most 1,024 patches: 2048 tokens held 8 COCO-shaped rows, 43.2 GB
        # peak with lora=all and no recompute, 24.43 samples/s against 19.13 checkpointed (H100 80GB)
        trained_tower_budget=2048,
        truncates=True,
        batches_requests=True,
        continuous_batching=True,
        cuda_graph_decode=True,
        config_keys=("max_slice_nums", "slice_mode"),
        image_placement="first_query",
    )
    max_length = 2048
    setting_keys = ("max_slice_nums", "slice_mode")
    resolution_setting = "model.max_slice_nums (slices per image; each slice adds query_num image tokens)"

    @classmethod
    def settings_from_config(cls, model: Any) -> dict[str, Any]:
        return {"max_slice_nums": model.max_slice_nums, "slice_mode": model.slice_mode}

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
        last_round: bool = False,
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
            last_round=last_round,
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
        core = peft_base(model)
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
        # random weights; pipeline.training.twin pre-trains every family's twin on top of these
        return build_tiny_twin(folder, seed=seed)

    # -- what the stages call (each delegates to this folder's code) -------------------------------
    def base_folder(self, path: str | Path, allow_download: bool = False) -> Path:
        return base_model_path(str(path), allow_download)

    def load_bundle(
        self,
        path: str | Path,
        ckpt: str | Path | None = None,
        *,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        allow_download: bool = False,
    ) -> ModelBundle:
        return load_bundle(
            str(path), ckpt=ckpt, dtype=dtype, device=device, allow_download=allow_download, **self.settings
        )

    def prepare_training(
        self, bundle: ModelBundle, lora: Any, gradient_checkpointing: Checkpointing, base_name: str
    ) -> nn.Module:
        core = bundle.model
        if gradient_checkpointing == "vision":
            core.vision_checkpointing_enable()
        elif gradient_checkpointing:
            count = len(core.llm.model.layers)
            core.gradient_checkpointing_enable(llm_layers=checkpointed_layers(gradient_checkpointing, count))
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
        return apply_lora(core, with_lora_variant(lora_cfg, lora))

    def pad_id(self, bundle: ModelBundle) -> int:
        return bundle.tokenizer.pad_id

    def compile_model(self, bundle: ModelBundle, graphs: bool, vision: bool = False) -> int:
        """Compiles every LLM decoder layer and vision block in place; with `graphs` the decoder layers are
        replayed as CUDA graphs (the step is otherwise launch-bound). Its vision blocks take any batch and
        always compile with the rest (`vision`, trainer.compile_vision, is for the HF-native towers).
        Returns how many LLM layers."""
        bundle.core.compile_blocks("reduce-overhead" if graphs else None)
        return len(bundle.core.llm.model.layers)

    def device_of(self, bundle: ModelBundle) -> torch.device:
        return bundle.core.llm.lm_head.weight.device

    def token_counter(
        self,
        bundle: ModelBundle,
        max_length: int,
        truncation: str,
        images: ImageSource,
        last_round: bool = False,
    ) -> TokenCounter:
        return TokenCounter(bundle.tokenizer, bundle.processor, max_length, truncation, images, last_round)

    def image_token_counter(self, bundle: ModelBundle, images: ImageSource) -> Callable[[RowLike], int]:
        """Counts the image placeholder's tokens of a row (its one image's slices), from the image header."""

        def count(row: RowLike) -> int:
            size = images.size(row.images[0]) if row.images else None
            if size is None:
                return 0
            grid = slice_grid_for_size(bundle.processor, *size)
            return len(bundle.processor.placeholder_ids(bundle.tokenizer, grid))

        return count

    def dataset(
        self,
        bundle: ModelBundle,
        rows: Sequence[RowLike],
        max_length: int,
        truncation: str,
        images: ImageSource,
        last_round: bool = False,
    ) -> SFTDataset:
        return SFTDataset(
            rows, bundle.tokenizer, bundle.processor, max_length, truncation, images, last_round=last_round
        )

    def training_collate(
        self, bundle: ModelBundle, pad_to_multiple: int = 1, packed: bool = False, static: bool = False
    ) -> Callable:
        # its compiled layers take any padded batch (rounded to pad_to_multiple): `static` asks nothing more
        fn = collate_packed if packed else collate_for_training
        return partial(fn, pad_id=bundle.tokenizer.pad_id, pad_to_multiple=pad_to_multiple)

    def eval_collate(self, bundle: ModelBundle) -> Callable:
        return partial(collate_for_training, pad_id=bundle.tokenizer.pad_id)

    def token_sample_lengths(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """A packed row (collate_packed) numbers each token's sample in segment_ids (-1: tail padding); padded
        rows as Family's."""
        if "segment_ids" not in batch:
            return super().token_sample_lengths(batch)
        segments = batch["segment_ids"].long().cpu()
        real = segments >= 0
        sizes = torch.bincount(segments[real], minlength=int(segments.max()) + 1 if real.any() else 0)
        return torch.where(real, sizes[segments.clamp(min=0)], 0)

    def loss_outputs(self, model: nn.Module, batch: Mapping[str, Any]) -> Any:
        # the model sums its loss over the supervised tokens itself; its output has LossSums' fields
        return model(**batch, loss_chunking=self.loss_chunking(model))

    def loss_chunking(self, model: nn.Module) -> str:
        """model.chunked_loss for the model's own loss (MiniCPMV.position_losses): off under FSDP and
        DeepSpeed (chunked_loss.holds_sharded_weights), as for the other families."""
        head = unwrapped(model).llm.lm_head
        return "off" if chunked_loss.holds_sharded_weights(model, head) else self.chunked_loss

    def sequence_logps(
        self, model: nn.Module, batch: Mapping[str, Any], image_features: Any = None
    ) -> SequenceLogps:
        """Each sample's summed log-probability of its supervised tokens (the model sums them by row, or by a
        packed row's segment). A pair's rejected answer gets its chosen answer's image tensors, which the
        model's vision tower encodes once (MiniCPMV.encode_images); `image_features`: the images' queries of
        an earlier call (MiniCPMVOutput.image_queries)."""
        pairs = int(batch.get(PAIRS) or 0)
        inputs = {k: v for k, v in batch.items() if k not in PAIR_KEYS}
        if pairs:
            inputs["pixel_values"] = shared_pixels(inputs["pixel_values"], pairs, "segment_ids" in inputs)
        out = model(
            **inputs,
            sample_sums=True,
            loss_chunking=self.loss_chunking(model),
            image_queries=image_features,
        )
        return SequenceLogps(
            logps=-out.sample_loss_sum, tokens=out.sample_tokens, image_features=out.image_queries
        )

    def checkpoint_writer(
        self, bundle: ModelBundle
    ) -> Callable[[nn.Module, Path, Mapping[str, torch.Tensor]], None]:
        def write(model: nn.Module, folder: Path, state: Mapping[str, torch.Tensor]) -> None:
            save_checkpoint(model, folder, source_folder=bundle.base_path, state=state)

        return write

    def checkpoint_reader(self, bundle: ModelBundle) -> Callable[[Path], dict[str, torch.Tensor]]:
        """Returns `read(folder) -> state dict`: a full checkpoint's weights in the official layout (what
        `checkpoint_writer` wrote), under the model's own names."""
        return read_weights

    def prompt_limit(self, bundle: ModelBundle, max_new_tokens: int) -> int:
        return prompt_limit(bundle, max_new_tokens)

    def encode_row(
        self, bundle: ModelBundle, row: RowLike, images: Sequence[Image.Image], max_length: int
    ) -> Sample:
        image = images[0] if images else None
        return encode_prompt(bundle, row.query, row.history, row.system, image, max_length, where=row.origin)

    @torch.no_grad()
    def generate_batch(
        self,
        bundle: ModelBundle,
        samples: Sequence[Sample],
        settings: GenerationSettings,
        generator: torch.Generator | None = None,
        *,
        batches: int | None = None,  # its CUDA graph is captured in milliseconds: static on a GPU for any job
    ) -> list[str]:
        tok = bundle.tokenizer
        batch = batch_to_device(collate_for_generation(list(samples), tok.pad_id), self.device_of(bundle))
        new = generate(
            bundle.core,
            batch["input_ids"],
            batch["attention_mask"],
            batch["pixel_values"],
            batch["image_bound"],
            settings=settings,
            eos_token_id=tok.eos_id,
            pad_token_id=tok.pad_id,
            generator=generator,
            static=None if self.decode_mode == "auto" else self.decode_mode == "static",
        )
        return [tok.decode(response_ids(ids, tok.eos_id)) for ids in new.tolist()]

    # -- chat and serve -------------------------------------------------------------------------------
    def encode_chat(
        self,
        bundle: ModelBundle,
        messages: Sequence[Message],
        images: Sequence[Image.Image],
        max_length: int,
    ) -> Sample:
        checked = check_messages(self.name, messages)
        if checked[-1]["role"] != "user":
            raise FamilyError(f"{self.name}: a generation prompt ends with a user message")
        if len(images) > self.max_images:
            raise FamilyError(
                f"{self.label} takes {self.capabilities.images_in_words()} per conversation; got "
                f"{len(images)} images"
            )
        system, rounds = self._rounds(checked)
        image = images[0] if images else None
        try:
            return encode_prompt(bundle, rounds[-1][0], rounds[:-1], system or None, image, max_length)
        except FamilyError:
            raise  # the prompt is too long (ContextLengthError)
        except ValueError as err:  # the template's rules (tags)
            raise FamilyError(f"{self.name}: {err}") from None

    def end_ids(self, bundle: ModelBundle) -> frozenset[int]:
        return frozenset([bundle.tokenizer.eos_id])

    def decode(self, bundle: ModelBundle, ids: Sequence[int]) -> str:
        return bundle.tokenizer.decode(list(ids))

    def stream_tokens(
        self,
        bundle: ModelBundle,
        prompt: Sample,
        settings: GenerationSettings,
        on_token: Callable[[int], None],
        stop: threading.Event | None = None,
        seed: int | None = None,
    ) -> None:
        stream_tokens(bundle, prompt, settings, on_token, stop, seed)

    def batch_decoder(self, bundle: ModelBundle) -> BatchDecoder:
        return MiniCPMV2StepDecoder(bundle)

    def dummy_samples(self, bundle: ModelBundle, n: int, seed: int) -> list[Sample]:
        return merge_checks.dummy_samples(bundle.tokenizer, bundle.processor, n, seed)

    def logits_fn(self, bundle: ModelBundle, device: torch.device) -> Callable:
        return partial(merge_checks.sample_logits, pad_id=bundle.tokenizer.pad_id, device=device)

    def check_merged(self, model: nn.Module, base: Path) -> None:
        merge_checks.check_merged_keys(model, base)

    def save_merged(
        self,
        model: nn.Module,
        bundle: Bundle,
        folder: Path,
        shard_bytes: int,
        dtype: torch.dtype,
        base: Path,
    ) -> None:
        save_checkpoint(model, folder, max_shard_bytes=shard_bytes, dtype=dtype, source_folder=base)

    def load_merged(self, folder: Path, dtype: torch.dtype, device: torch.device) -> nn.Module:
        return load_model(folder, dtype=dtype, device=device)

    def weight_files(self, folder: Path) -> list[str]:
        return sorted({p.name for _, p in read_checkpoint_shapes(folder).values()})
