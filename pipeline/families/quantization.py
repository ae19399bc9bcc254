"""A 4-bit (NF4) or 8-bit base for LoRA training and generation (QLoRA): `model.quantization=nf4|int8`.

The library is bitsandbytes: peft's LoRA layers wrap its `Linear4bit` / `Linear8bitLt` natively (the adapter
trains in the compute dtype on top of the frozen quantized weight), it is what transformers'
`BitsAndBytesConfig` and the other fine-tuning tools use for QLoRA, and it runs on the CPU as well as on CUDA,
so the same code is tested here. (torchao's NF4 tensor was the other candidate: a pure PyTorch tensor subclass,
but with no LoRA layer of peft's built for it.)

What is quantized: every linear layer of the language model (the family's `llm` freeze group) but the output
head, which is where a 7B model's weights are; the vision tower and the projector stay in the training dtype
(they are small, and LoRA `all` trains adapters on them as usual). The swap works on any family's module tree,
so every family gets it from one place: the model is loaded on the CPU, its language model's linear layers are
replaced by bitsandbytes' layers holding the same weights, and moving the model to the device quantizes each
one as it goes, so the GPU never holds the full-precision language model (its peak is the quantized one's).

Merging (the merge stage) never quantizes: it folds the adapter into the full-precision base, the weights the
adapter was trained against before rounding, as QLoRA users merge.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence

import torch
from torch import nn

from .base import FamilyError

CHOICES = ("none", "nf4", "int8")
INSTALL = "pip install bitsandbytes"
LORA_NAMES = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")


def check(choice: str) -> None:
    """Refuses a value that is not a choice, and a quantized base without bitsandbytes."""
    if choice not in CHOICES:
        raise FamilyError(f"model.quantization={choice} is not a valid choice; valid: {', '.join(CHOICES)}")
    if choice != "none" and importlib.util.find_spec("bitsandbytes") is None:
        raise FamilyError(f"model.quantization={choice} needs bitsandbytes: {INSTALL}")


def targets(model: nn.Module, prefixes: Sequence[str]) -> list[str]:
    """The names of the linear layers a quantized base replaces: under the language model's `prefixes`, not
    the output head, not an adapter's own layers (a loaded adapter's base layers are replaced under it)."""
    names = []
    for name, module in model.named_modules():
        if type(module) is not nn.Linear:  # a LoRA wrapper or an already quantized layer is not one
            continue
        parts = name.split(".")
        if parts[-1] == "lm_head" or any(p in LORA_NAMES for p in parts):
            continue
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            names.append(name)
    return names


def quantized_linear(linear: nn.Linear, choice: str, compute_dtype: torch.dtype) -> nn.Module:
    """A bitsandbytes layer holding `linear`'s weights, quantized when it is moved to a device."""
    import bitsandbytes as bnb

    weight = linear.weight.data
    if choice == "nf4":
        layer = bnb.nn.Linear4bit(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            compute_dtype=compute_dtype,
            quant_type="nf4",
            quant_storage=torch.uint8,
            device="meta",
        )
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")
        # bitsandbytes repacks a 4-bit weight for its CPU inference kernel on the first no-grad forward and
        # then fails every training forward (an in-place add on the kernel's output): the layer keeps the
        # one layout that serves both
        layer.support_avx512bf16_for_cpu = False
    else:
        layer = bnb.nn.Linear8bitLt(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            has_fp16_weights=False,
            device="meta",
        )
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.data, requires_grad=False)
    return layer


def quantize(
    model: nn.Module,
    prefixes: Sequence[str],
    choice: str,
    compute_dtype: torch.dtype,
    device: torch.device,
) -> int:
    """Replaces the language model's linear layers of `model` (on the CPU) by quantized ones and moves the
    model to `device`, quantizing on the way; marks the model so that peft wraps those layers with its
    quantized LoRA layers. Returns how many layers were replaced."""
    check(choice)
    names = targets(model, prefixes)
    if not names:
        raise FamilyError(f"model.quantization={choice}: no linear layer under {list(prefixes)} to quantize")
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, quantized_linear(getattr(parent, child), choice, compute_dtype))
    model.to(device)
    flag = "is_loaded_in_4bit" if choice == "nf4" else "is_loaded_in_8bit"
    setattr(model, flag, True)  # peft dispatches its bitsandbytes LoRA layers on this flag
    return len(names)


def is_quantized(model: nn.Module) -> bool:
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))
