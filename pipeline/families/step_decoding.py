"""The HF-native families' running batch for the server: requests join and leave between decode steps
(continuous batching) over one transformers cache, each row answered as it would be alone.

transformers' own continuous batching (`generate_batch`, `ContinuousBatchingManager`) takes token ids only:
no pixel inputs and no position rows of its own (the Qwen VLs' mRoPE), so it cannot run these models with
images. This decoder drives the model's forward directly instead:

- joining: the newcomers are prefilled together, left-padded, with their images and with the position rows
  the model gives each prompt alone (the family's `generation_positions`: the Qwen VLs' mRoPE rows); their
  cache is then left-padded to the running batch's length (or the batch's to theirs) and appended to it row
  by row. A row's next position (the Qwen VLs: its prompt's largest mRoPE position + 1, i.e. transformers'
  rope_deltas plus its length) is kept per row, so rows of any lengths decode side by side.
- a step: every row's next token is chosen from its own logits (greedy, or sampled from its own seeded
  generator), rows that end leave, and one forward of one token per remaining row runs over the cache with
  each row's mask and position.
- leaving: the rows that ended are selected out of the cache, and columns no remaining row attends are
  trimmed from its left.

The cache holds attention layers (keys and values [B, heads, T, dim], padded on the left) and, for MiniCPM-V
4.6's linear-attention layers, convolution and recurrent states [B, ...] (no sequence axis: a left-padded
prompt leaves them as its real tokens alone do, since transformers zeroes the padding's inputs). Decoding
is eager (no CUDA graph): rows join and leave, so the shapes change at every step they do.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer, LinearAttentionCacheLayerMixin

from .base import EncodedPrompt, FamilyError, StepDecoder
from .generation_settings import GenerationSettings
from .sampling import next_tokens

Positions = Callable[[Mapping[str, Any]], torch.Tensor]  # a padded batch -> its position rows (R, B, L)
Collate = Callable[[Sequence[EncodedPrompt]], dict[str, Any]]  # prompts -> a left-padded batch


@dataclass
class _Row:
    id: int
    max_new_tokens: int
    generator: torch.Generator | None
    seen: list[int]  # prompt and generated ids (the repetition penalty's)
    made: int = 0  # tokens chosen so far


# ----- the cache, row by row
def _layer_tensors(layer: Any) -> tuple[list[str], list[tuple[str, int]]]:
    """Returns (the attributes of a cache layer holding [B, heads, T, dim] tensors, the (dict attribute, state
    index) pairs holding [B, ...] states); refuses layers whose rows cannot be moved alone (sliding windows)."""
    if isinstance(layer, DynamicSlidingWindowLayer):
        raise FamilyError(
            f"a running batch cannot hold {type(layer).__name__} (a sliding-window cache); serve one request "
            "at a time"
        )
    sequences = ["keys", "values"] if isinstance(layer, DynamicLayer) and layer.is_initialized else []
    states = []
    if isinstance(layer, LinearAttentionCacheLayerMixin):
        for name in ("conv_states", "recurrent_states"):
            states += [(name, k) for k, value in getattr(layer, name).items() if value is not None]
    if not sequences and not states and not isinstance(layer, (DynamicLayer, LinearAttentionCacheLayerMixin)):
        raise FamilyError(f"a running batch cannot hold a {type(layer).__name__} cache layer")
    return sequences, states


def _map_cache(cache: Any, on_sequence: Callable[[torch.Tensor], torch.Tensor], on_state: Callable) -> None:
    """Replaces every tensor of `cache` by `on_sequence(t)` (attention keys / values) or `on_state(t)`."""
    for layer in cache.layers:
        sequences, states = _layer_tensors(layer)
        for name in sequences:
            setattr(layer, name, on_sequence(getattr(layer, name)))
        for name, k in states:
            getattr(layer, name)[k] = on_state(getattr(layer, name)[k])


def _set_length(cache: Any, length: int) -> None:
    """Sets the token count the linear-attention layers keep (the attention layers' columns)."""
    for layer in cache.layers:
        if isinstance(layer, LinearAttentionCacheLayerMixin):
            layer.cumulative_length_linear = torch.tensor(
                length, device=layer.cumulative_length_linear.device
            )


def _pad_left(cache: Any, columns: int, length: int) -> None:
    if columns:
        _map_cache(cache, lambda t: F.pad(t, (0, 0, columns, 0)), lambda t: t)
    _set_length(cache, length)


def _append_rows(cache: Any, other: Any) -> None:
    """Appends the rows of `other` (a cache of the same length) to `cache`."""
    for layer, joining in zip(cache.layers, other.layers, strict=True):
        sequences, states = _layer_tensors(layer)
        for name in sequences:
            setattr(layer, name, torch.cat([getattr(layer, name), getattr(joining, name)]))
        for name, k in states:
            getattr(layer, name)[k] = torch.cat([getattr(layer, name)[k], getattr(joining, name)[k]])


def _output_cache(output: Any) -> Any:
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


class HFStepDecoder(StepDecoder):
    """The running batch of an HF-native model (see the module docstring).

    `collate` left-pads prompts into the model's inputs (pixels joined); `positions` gives a padded batch's
    position rows (R, B, L) as the model computes them for each prompt alone (R = 1: plain positions; the Qwen
    VLs: 4, the text row then t, h, w); `keeps_logits`: the forward takes `logits_to_keep`; `last_only`: a
    context inside which the forward's head computes the last position only (for a forward without
    `logits_to_keep`: a prefill's logits are then one row per prompt, not one per prompt position)."""

    def __init__(
        self,
        model: nn.Module,
        collate: Collate,
        positions: Positions,
        end_ids: frozenset[int],
        pad_id: int,
        keeps_logits: bool,
        last_only: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    ) -> None:
        super().__init__(pad_id)
        self.model = model
        self.collate = collate
        self.positions = positions
        self.end_ids = end_ids
        self.keeps_logits = keeps_logits
        self.last_only = last_only
        self.device = next(model.parameters()).device
        self.settings = GenerationSettings()
        self._next_id = 0
        self._clear()

    def _clear(self) -> None:
        self._rows: list[_Row] = []
        self._cache: Any = None
        self._mask: torch.Tensor | None = None  # [B, T] over the cache's columns
        self._next_position: torch.Tensor | None = None  # [B]
        self._logits: torch.Tensor | None = None  # [B, V] fp32: each row's next choice

    # ----- the StepDecoder interface
    def start(self, settings: GenerationSettings) -> None:
        self.settings = settings
        self._clear()

    @property
    def rows(self) -> list[int]:
        return [row.id for row in self._rows]

    @torch.inference_mode()
    def add(
        self, prompts: Sequence[EncodedPrompt], max_new_tokens: Sequence[int], seeds: Sequence[int | None]
    ) -> list[int]:
        if not (len(prompts) == len(max_new_tokens) == len(seeds)):
            raise ValueError("add needs one max_new_tokens and one seed per prompt")
        if not prompts:
            return []
        logits, cache, mask, next_position = self._prefill(prompts)
        rows = []
        for prompt, limit, seed in zip(prompts, max_new_tokens, seeds, strict=True):
            generator = None
            if seed is not None and self.settings.do_sample:
                generator = torch.Generator(self.device).manual_seed(int(seed))
            seen = list(prompt.input_ids) if self.settings.repetition_penalty != 1.0 else []
            rows.append(_Row(self._next_id, int(limit), generator, seen))
            self._next_id += 1
        self._join(rows, logits, cache, mask, next_position)
        return [row.id for row in rows]

    @torch.inference_mode()
    def step(self) -> dict[int, int]:
        if not self._rows:
            return {}
        assert self._logits is not None
        tokens = self._choose()
        chosen: dict[int, int] = {}
        ended = []
        for row, token in zip(self._rows, tokens.tolist(), strict=True):
            chosen[row.id] = token
            row.made += 1
            if self.settings.repetition_penalty != 1.0:
                row.seen.append(token)
            if token in self.end_ids or row.made >= row.max_new_tokens:
                ended.append(row.id)
        keep = [i for i, row in enumerate(self._rows) if row.id not in ended]
        if ended:
            self._keep(keep)
            tokens = tokens[keep]
        if self._rows:
            self._forward_step(tokens)
        return chosen

    @torch.inference_mode()
    def drop(self, rows: Sequence[int]) -> None:
        gone = set(rows)
        keep = [i for i, row in enumerate(self._rows) if row.id not in gone]
        if len(keep) < len(self._rows):
            self._keep(keep)

    # ----- the model
    def _prefill(
        self, prompts: Sequence[EncodedPrompt]
    ) -> tuple[torch.Tensor, Any, torch.Tensor, torch.Tensor]:
        """Returns (last logits [n, V], cache, mask [n, L], next positions [n]) of the prompts alone."""
        batch = self.collate(prompts)
        positions = self.positions(batch)  # (R, n, L), left-padded: every row's last column is real
        next_position = positions[-1, :, -1] + 1
        inputs = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        # one position row is passed as (n, L); the Qwen VLs' four rows as they are (text row first)
        inputs["position_ids"] = (positions[0] if positions.shape[0] == 1 else positions).to(self.device)
        output = self._forward(inputs)
        return output.logits[:, -1].float(), _output_cache(output), inputs["attention_mask"], next_position

    def _forward(self, inputs: dict[str, Any]) -> Any:
        if self.keeps_logits:
            return self.model(**inputs, use_cache=True, logits_to_keep=1)
        with self.last_only():
            return self.model(**inputs, use_cache=True)

    def _forward_step(self, tokens: torch.Tensor) -> None:
        """Feeds each remaining row its chosen token; the logits become those of the next choice."""
        assert self._mask is not None and self._next_position is not None
        self._mask = torch.cat([self._mask, self._mask.new_ones(len(self._rows), 1)], dim=1)
        output = self._forward(
            {
                "input_ids": tokens[:, None].to(self.device),
                "attention_mask": self._mask,
                "position_ids": self._next_position[:, None].to(self.device),
                "cache": self._cache,
            }
        )
        self._cache = _output_cache(output)
        self._next_position = self._next_position + 1
        self._logits = output.logits[:, -1].float()

    def _choose(self) -> torch.Tensor:
        """Returns each row's next token [B] from its logits (its own generator when sampling)."""
        assert self._logits is not None
        settings = self.settings
        generators = [row.generator for row in self._rows] if settings.do_sample else None
        if settings.repetition_penalty == 1.0:
            empty = torch.empty(len(self._rows), 0, dtype=torch.long, device=self._logits.device)
            return next_tokens(self._logits, empty, settings, generators).cpu()
        # the penalty's ids differ in number from row to row: one row at a time
        picks = []
        for i, row in enumerate(self._rows):
            seen = torch.tensor([row.seen], dtype=torch.long, device=self._logits.device)
            picks.append(next_tokens(self._logits[i : i + 1], seen, settings, [row.generator])[0])
        return torch.stack(picks).cpu()

    # ----- rows joining and leaving
    def _join(
        self,
        rows: list[_Row],
        logits: torch.Tensor,
        cache: Any,
        mask: torch.Tensor,
        next_position: torch.Tensor,
    ) -> None:
        next_position = next_position.to(self.device)
        if not self._rows:
            self._rows, self._cache, self._mask, self._logits = rows, cache, mask, logits
            self._next_position = next_position
            _set_length(cache, mask.shape[1])
            return
        assert self._mask is not None and self._next_position is not None and self._logits is not None
        length = max(self._mask.shape[1], mask.shape[1])
        # validate both caches before changing either: a refused layer leaves the batch as it was
        for layer in (*self._cache.layers, *cache.layers):
            _layer_tensors(layer)
        _pad_left(self._cache, length - self._mask.shape[1], length)
        _pad_left(cache, length - mask.shape[1], length)
        _append_rows(self._cache, cache)
        self._mask = torch.cat(
            [F.pad(self._mask, (length - self._mask.shape[1], 0)), F.pad(mask, (length - mask.shape[1], 0))]
        )
        self._next_position = torch.cat([self._next_position, next_position])
        self._logits = torch.cat([self._logits, logits])
        self._rows = self._rows + rows

    def _keep(self, keep: list[int]) -> None:
        """Keeps only the rows at the indices `keep`, trimming cache columns no row attends any more."""
        self._rows = [self._rows[i] for i in keep]
        if not self._rows:
            self._clear()
            return
        assert self._mask is not None and self._next_position is not None and self._logits is not None
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        mask = self._mask.index_select(0, index)
        unused = int(
            (mask.sum(0) == 0).long().cumprod(0).sum()
        )  # leading columns that are padding everywhere
        mask = mask[:, unused:]
        _map_cache(
            self._cache, lambda t: t.index_select(0, index)[:, :, unused:], lambda t: t.index_select(0, index)
        )
        _set_length(self._cache, mask.shape[1])
        self._mask = mask
        self._next_position = self._next_position.index_select(0, index)
        self._logits = self._logits.index_select(0, index)
