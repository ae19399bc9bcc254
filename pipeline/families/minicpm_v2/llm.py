"""The MiniCPM-2.4B language model inside MiniCPM-V-2 (module names match the checkpoint's `llm.*` keys).

Llama-like, with three scalings that set it apart: text embeddings x `scale_emb`, every residual branch
x `scale_depth / sqrt(num_layers)`, and logits = lm_head(h / (hidden_size / dim_model_base)).
The embedding scaling is applied by the caller (MiniCPMV scales the text embeddings, then writes the
unscaled vision features in), so `MiniCPMModel.forward` takes `inputs_embeds` only.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .configuration import MiniCPMVConfig
from .kv_cache import KVCache


class MiniCPMRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Variance in fp32, normalised x cast back to the input dtype before the weight (as the original).
        xf = x.float()
        normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)
        return normed * self.weight


def rope_cos_sin(
    position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns cos and sin [B, 1, T, head_dim] for rotate-half RoPE at the given positions."""
    inv_freq = 1.0 / (
        theta ** (torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32) / head_dim)
    )
    freqs = position_ids.float()[..., None] * inv_freq  # [B, T, head_dim/2]
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Returns x rotated in fp32 and cast back, as the original does."""
    xf = x.float()
    return (xf * cos.float() + _rotate_half(xf) * sin.float()).to(x.dtype)


class MiniCPMAttention(nn.Module):
    def __init__(self, config: MiniCPMVConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.rope_theta = config.rope_theta
        bias = config.attention_bias
        h = config.hidden_size
        self.q_proj = nn.Linear(h, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, h, bias=bias)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attn_mask: torch.Tensor | None,
        cache: KVCache | None,
    ) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        gqa = self.num_kv_heads != self.num_heads
        if attn_mask is None:
            # No padding and no cached prefix: the fused causal kernel (one new token over a cache attends to
            # all of it). Without a cache the test is not on `t`, which compiled under dynamic shapes is
            # symbolic, and SDPA takes no symbolic bool.
            causal = cache is None or t > 1
            out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=gqa)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class MiniCPMMLP(nn.Module):
    def __init__(self, config: MiniCPMVConfig) -> None:
        super().__init__()
        h, i = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(h, i, bias=False)
        self.up_proj = nn.Linear(h, i, bias=False)
        self.down_proj = nn.Linear(i, h, bias=False)
        if config.hidden_act != "silu":
            raise ValueError(f"hidden_act {config.hidden_act!r} is not supported; MiniCPM uses 'silu'")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MiniCPMDecoderLayer(nn.Module):
    def __init__(self, config: MiniCPMVConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = MiniCPMAttention(config, layer_idx)
        self.mlp = MiniCPMMLP(config)
        self.input_layernorm = MiniCPMRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = MiniCPMRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.residual_scale = config.scale_depth / math.sqrt(config.num_hidden_layers)

    def forward(self, x, cos, sin, attn_mask=None, cache=None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attn_mask, cache) * self.residual_scale
        return x + self.mlp(self.post_attention_layernorm(x)) * self.residual_scale


class MiniCPMModel(nn.Module):
    def __init__(self, config: MiniCPMVConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(MiniCPMDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = MiniCPMRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.gradient_checkpointing = False
        # with gradient_checkpointing, how many decoder layers (the first ones) are checkpointed: the rest
        # keep their activations for the backward (model.gradient_checkpointing as a share)
        self.checkpointed_layers = config.num_hidden_layers
        # Set by compile_layers(): compiled layers, and compiled "checkpointed layer" functions so that the
        # recomputation lives inside the compiled graph. Plain lists: the wrappers share the layers'
        # parameters and must not add state_dict keys.
        self.compiled_layers: list | None = None
        self.compiled_checkpointed: list | None = None

    def compile_layers(self, mode: str | None = None) -> None:
        """Compiles each decoder layer, and each layer-under-checkpoint for gradient checkpointing.

        mode="reduce-overhead" adds CUDA graphs (one recording per distinct sequence length). The compiled
        layers serve training steps only: evaluation and generation run the plain layers, because the 40
        layers share one compiled graph and a CUDA-graph replay for layer i+1 would overwrite layer i's
        output outside autograd's bookkeeping (generation has its own CUDA graph).
        """
        dynamic = mode != "reduce-overhead"

        def checkpointed(layer: nn.Module):
            def run(x, cos, sin, attn_mask):
                return checkpoint(layer, x, cos, sin, attn_mask, None, use_reentrant=False)

            return torch.compile(run, dynamic=dynamic, mode=mode)

        self.compiled_checkpointed = [checkpointed(layer) for layer in self.layers]
        self.compiled_layers = [torch.compile(layer, dynamic=dynamic, mode=mode) for layer in self.layers]

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        position_ids: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Returns the final-norm hidden states [B, T, H] for already scaled input embeddings."""
        cos, sin = rope_cos_sin(
            position_ids, self.config.head_dim, self.config.rope_theta, inputs_embeds.dtype
        )
        x = inputs_embeds
        training_step = self.training and torch.is_grad_enabled() and cache is None
        compiled = training_step and self.compiled_layers is not None
        for i, layer in enumerate(self.layers):
            if self.gradient_checkpointing and training_step and i < self.checkpointed_layers:
                if compiled:
                    x = self.compiled_checkpointed[i](x, cos, sin, attn_mask)
                else:
                    x = checkpoint(layer, x, cos, sin, attn_mask, None, use_reentrant=False)
            else:
                x = (self.compiled_layers[i] if compiled else layer)(x, cos, sin, attn_mask, cache)
        if cache is not None:
            cache.advance()
        return self.norm(x)


class MiniCPMForCausalLM(nn.Module):
    def __init__(self, config: MiniCPMVConfig) -> None:
        super().__init__()
        self.config = config
        self.model = MiniCPMModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.logit_divisor = config.hidden_size / config.dim_model_base

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Returns fp32 logits for hidden states of any leading shape."""
        return self.lm_head(hidden / self.logit_divisor).float()
