"""Decoder layers compiled for training steps, with static shapes, one compiled graph for all of them.

`compile_for_training(layers)` gives each layer a forward that, in a training step (training mode with
gradients on), runs one shared `torch.compile`d function of (layer, inputs), and otherwise (evaluation,
generation with a KV cache, the serve worker) the layer's own forward. All layers of a model have the same
structure, so the compiled function's graph is traced once per input shape and reused by every layer (their
weights are the graph's inputs): a model of 36 layers compiles as fast as one layer.

Shapes are static (`dynamic=False`): the training batches must come in few shapes. The HF-native families
compile packed rows only, whose length the training plan rounds up to a few buckets (a quarter of the
micro-batch budget each: 4 shapes for a budget of 4096 tokens) and whose sample boundaries come padded to a
power-of-two count; so a run traces some 4-12 graphs and then only replays them.

The layers keep their modules and parameter names (nothing is wrapped), so checkpoints, PEFT adapters and
activation checkpointing (which calls the layer, and so the compiled function, again in the backward pass)
see the same model as without compile.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
from torch import nn

CHECKPOINT_WRAPPER = "forward_with_checkpointing"  # transformers' wrapper of a checkpointed layer's forward


def _unchecked(cls: type) -> Any:
    """Returns the class's forward without transformers' activation-checkpointing wrapper (recent releases
    checkpoint inside `forward` rather than around `__call__`), else its forward."""
    forward = cls.forward
    return forward.__wrapped__ if _is_checkpoint_wrapper(forward) else forward


def _is_checkpoint_wrapper(forward: Any) -> bool:
    # `functools.wraps` gave the wrapper the wrapped forward's name: its code keeps its own
    code = getattr(forward, "__code__", None)
    return code is not None and code.co_name == CHECKPOINT_WRAPPER and hasattr(forward, "__wrapped__")


def _layer_forward(layer: nn.Module, *args: Any, **kwargs: Any) -> Any:
    return _unchecked(type(layer))(layer, *args, **kwargs)


def _vision_block_forward(layer: nn.Module, *args: Any, **kwargs: Any) -> Any:
    return _unchecked(type(layer))(layer, *args, **kwargs)


# torch.compile keeps its traced graphs (and counts them against its recompile limit) per function: the
# vision blocks get a function of their own, so their graphs neither crowd the decoder layers' nor are
# looked up for them
FORWARDS = {"layers": _layer_forward, "vision": _vision_block_forward}


def compile_for_training(layers: Sequence[nn.Module], backend: Any = None, part: str = "layers") -> int:
    """Makes every layer's training-step forward one shared compiled function; returns how many layers.
    `backend`: torch.compile's backend (None: inductor); `part`: whose function ("layers": the decoder
    layers', "vision": the vision blocks')."""
    options: dict[str, Any] = {"dynamic": False}
    if backend is not None:
        options["backend"] = backend
    compiled = torch.compile(FORWARDS[part], **options)
    for layer in layers:
        layer.forward = _dispatching_forward(layer, compiled)
    return len(layers)


def _dispatching_forward(layer: nn.Module, compiled: Any) -> Any:
    def forward(*args: Any, **kwargs: Any) -> Any:
        if not (layer.training and torch.is_grad_enabled()):
            return type(layer).forward(layer, *args, **kwargs)
        if getattr(layer, "gradient_checkpointing", False) and _is_checkpoint_wrapper(type(layer).forward):
            # the checkpoint around the compiled call, as releases that checkpoint `__call__` place it: inside,
            # it would be traced as a higher-order op that refuses the layers' side effects (a graph break)
            return layer._gradient_checkpointing_func(partial(compiled, layer, **kwargs), *args)
        return compiled(layer, *args, **kwargs)

    forward.compiled_for_training = True  # type: ignore[attr-defined]
    return forward


def is_compiled_for_training(layer: nn.Module) -> bool:
    """Returns whether `compile_for_training` set the layer's forward."""
    return bool(getattr(layer.__dict__.get("forward"), "compiled_for_training", False))
