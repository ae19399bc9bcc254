"""lora.init_weights: how a LoRA adapter starts (ms-swift's --init_lora_weights, PEFT's init_lora_weights).
"true" (B zero, A Kaiming-uniform) and "gaussian" leave the base weights as they are; pissa, pissa_niter_N and
olora start the adapter from the base weights' principal directions and train on the residual
(pipeline.training.residual_lora keeps their checkpoints readable on the original base)."""

from __future__ import annotations

import re
from typing import Any

RESIDUAL = re.compile(r"^(pissa|olora|pissa_niter_[1-9][0-9]*)$")
INIT_CHOICES = "true, gaussian, pissa, pissa_niter_<N> (N >= 1: randomised SVD, faster), olora"


def normal_init(value: Any) -> str:
    """Returns lora.init_weights as the lower-case name it is checked and stored under ("true" for True)."""
    return str(value).strip().lower()


def init_problem(value: Any) -> str | None:
    """Returns why lora.init_weights=`value` is not a choice, or None."""
    name = normal_init(value)
    if name in ("true", "gaussian") or RESIDUAL.match(name):
        return None
    return f"lora.init_weights={value} is not a valid choice; valid: {INIT_CHOICES}"


def is_residual(value: Any) -> bool:
    """Returns whether lora.init_weights=`value` initialises from the base weights (and so changes them)."""
    return bool(RESIDUAL.match(normal_init(value)))


def peft_init(value: Any) -> bool | str:
    """Returns PEFT's `init_lora_weights` for lora.init_weights=`value`."""
    name = normal_init(value)
    return True if name == "true" else name
