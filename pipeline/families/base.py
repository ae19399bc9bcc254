"""The family interface: everything a stage needs from a vision-language model, whichever model it is.

A family is one subclass of `Family` (one module under pipeline/families/) plus one
conf/model/*.yaml. Stages talk only to this interface, never to a family by name:

    model, processor = family.load(path, dtype, device)            # the model and what encodes for it
    family.check_conversation(conversation, images)                # the family's limits, before any model
    sample = family.encode(processor, conversation, images)        # ids, labels (assistant turns), pixels
    batch = family.collate_for_training(processor, samples)        # right-padded, labels -100 on padding
    batch = family.collate_for_generation(processor, samples)      # left-padded prompts
    texts = family.generate(model, processor, batch, max_new_tokens=...)
    peft_model = family.apply_lora(model, family.lora_config(model, "qkv", r=8, alpha=32, dropout=0.05))
    peft_model = family.load_adapter(model, adapter_folder)       # a saved adapter on its base model
    family.set_full_finetune(model, frozen=("vision",))            # full fine-tuning with freeze groups
    family.save(model, processor, folder) / family.merge(peft_model, processor, folder)
    family.build_tiny(folder)                                      # the offline tiny twin

What the stages call (the second half of the interface; a "bundle" is what `load_bundle` returns, with
`.model` (PEFT-wrapped when an adapter is loaded), `.core`, `.base_path` and `.kind`):

    bundle = family.load_bundle(model_path, ckpt, dtype=..., device=..., build_if_missing=..., allow_download=...)
    model = family.prepare_training(bundle, cfg.lora, gradient_checkpointing, base_name)   # sft
    counter = family.token_counter(bundle, max_length, truncation)   # data validation: row -> tokens | None
    dataset = family.dataset(bundle, rows, max_length, truncation)    # rows -> encoded samples
    family.training_collate(bundle, pad_to_multiple, packed) / family.eval_collate(bundle)
    sums = family.loss_outputs(model, batch)                          # loss_sum, num_tokens, num_correct
    family.checkpoint_writer(bundle) / family.checkpoint_reader(bundle)   # full weights, native layout
    texts = family.generate_rows(bundle, rows, settings, batch_size)  # eval, infer
    merge: dummy_samples, logits_fn, check_merged, save_merged, load_merged, weight_files
    own_generation      # MiniCPM-V-2: the project's own generate (batched serving, CUDA-graph decode)
    family.vision_attention_of(bundle)   # "varlen" / "sdpa" for an HF-native tower, None for an own one
    family.compile_model(bundle, graphs)  # trainer.compile (MiniCPM-V-2): its layers, + CUDA graphs

A conversation is a list of messages ``{"role": "system" | "user" | "assistant", "content": str}``; an
``<image>`` tag in a user message marks where an image goes (one tag per image, in order). Images without
any tag go at the start of the first user message, as ms-swift places them.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from PIL import Image
from torch import nn

IGNORE_INDEX = -100
IMAGE_TAG = "<image>"
ROLES = ("system", "user", "assistant")
LORA_PRESETS = ("qkv", "all")

Message = Mapping[str, str]


class FamilyError(ValueError):
    """Input a family cannot take; the message names the family, the message index or key, and the limit."""


@dataclass(frozen=True)
class FamilyLimits:
    """What a family accepts, stated for data validation before any model loads."""

    max_images: int  # images per conversation
    max_length: int  # tokens per encoded conversation, image tokens included

    def describe(self) -> str:
        """Returns the limits as one sentence for error messages and docs."""
        return f"at most {self.max_images} image(s) per conversation and {self.max_length} tokens"


@dataclass
class EncodedSample:
    """One encoded conversation: ids, unshifted labels, per-token extras and the pixel inputs."""

    input_ids: list[int]
    labels: list[int]
    # Inputs with one value per token (e.g. Qwen2.5-VL's mm_token_type_ids), padded like input_ids.
    token_inputs: dict[str, list[int]] = field(default_factory=dict)
    # Image tensors as the family's processor returns them for this one conversation.
    pixel_inputs: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class LossSums:
    """A forward's training loss as the loop needs it: summed over the supervised tokens, with their count."""

    loss_sum: torch.Tensor
    num_tokens: torch.Tensor
    num_correct: torch.Tensor


@dataclass(frozen=True)
class FreezeGroups:
    """Top-level parameter name prefixes of each part: what `lora=none` freeze switches act on."""

    vision: tuple[str, ...]
    projector: tuple[str, ...]
    llm: tuple[str, ...]

    def of(self, name: str) -> str | None:
        """Returns the group whose longest prefix holds the parameter name, or None outside every group.

        The longest prefix wins, so a projector nested inside the vision module (Qwen2.5-VL's
        `model.visual.merger`) is its own group."""
        best, best_len = None, -1
        for group in ("vision", "projector", "llm"):
            for prefix in getattr(self, group):
                if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > best_len:
                    best, best_len = group, len(prefix)
        return best


def normalise_conversation(
    family: str, conversation: Sequence[Message], n_images: int, image_tag: str = IMAGE_TAG
) -> list[dict[str, str]]:
    """Returns the messages as plain dicts with every image tagged, checking roles and tag counts."""
    messages: list[dict[str, str]] = []
    for i, message in enumerate(conversation):
        if not isinstance(message, Mapping) or set(message) - {"role", "content"} or "role" not in message:
            raise FamilyError(
                f"{family}: message {i} must be {{'role': ..., 'content': ...}}, got {message!r}"
            )
        role, content = message["role"], message.get("content", "")
        if role not in ROLES:
            raise FamilyError(f"{family}: message {i} has role {role!r}; valid roles: {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise FamilyError(f"{family}: message {i} content must be a string, got {type(content).__name__}")
        if role == "system" and i != 0:
            raise FamilyError(f"{family}: message {i} is a system message; only the first message may be one")
        if role != "user" and image_tag in content:
            raise FamilyError(f"{family}: message {i} ({role}) holds {image_tag}; images go in user messages")
        messages.append({"role": role, "content": content})
    turns = [m["role"] for m in messages if m["role"] != "system"]
    if not turns or turns[0] != "user":
        raise FamilyError(
            f"{family}: a conversation needs a user message first (after an optional system one)"
        )
    for k in range(1, len(turns)):
        if turns[k] == turns[k - 1]:
            raise FamilyError(
                f"{family}: two {turns[k]} messages in a row; user and assistant must alternate"
            )
    tags = sum(m["content"].count(image_tag) for m in messages)
    if tags == 0 and n_images:
        first = next(m for m in messages if m["role"] == "user")
        first["content"] = image_tag * n_images + first["content"]
    elif tags != n_images:
        raise FamilyError(f"{family}: the conversation has {tags} {image_tag} tag(s) but {n_images} image(s)")
    return messages


def messages_from_row(
    query: str, response: str | None, history: Sequence[Sequence[str]] = (), system: str | None = None
) -> list[dict[str, str]]:
    """Returns the messages of an ms-swift row (query, response, [query, response] history, system);
    response None leaves the conversation open for generation."""
    messages = [{"role": "system", "content": system}] if system else []
    for past_query, past_response in history:
        messages += [{"role": "user", "content": past_query}, {"role": "assistant", "content": past_response}]
    messages.append({"role": "user", "content": query})
    if response is not None:
        messages.append({"role": "assistant", "content": response})
    return messages


class Family(ABC):
    """One model family: loading, encoding, batching, training targets, saving, and its tiny twin."""

    name: ClassVar[str]
    # Default limits; a family may narrow them from its settings (e.g. the processor's max length).
    max_images: ClassVar[int]
    max_length: ClassVar[int] = 2048

    # The resolution settings the family's processor takes from the config (model.processor_kwargs).
    setting_keys: ClassVar[tuple[str, ...]] = ()

    # The peak learning rate of the tiny twin's pre-training (pipeline/training/twin.py: one recipe for
    # every family); a family whose twin learns at another one states it here.
    twin_pretrain_lr: ClassVar[float] = 3e-3

    def __init__(self, settings: Mapping[str, Any] | None = None, vision_attention: str = "auto"):
        self.settings = dict(settings or {})
        # how an HF-native family's vision tower attends (model.vision_attention; see vision_attention.py)
        self.vision_attention = vision_attention
        unknown = sorted(set(self.settings) - set(self.setting_keys))
        if unknown:
            valid = ", ".join(self.setting_keys) or "none"
            raise FamilyError(
                f"{self.name}: unknown processor setting(s) {', '.join(unknown)}; valid: {valid}"
            )

    # -- limits and validation (no model needed) ---------------------------------------------------
    def compile_model(self, bundle: Any, graphs: bool) -> int:
        """Compiles the loaded model's blocks in place for training (trainer.compile); returns how many."""
        raise FamilyError(f"trainer.compile=true runs for model.family=minicpm_v2 only, not {self.name}")

    def vision_attention_of(self, bundle: Any) -> str | None:
        """Returns how the loaded model's vision tower attends ("varlen", "sdpa"), or None where the family
        has no choice of it (MiniCPM-V-2's own tower)."""
        return None

    def limits(self) -> FamilyLimits:
        """Returns the limits data validation states for this family."""
        return FamilyLimits(max_images=self.max_images, max_length=self.max_length)

    def check_conversation(
        self, conversation: Sequence[Message], images: Sequence[Any]
    ) -> list[dict[str, str]]:
        """Returns the normalised messages; raises FamilyError when they break the family's rules."""
        limits = self.limits()
        if len(images) > limits.max_images:
            raise FamilyError(
                f"{self.name}: {len(images)} images in one conversation; this family takes "
                f"{limits.describe()}"
            )
        return normalise_conversation(self.name, conversation, len(images))

    def prepare_messages(
        self, conversation: Sequence[Message], images: Sequence[Any], generation: bool
    ) -> list[dict[str, str]]:
        """Returns the checked messages to render: a generation prompt drops a final assistant message, a
        training conversation must end with one."""
        messages = self.check_conversation(conversation, images)
        if generation and messages[-1]["role"] == "assistant":
            return messages[:-1]
        if not generation and messages[-1]["role"] != "assistant":
            raise FamilyError(f"{self.name}: a training conversation must end with an assistant message")
        return messages

    # -- the model --------------------------------------------------------------------------------
    @abstractmethod
    def resolve(self, path: str, allow_download: bool = False) -> Path:
        """Returns the local folder for a folder path or a hub id (downloaded only when allowed)."""

    @abstractmethod
    def load(
        self, path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
    ) -> tuple[nn.Module, Any]:
        """Returns (model, processor) from a local folder in the family's native layout."""

    @abstractmethod
    def encode(
        self,
        processor: Any,
        conversation: Sequence[Message],
        images: Sequence[Image.Image] = (),
        generation: bool = False,
    ) -> EncodedSample:
        """Returns the encoded conversation; labels are the assistant turns only (none with generation=True,
        where a final assistant message, if any, is dropped and the generation prompt appended)."""

    @abstractmethod
    def collate_for_training(self, processor: Any, samples: Sequence[EncodedSample]) -> dict[str, Any]:
        """Returns a right-padded batch the model's forward takes, labels included."""

    @abstractmethod
    def collate_for_generation(self, processor: Any, samples: Sequence[EncodedSample]) -> dict[str, Any]:
        """Returns a left-padded batch of prompts the family's `generate` takes."""

    @abstractmethod
    def generate(
        self,
        model: nn.Module,
        processor: Any,
        batch: Mapping[str, Any],
        max_new_tokens: int = 64,
        **settings: Any,
    ) -> list[str]:
        """Returns the decoded new text of each prompt in the batch."""

    # -- what trains ----------------------------------------------------------------------------
    @abstractmethod
    def freeze_groups(self) -> FreezeGroups:
        """Returns the parameter name prefixes of the vision tower, the projector and the language model."""

    @abstractmethod
    def lora_target_names(self, model: nn.Module, preset: str) -> list[str]:
        """Returns the full names of the modules a LoRA preset targets (`qkv` or `all`)."""

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
        """Returns the PEFT LoraConfig for a preset, or for explicit target modules (names or regexes)."""
        if target_modules:
            names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
            pattern = "|".join(f"(?:{t})" for t in target_modules)
            hits = [
                n
                for n in names
                if re.fullmatch(pattern, n) or any(n.endswith(f".{t}") for t in target_modules)
            ]
            if not hits:
                raise FamilyError(
                    f"{self.name}: lora.target_modules {list(target_modules)} match no linear layer; "
                    f"examples: {names[:3]}"
                )
        elif preset in LORA_PRESETS:
            hits = self.lora_target_names(model, preset)
        else:
            raise FamilyError(f"{self.name}: lora preset must be one of {list(LORA_PRESETS)}, got {preset!r}")
        config = LoraConfig(
            r=r,
            lora_alpha=alpha,
            lora_dropout=dropout,
            target_modules="|".join(re.escape(n) for n in hits),
            modules_to_save=list(modules_to_save) if modules_to_save else None,
            bias="none",
        )
        config.base_model_name_or_path = base_model_path
        return config

    def apply_lora(self, model: nn.Module, config: LoraConfig) -> PeftModel:
        """Returns the PEFT-wrapped model; only the LoRA weights require grad."""
        return get_peft_model(model, config)

    def load_adapter(self, model: nn.Module, folder: str | Path, trainable: bool = False) -> PeftModel:
        """Returns the base model with the LoRA adapter of a PEFT folder (what `save_pretrained` of the
        wrapped model wrote) applied; an adapter of another base model is refused naming both."""
        try:
            return PeftModel.from_pretrained(model, str(folder), is_trainable=trainable)
        except RuntimeError as err:  # size mismatch
            raise FamilyError(f"{self.name}: adapter {folder} does not fit this base model: {err}") from err

    def set_full_finetune(self, model: nn.Module, frozen: Sequence[str] = ()) -> None:
        """Makes every parameter trainable except those of the frozen groups (vision, projector, llm)."""
        groups = self.freeze_groups()
        unknown = [g for g in frozen if g not in ("vision", "projector", "llm")]
        if unknown:
            raise FamilyError(
                f"{self.name}: unknown freeze group(s) {unknown}; valid: vision, projector, llm"
            )
        for name, param in model.named_parameters():
            param.requires_grad_(groups.of(name) not in frozen)
        if not any(p.requires_grad for p in model.parameters()):
            raise FamilyError(f"{self.name}: freezing {list(frozen)} leaves nothing to train")

    # -- checkpoints ----------------------------------------------------------------------------
    @abstractmethod
    def save(self, model: nn.Module, processor: Any, folder: str | Path) -> Path:
        """Writes the model and its processor to `folder` (atomically) in the family's native layout."""

    def merge(self, model: PeftModel, processor: Any, folder: str | Path) -> Path:
        """Folds the adapter into the base weights and writes the standalone model to `folder`."""
        merged = model.merge_and_unload(safe_merge=True)
        return self.save(merged, processor, folder)

    @abstractmethod
    def build_tiny(self, folder: str | Path, seed: int = 0) -> Path:
        """Writes the family's tiny twin (tiny sizes, offline tokenizer, real chat template) to `folder`."""


def pad_batch(
    samples: Sequence[EncodedSample], pad_id: int, left: bool, with_labels: bool
) -> dict[str, torch.Tensor]:
    """Returns input_ids, attention_mask, per-token inputs (and labels) padded to the longest sample."""
    if not samples:
        raise ValueError("cannot collate an empty list of samples")
    length = max(len(s) for s in samples)
    batch = len(samples)
    out = {
        "input_ids": torch.full((batch, length), pad_id, dtype=torch.long),
        "attention_mask": torch.zeros((batch, length), dtype=torch.long),
    }
    if with_labels:
        out["labels"] = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long)
    for key in samples[0].token_inputs:
        out[key] = torch.zeros((batch, length), dtype=torch.long)
    for i, s in enumerate(samples):
        n = len(s)
        start = length - n if left else 0
        where = slice(start, start + n)
        out["input_ids"][i, where] = torch.tensor(s.input_ids, dtype=torch.long)
        out["attention_mask"][i, where] = 1
        if with_labels:
            out["labels"][i, where] = torch.tensor(s.labels, dtype=torch.long)
        for key, values in s.token_inputs.items():
            out[key][i, where] = torch.tensor(values, dtype=torch.long)
    return out
