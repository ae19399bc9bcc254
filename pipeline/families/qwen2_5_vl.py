"""Qwen2.5-VL (3B, 7B): transformers' `qwen2_5_vl`, any number of images at their native resolution.

Images become patches of 14 px merged 2x2 into one LLM token each (28 px per token); the processor's
`min_pixels` / `max_pixels` (model.processor_kwargs) bound each image's size and so its token count. Videos:
frames sampled at model.video_fps (2 by default), two frames per temporal patch, each frame bounded by
model.video_max_pixels.
"""

from __future__ import annotations

from typing import Any, ClassVar

from .base import FreezeGroups
from .qwen_vl import LLM, TINY_PATCH, VISION, QwenVL, qwen_capabilities, tiny_text_config, tiny_token_ids

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

PROJECTOR = "model.visual.merger"


class Qwen2_5_VL(QwenVL):
    name = "qwen2_5_vl"
    model_type = "qwen2_5_vl"
    capabilities = qwen_capabilities("Qwen2.5-VL")
    chat_template = CHAT_TEMPLATE
    fused_norm = (0.0, "llama")
    fused_target = "model.language_model"
    vision_windows = True  # all but fullatt_block_indexes' blocks attend within 112-pixel windows
    # a video's seconds per temporal patch: its mRoPE temporal positions are spaced by it
    pixel_concat: ClassVar[dict[str, int]] = {**QwenVL.pixel_concat, "second_per_grid_ts": 0}

    def freeze_groups(self) -> FreezeGroups:
        return FreezeGroups(vision=(VISION,), projector=(PROJECTOR,), llm=(LLM, "lm_head"))

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

    def tiny_processor_classes(self) -> tuple[type, type]:
        from transformers import Qwen2_5_VLProcessor, Qwen2VLVideoProcessor

        return Qwen2_5_VLProcessor, Qwen2VLVideoProcessor
