"""MiniCPM-V-2's configuration: the official config.json fields, read and written unchanged.

The official file describes the vision tower only by its timm name (`vision_encoder`); the tiny twin needs
other sizes, so an optional `vision_config` mapping (embed_dim, depth, num_heads, mlp_dim, img_size,
patch_size) overrides the sizes that the name implies. It is written only when set, so a config loaded
from the official folder saves back with the official fields alone.
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

# Sizes of the timm towers MiniCPM-V uses, keyed by the timm architecture name (before any ".tag").
KNOWN_VISION_ENCODERS: dict[str, dict[str, Any]] = {
    "vit_so400m_patch14_siglip_384": {
        "embed_dim": 1152,
        "depth": 27,
        "num_heads": 16,
        "mlp_dim": 4304,
        "img_size": 384,
        "patch_size": 14,
    },
}
VISION_KEYS = ("embed_dim", "depth", "num_heads", "mlp_dim", "img_size", "patch_size")


class MiniCPMVConfig(PretrainedConfig):
    model_type = "minicpmv"

    def __init__(
        self,
        vocab_size: int = 122753,
        hidden_size: int = 2304,
        intermediate_size: int = 5760,
        num_hidden_layers: int = 40,
        num_attention_heads: int = 36,
        num_key_value_heads: int = 36,
        hidden_act: str = "silu",
        max_position_embeddings: int = 4096,
        initializer_range: float = 0.1,
        rms_norm_eps: float = 1e-5,
        use_cache: bool = True,
        bos_token_id: int = 1,
        eos_token_id: int = 2,
        tie_word_embeddings: bool = False,
        rope_theta: float = 10000.0,
        attention_bias: bool = False,
        attention_dropout: float = 0.0,
        scale_emb: float = 12,
        dim_model_base: int = 256,
        scale_depth: float = 1.4,
        pretraining_tp: int = 1,
        vision_encoder: str = "vit_so400m_patch14_siglip_384.webli",
        drop_vision_last_layer: bool = True,
        query_num: int = 64,
        image_size: int = 448,
        patch_size: int = 14,
        max_slice_nums: int = 9,
        scale_resolution: int = 448,
        slice_mode: bool = True,
        mm_use_im_start_end: bool = True,
        vision_config: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        # The official file carries `rope_scaling: null`; MiniCPM-V-2 never scales RoPE, so it is dropped
        # here rather than handed to transformers, whose newer versions rewrite it into a dict.
        kwargs.pop("rope_scaling", None)
        kwargs.pop("rope_parameters", None)
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        self.rope_theta = rope_theta
        self.attention_bias = attention_bias
        self.attention_dropout = attention_dropout
        self.scale_emb = scale_emb
        self.dim_model_base = dim_model_base
        self.scale_depth = scale_depth
        self.pretraining_tp = pretraining_tp
        self.vision_encoder = vision_encoder
        self.drop_vision_last_layer = drop_vision_last_layer
        self.query_num = query_num
        self.image_size = image_size
        self.patch_size = patch_size
        self.max_slice_nums = max_slice_nums
        self.scale_resolution = scale_resolution
        self.slice_mode = slice_mode
        self.mm_use_im_start_end = mm_use_im_start_end
        if vision_config is not None:
            unknown = sorted(set(vision_config) - set(VISION_KEYS))
            if unknown:
                raise ValueError(f"vision_config: unknown keys {unknown}; valid keys: {list(VISION_KEYS)}")
            vision_config = dict(vision_config)
        self.vision_config = vision_config
        super().__init__(
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {hidden_size} is not divisible by num_attention_heads {num_attention_heads}"
            )
        if self.hidden_size < 128:
            raise ValueError(f"hidden_size {hidden_size} < 128: the resampler uses hidden_size // 128 heads")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def resampler_num_heads(self) -> int:
        return self.hidden_size // 128

    def vision_sizes(self) -> dict[str, Any]:
        """Returns the vision tower's sizes: the known encoder's, overridden by `vision_config`."""
        arch = self.vision_encoder.split(".")[0]
        sizes = dict(KNOWN_VISION_ENCODERS.get(arch, {}))
        sizes.update(self.vision_config or {})
        missing = [k for k in VISION_KEYS if k not in sizes]
        if missing:
            raise ValueError(
                f"vision_encoder {self.vision_encoder!r} is not one of {sorted(KNOWN_VISION_ENCODERS)} and "
                f"vision_config lacks {missing}"
            )
        return sizes

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        if out.get("vision_config") is None:
            out.pop("vision_config", None)
        # Keep the official spelling of the (always absent) RoPE scaling.
        out.pop("rope_parameters", None)
        out["rope_scaling"] = None
        return out
