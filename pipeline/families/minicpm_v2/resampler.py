"""The adaptive perceiver resampler of MiniCPM-V-2: 64 learned queries cross-attend to a vision feature grid.

Keys get a 2D sin-cos position table computed for each image's own patch grid; queries get the fixed table
stored in the checkpoint (`resampler.pos_embed`, frozen); values get none. The tables follow MAE's
layout, in which the first half of the channels encodes the column index (a quirk of `meshgrid(w, h)`), and
are computed in numpy float32 so that bf16 runs match the original bit for bit.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch
from torch import nn


def _sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
    omega = np.arange(dim // 2, dtype=np.float32)
    omega /= dim / 2.0
    omega = 1.0 / 10000**omega
    out = np.einsum("m,d->md", positions.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


@lru_cache(maxsize=64)
def sincos_2d(dim: int, grid_h: int, grid_w: int) -> np.ndarray:
    """Returns the [grid_h * grid_w, dim] float32 sin-cos table (column index in the first half of channels)."""
    gh = np.arange(grid_h, dtype=np.float32)
    gw = np.arange(grid_w, dtype=np.float32)
    grid = np.meshgrid(gw, gh)  # grid[0] varies along w
    emb = np.concatenate([_sincos_1d(dim // 2, grid[0]), _sincos_1d(dim // 2, grid[1])], axis=1)
    emb.setflags(write=False)
    return emb


class Resampler(nn.Module):
    def __init__(self, num_queries: int, embed_dim: int, num_heads: int, kv_dim: int) -> None:
        super().__init__()
        side = math.isqrt(num_queries)
        if side * side != num_queries:
            raise ValueError(f"query_num {num_queries} must be a square number (an s x s query grid)")
        self.num_queries = num_queries
        self.embed_dim = embed_dim
        self.query = nn.Parameter(torch.zeros(num_queries, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(num_queries, embed_dim), requires_grad=False)
        self.kv_proj = nn.Linear(kv_dim, embed_dim, bias=False) if kv_dim != embed_dim else nn.Identity()
        self.attn = nn.MultiheadAttention(embed_dim, num_heads)
        self.ln_q = nn.LayerNorm(embed_dim, eps=1e-6)
        self.ln_kv = nn.LayerNorm(embed_dim, eps=1e-6)
        self.ln_post = nn.LayerNorm(embed_dim, eps=1e-6)
        self.proj = nn.Parameter((embed_dim**-0.5) * torch.randn(embed_dim, embed_dim))
        if not self.pos_embed.is_meta:
            self.reset_query_pos_embed()

    def reset_query_pos_embed(self) -> None:
        side = math.isqrt(self.num_queries)
        table = torch.from_numpy(sincos_2d(self.embed_dim, side, side).copy())
        with torch.no_grad():
            self.pos_embed.copy_(table.to(self.pos_embed.device, self.pos_embed.dtype))

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Returns [N, num_queries, embed_dim] for N feature maps [N, gh*gw, kv_dim] sharing one grid."""
        key_pos = torch.from_numpy(sincos_2d(self.embed_dim, grid[0], grid[1]).copy()).to(x.device, x.dtype)
        kv = self.ln_kv(self.kv_proj(x)).transpose(0, 1)  # [L, N, E]: seq-first as the original
        n = kv.shape[1]
        q = self.ln_q(self.query)
        q = (q + self.pos_embed.to(q.dtype)).unsqueeze(1).expand(-1, n, -1)
        out = self.attn(q, kv + key_pos.unsqueeze(1), kv, need_weights=False)[0]
        return self.ln_post(out.transpose(0, 1)) @ self.proj
