"""The loss of a long-answer micro-batch a chunk of positions at a time (model.chunked_loss).

Only the supervised positions go through the output head (hf_native: `logits_to_keep`, or a pre-hook on the
head; MiniCPM-V-2's model selects them itself, and its position_losses calls scored_in_chunks). A caption row
supervises some 20 positions; a row with a long answer supervises hundreds or thousands, and then their fp32
logits dominate the step's memory: 16,384 supervised positions of a 151,936-word vocabulary (the Qwen VLs) are
10 GB, of MiniCPM-V 4.6's 248,320 words 16 GB, and cross-entropy keeps the log-softmax and its gradient beside
them. Where a micro-batch's supervised logits would exceed LOGITS_BYTES, the head's forward computes the token
losses itself, CHUNK_BYTES of logits at a time, each chunk recomputed during the backward (non-reentrant
checkpoint), so at most one chunk's logits exist at any time.
The sums, the correct predictions and every gradient equal the one-piece computation's
(tests/families/test_chunked_loss.py).

auto: chunk past LOGITS_BYTES, except under FSDP and DeepSpeed (their weights may be sharded, and a chunk
recomputed during the backward would find the head's released; not tried there); off: one piece, always.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import CHUNKED_LOSS_MODES
from .base import IGNORE_INDEX
from .sharding import gathers_weights

# auto chunks a micro-batch whose supervised positions' fp32 logits would exceed this (a COCO caption step of
# 16 rows: ~320 positions, 0.2 GB with the Qwen VLs' vocabulary, stays one piece)
LOGITS_BYTES = 2**30
# the fp32 logits of one chunk (~440 positions of the Qwen VLs' vocabulary, ~270 of MiniCPM-V 4.6's)
CHUNK_BYTES = 2**28
# wrappers (by class name: DeepSpeed need not be installed) whose modules hold sharded parameters
SHARDING_WRAPPERS = frozenset({"FullyShardedDataParallel", "FSDPModule", "DeepSpeedEngine"})
log = logging.getLogger(__name__)
_told: set[int] = set()  # the chunk sizes the log has named (once each per process)


def chunk_positions(mode: str, positions: int, vocab: int, one_piece: bool) -> int:
    """Returns how many positions one chunk of the head's loss holds, or 0 for one piece: `positions`
    supervised positions of a `vocab`-word head under model.chunked_loss `mode`; `one_piece`: the model
    cannot be chunked (holds_sharded_weights, transforms_logits)."""
    if mode not in CHUNKED_LOSS_MODES:
        raise ValueError(f"model.chunked_loss={mode} is not a mode; valid: {', '.join(CHUNKED_LOSS_MODES)}")
    if mode == "off" or one_piece or positions * vocab * 4 <= LOGITS_BYTES:
        return 0
    chunk = max(1, CHUNK_BYTES // (vocab * 4))
    if chunk not in _told:
        _told.add(chunk)
        log.info(
            "the loss of %d supervised positions (%.1f GB of fp32 logits in one piece) is scored %d "
            "positions at a time, each chunk recomputed in the backward (model.chunked_loss=off: one piece)",
            positions,
            positions * vocab * 4 / 1e9,
            chunk,
        )
    return chunk


def holds_sharded_weights(model: nn.Module, head: nn.Module) -> bool:
    """Returns whether `model` (under any DDP / FSDP / DeepSpeed / PEFT wrapper) may shard its parameters: an
    FSDP or DeepSpeed wrapper on the way down to the model, a head whose weights the engine gathers in its own
    calls (sharding.gathers_weights: an FSDP unit, a ZeRO-3 partition), or a head parameter that is a DTensor
    (FSDP2)."""
    module: object = model
    while isinstance(module, nn.Module):
        if any(cls.__name__ in SHARDING_WRAPPERS for cls in type(module).__mro__):
            return True
        module = getattr(module, "module", None)
    return gathers_weights(head) or any(type(p).__name__ == "DTensor" for p in head.parameters())


def transforms_logits(text_config: object) -> bool:
    """Returns whether the language model changes its head's output before returning it as logits (a logit
    scale or soft-capping, as some model types do; none of the families here): chunking scores the head's
    output itself, so such a model keeps its logits in one piece."""
    scale = getattr(text_config, "logit_scale", None)
    return getattr(text_config, "final_logit_softcapping", None) is not None or scale not in (None, 1, 1.0)


@dataclass
class HeadLosses:
    """What the chunked head computed: each supervised position's loss [B, K] (fp32, 0 where ignored) and
    the count of positions whose most likely word is the label."""

    losses: torch.Tensor | None = None
    correct: torch.Tensor | None = None


def _scored(
    forward: Callable, hidden: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    logits = forward(hidden).float()
    losses = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="none")
    correct = ((logits.argmax(-1) == labels) & (labels != IGNORE_INDEX)).sum()
    return losses, correct


def scored_in_chunks(
    forward: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, labels: torch.Tensor, chunk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns each position's loss [N] (fp32, 0 where the label is ignored) and the count of correct
    predictions, for hidden states [N, D] and labels [N]: `forward` (the head, hidden states to logits) runs
    on `chunk` positions at a time, each chunk's logits recomputed in the backward when gradients are on."""
    losses, correct = [], []
    # split, not slices: its backward joins the chunks' gradients once (a slice's makes a full-size one)
    for piece in zip(hidden.split(chunk), labels.split(chunk), strict=True):
        if torch.is_grad_enabled():
            piece_losses, piece_correct = checkpoint(_scored, forward, *piece, use_reentrant=False)
        else:
            piece_losses, piece_correct = _scored(forward, *piece)
        losses.append(piece_losses)
        correct.append(piece_correct)
    if not losses:  # no positions: an empty loss that keeps the graph connected
        return hidden.sum(-1).float() * 0.0, torch.zeros((), dtype=torch.long, device=hidden.device)
    return torch.cat(losses), torch.stack(correct).sum()


@contextlib.contextmanager
def head_losses(head: nn.Module, labels: torch.Tensor, chunk: int) -> Iterator[HeadLosses]:
    """Inside, `head` given hidden states [B, K, D] computes the losses of their K positions against `labels`
    [B, K] into the yielded HeadLosses, `chunk` positions at a time (each chunk's logits recomputed in the
    backward when gradients are on), and returns an empty [B, K, 0] tensor for the logits."""
    result = HeadLosses()
    had_own = "forward" in head.__dict__
    forward = head.forward

    def chunked(hidden: torch.Tensor) -> torch.Tensor:
        flat = hidden.reshape(-1, hidden.shape[-1])
        targets = labels.reshape(-1).to(hidden.device)
        if flat.shape[0] != targets.shape[0]:
            raise ValueError(f"the head got {flat.shape[0]} positions for {targets.shape[0]} labels")
        losses, result.correct = scored_in_chunks(forward, flat, targets, chunk)
        result.losses = losses.view(labels.shape)
        return hidden.new_zeros(*hidden.shape[:-1], 0)

    head.forward = chunked
    try:
        yield result
    finally:
        if had_own:
            head.forward = forward
        else:
            del head.forward
