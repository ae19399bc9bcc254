"""A preallocated key/value cache for generation: one buffer per layer, filled in place, never concatenated."""

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
        self.length = 0  # tokens already stored (same for every layer once a forward completes)
        self._pending = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns all keys and values of `layer` so far, after writing the new ones at the current length."""
        t = k.shape[2]
        end = self.length + t
        if end > self.max_length:
            raise RuntimeError(f"KV cache overflow: {end} tokens > max_length {self.max_length}")
        self.keys[layer][:, :, self.length : end] = k
        self.values[layer][:, :, self.length : end] = v
        self._pending = t
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def advance(self) -> None:
        """Marks the tokens of the last forward as stored (called once per forward, after every layer)."""
        self.length += self._pending
        self._pending = 0
