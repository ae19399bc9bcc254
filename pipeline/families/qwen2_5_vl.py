"""Qwen2.5-VL (3B, 7B): transformers' `qwen2_5_vl`, any number of images at their native resolution.

Images become patches of 14 px merged 2x2 into one LLM token each (28 px per token); the processor's
`min_pixels` / `max_pixels` (model.processor_kwargs) bound each image's size and so its token count.
"""

from __future__ import annotations

from typing import Any, ClassVar

from torch import nn

from .base import FreezeGroups
from .hf_native import HFNativeFamily

# The official Qwen2.5-VL-Instruct chat template (as published with the checkpoints).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

LLM = "model.language_model"
VISION = "model.visual"
PROJECTOR = "model.visual.merger"


def tiny_text_config(tokenizer: Any, **extra: Any) -> dict[str, Any]:
    """Returns the tiny twins' language-model sizes (2 layers, hidden 64, M-RoPE), shared by the Qwen VLs."""
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.pad_token_id,
        **extra,
    )


def tiny_token_ids(tokenizer: Any) -> dict[str, Any]:
    """Returns the image and video token ids of a Qwen VL config, read off the twin's tokenizer."""
    ids = tokenizer.convert_tokens_to_ids
    return dict(
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=True,
    )


class Qwen2_5_VL(HFNativeFamily):
    name = "qwen2_5_vl"
    model_type = "qwen2_5_vl"
    max_images = 16
    max_length = 32768
    setting_keys = ("min_pixels", "max_pixels")
    chat_template = CHAT_TEMPLATE
    counts_from_sizes = True
    end_of_turn = "<|im_end|>"
    pixel_concat: ClassVar[dict[str, int]] = {"pixel_values": 0, "image_grid_thw": 0}
    token_input_keys = ("mm_token_type_ids",)

    def processor_options(self) -> dict[str, Any]:
        return {}  # min_pixels / max_pixels are applied to the loaded processor's size below

    def configure_processor(self, processor: Any) -> Any:
        # transformers 5 keeps the pixel bounds as the image processor's size (shortest/longest edge)
        from transformers.image_utils import SizeDict

        size = processor.image_processor.size
        bounds = {"shortest_edge": size.shortest_edge, "longest_edge": size.longest_edge}
        if "min_pixels" in self.settings:
            bounds["shortest_edge"] = self.settings["min_pixels"]
        if "max_pixels" in self.settings:
            bounds["longest_edge"] = self.settings["max_pixels"]
        processor.image_processor.size = SizeDict(**bounds)
        return processor

    def freeze_groups(self) -> FreezeGroups:
        return FreezeGroups(vision=(VISION,), projector=(PROJECTOR,), llm=(LLM, "lm_head"))

    def lora_target_names(self, model: nn.Module, preset: str) -> list[str]:
        names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        if preset == "qkv":
            return [n for n in names if n.startswith(f"{LLM}.layers.") and n.rsplit(".", 1)[-1] in QKV]
        return [n for n in names if n.startswith((f"{LLM}.", f"{VISION}."))]

    tiny_special_tokens: ClassVar[dict[str, str]] = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
    tiny_extra_special_tokens: ClassVar[dict[str, str]] = {
        "image_token": "<|image_pad|>",
        "video_token": "<|video_pad|>",
        "vision_bos_token": "<|vision_start|>",
        "vision_eos_token": "<|vision_end|>",
    }
    tiny_added_tokens = ("<|im_start|>",)

    def tiny_config(self, tokenizer: Any) -> Any:
        from transformers import Qwen2_5_VLConfig

        return Qwen2_5_VLConfig(
            text_config=tiny_text_config(tokenizer),
            vision_config=dict(
                depth=2,
                hidden_size=32,
                intermediate_size=64,
                num_heads=2,
                patch_size=TINY_PATCH,
                spatial_merge_size=2,
                temporal_patch_size=2,
                window_size=4 * TINY_PATCH,
                out_hidden_size=64,
                fullatt_block_indexes=[1],
            ),
            **tiny_token_ids(tokenizer),
        )

    def tiny_processor(self, tokenizer: Any) -> Any:
        from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

        unit = TINY_PATCH * 2  # pixels per LLM token side
        sizes = dict(patch_size=TINY_PATCH, temporal_patch_size=2, merge_size=2)
        return Qwen2_5_VLProcessor(
            image_processor=Qwen2VLImageProcessor(
                min_pixels=unit * unit, max_pixels=4 * unit * 4 * unit, **sizes
            ),
            video_processor=Qwen2VLVideoProcessor(**sizes),
            tokenizer=tokenizer,
            chat_template=self.chat_template,
        )


QKV = ("q_proj", "k_proj", "v_proj")
TINY_PATCH = 8  # the tiny vision tower's patch size (the real one's is 14)
