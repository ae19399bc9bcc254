"""Qwen3-VL (dense Instruct checkpoints): transformers' `qwen3_vl`, Qwen2.5-VL's image rules at 16 px patches.

Images become 16 px patches merged 2x2 into one LLM token each (32 px per token), bounded by
`min_pixels` / `max_pixels` (model.processor_kwargs); features of a few vision layers also enter the
language model (deepstack), through mergers that count as the projector. Videos: frames sampled at
model.video_fps (2 by default), two per temporal patch, each pair introduced by its timestamp ("<0.2
seconds>"), all frames together bounded by model.video_max_pixels.

The tiny twin's chat template is built for the published Instruct format: ChatML turns with no default
system message, `<|vision_start|><|image_pad|><|vision_end|>` where an image goes.
"""

from __future__ import annotations

from typing import Any

from .base import FreezeGroups
from .qwen_vl import LLM, TINY_PATCH, VISION, QwenVL, qwen_capabilities, tiny_text_config, tiny_token_ids

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
PROJECTORS = (f"{VISION}.merger", f"{VISION}.deepstack_merger_list")


class Qwen3_VL(QwenVL):
    name = "qwen3_vl"
    capabilities = qwen_capabilities("Qwen3-VL")
    model_type = "qwen3_vl"
    chat_template = CHAT_TEMPLATE
    fused_norm = (0.0, "llama")
    fused_target = "model.language_model"

    def freeze_groups(self) -> FreezeGroups:
        return FreezeGroups(vision=(VISION,), projector=PROJECTORS, llm=(LLM, "lm_head"))

    def tiny_config(self, tokenizer: Any) -> Any:
        from transformers import Qwen3VLConfig

        return Qwen3VLConfig(
            text_config=tiny_text_config(tokenizer, head_dim=16),
            vision_config=dict(
                depth=2,
                hidden_size=32,
                intermediate_size=64,
                num_heads=2,
                patch_size=TINY_PATCH,
                spatial_merge_size=2,
                temporal_patch_size=2,
                out_hidden_size=64,
                num_position_embeddings=64,
                deepstack_visual_indexes=[0],
            ),
            **tiny_token_ids(tokenizer),
        )

    def tiny_processor_classes(self) -> tuple[type, type]:
        from transformers import Qwen3VLProcessor, Qwen3VLVideoProcessor

        return Qwen3VLProcessor, Qwen3VLVideoProcessor
