"""A preallocated key/value cache for generation: one buffer per layer, filled in place, never concatenated.

Two ways to write: by slice at the current length (prefill, and decode with shapes that grow), or - once
`static_index` is set - at each row's own slot held in a device tensor, returning the whole buffers (decode
with fixed shapes, which a CUDA graph can capture; the caller masks the unwritten tail).

A cache may hold more rows than a batch: `rows` is the batch's, whose slice writes (prefill, growing decode)
touch only its first rows; a static write fills every row (the rows past the batch compute throwaway tokens).
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        num_kv_heads: int,
        max_length: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        shape = (batch_size, num_kv_heads, max_length, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.max_length = max_length
        self.rows = batch_size  # the batch's rows (the first of the buffers'), for slice writes
        self.length = 0  # tokens already stored (same for every layer once a forward completes)
        self._pending = 0
        self.static_index: torch.Tensor | None = None  # [B] long: each row's slot, on the buffers' device

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns all keys and values of `layer` so far, after writing the new ones at the current length."""
        if self.static_index is not None:  # each row's token at that row's slot
            slots = self.static_index.view(-1, 1, 1, 1).expand(-1, k.shape[1], 1, k.shape[3])
            self.keys[layer].scatter_(2, slots, k)
            self.values[layer].scatter_(2, slots, v)
            return self.keys[layer], self.values[layer]
        t = k.shape[2]
        end = self.length + t
        if end > self.max_length:
            raise RuntimeError(f"KV cache overflow: {end} tokens > max_length {self.max_length}")
        keys, values = self.keys[layer][: self.rows], self.values[layer][: self.rows]
        keys[:, :, self.length : end] = k
        values[:, :, self.length : end] = v
        self._pending = t
        return keys[:, :, :end], values[:, :, :end]

    def advance(self) -> None:
        """Marks the tokens of the last forward as stored (called once per forward, after every layer)."""
        if self.static_index is not None:
            return  # the caller moves static_index
        self.length += self._pending
        self._pending = 0
