"""The Qwen VLs' shared facts (Qwen2.5-VL and Qwen3-VL): ChatML turns, image pixel bounds, video frame sampling,
the module names of the language model and the vision tower, LoRA's q/k/v, and the tiny twins' language-model
sizes and tokens."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from .base import Bundle, Capabilities, VideoInfo
from .hf_native import HFNativeFamily, native_capabilities, stream_metadata
from .packing import Positions, text_positions

LLM = "model.language_model"
VISION = "model.visual"
QKV = ("q_proj", "k_proj", "v_proj")
# the tiny vision towers' patch size (the real ones': 14 for Qwen2.5-VL, 16 for Qwen3-VL)
TINY_PATCH = 8

# frames sampled per second where the checkpoint's video processor states none (Qwen2.5-VL's): qwen-vl-utils'
# FPS, which ms-swift samples at
DEFAULT_VIDEO_FPS = 2.0
VIDEO_KEYS = ("video_fps", "video_max_frames", "video_max_pixels")


def qwen_capabilities(display_name: str) -> Capabilities:
    """Returns what a Qwen VL can do: every HF-native family's capabilities, its video settings, its compiled
    vision blocks, and its trained tower's budget. LoRA that trains the tower (lora=all) keeps every
    activation in micro-batches of up to 8192 tokens on cards of 120 GiB or more (an H200), for the sizes
    measured: without the recompute Qwen2.5-VL-3B ran 23.31 samples/s at 58.1 GB against 17.35 with every
    block checkpointed, Qwen3-VL-4B 35.03 at 67.5 GB against 25.73 (one H100 80GB; bench/RESULTS.md,
    "Fourteenth GPU calls"). A kept language-model token is up to ~6.7 MB there, so 80 GB cards, larger models
    and 16384-token micro-batches keep checkpointing every block."""
    return native_capabilities(
        display_name,
        video_config_keys=VIDEO_KEYS,
        compiles_vision=True,
        trained_tower_budget=8192,
        trained_tower_card_gib=120,
        trained_tower_max_parameters=5_000_000_000,
    )


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


class MRopePositions:
    """The Qwen VLs' position rows [text; t; h; w] (4, B, L) of a right-padded batch, each row's as the model
    computes them for that sample alone: transformers' own `get_rope_index` of the model class (it loops
    over the rows and needs only the config, the ids, mm_token_type_ids and the image grids), run on this
    stand-in that holds the config and no weights, so that DataLoader workers compute them on the CPU.
    The text row (0, 1, 2, ... per sample) is what transformers' Qwen text models read the packed
    segments from when it leads the three mRoPE rows."""

    def __init__(self, model_class: type, config: Any) -> None:
        self.model_class = model_class  # e.g. Qwen2_5_VLModel, whose methods run with this object as self
        self.config = config

    def get_vision_position_ids(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.model_class.get_vision_position_ids(self, *args, **kwargs)

    def __call__(self, padded: Mapping[str, Any]) -> torch.Tensor:
        rope, _ = self.model_class.get_rope_index(
            self,
            input_ids=padded["input_ids"],
            mm_token_type_ids=padded["mm_token_type_ids"],
            image_grid_thw=padded.get("image_grid_thw"),
            video_grid_thw=padded.get("video_grid_thw"),
            second_per_grid_ts=padded.get("second_per_grid_ts"),  # Qwen2.5-VL's temporal spacing
            attention_mask=padded["attention_mask"],
        )
        return torch.cat([text_positions(padded), rope.to(torch.long)])


class QwenVL(HFNativeFamily):
    """What Qwen2.5-VL and Qwen3-VL share: ChatML turns, pixel bounds, the mm_token_type_ids input, the LLM's
    q/k/v for LoRA, and the tiny twins' tokens."""

    max_length = 32768
    setting_keys = ("min_pixels", "max_pixels")
    resolution_setting = (
        "model.processor_kwargs.max_pixels (pixels per image; its image tokens scale with them)"
    )
    counts_from_sizes = True
    end_of_turn = "<|im_end|>"
    pixel_concat: ClassVar[dict[str, int]] = {
        "pixel_values": 0,
        "image_grid_thw": 0,
        "pixel_values_videos": 0,
        "video_grid_thw": 0,
    }
    token_input_keys = ("mm_token_type_ids",)
    vision_tower = VISION  # its blocks compile on padded patch sequences (trainer.compile_vision)

    def processor_options(self) -> dict[str, Any]:
        return {}  # min_pixels / max_pixels are applied to the loaded processor's size below

    def video_sampling(self) -> str:
        fps = self.video_settings.get("video_fps")
        frames = self.video_settings.get("video_max_frames")
        pixels = self.video_settings.get("video_max_pixels")
        return (
            f"frames are sampled at model.video_fps={fps if fps is not None else 'the processor default (2)'} "
            f"per second, at most model.video_max_frames={frames if frames is not None else 'its default (768)'}"
            f", within model.video_max_pixels={pixels if pixels is not None else 'its default'}"
        )

    def configure_video_processor(self, video_processor: Any) -> None:
        """Applies the model.video_* settings to the video processor: `fps` and `max_frames` (its sampling),
        `size.longest_edge` (video_max_pixels: Qwen2.5-VL's bound per frame, Qwen3-VL's over all sampled
        frames, each processor's own rule; its lower bound is kept at or below it)."""
        from transformers.image_utils import SizeDict

        settings = self.video_settings
        if getattr(video_processor, "fps", None) is None:
            video_processor.fps = DEFAULT_VIDEO_FPS
        if "video_fps" in settings:
            video_processor.fps = float(settings["video_fps"])
        if "video_max_frames" in settings:
            video_processor.max_frames = int(settings["video_max_frames"])
        if "video_max_pixels" in settings:
            most = int(settings["video_max_pixels"])
            size = video_processor.size
            video_processor.size = SizeDict(shortest_edge=min(size.shortest_edge, most), longest_edge=most)
        if getattr(video_processor, "cap_pixels_per_frame", False) is None:
            video_processor.cap_pixels_per_frame = (
                False  # size.longest_edge as it is (no warning on each call)
            )

    def video_frame_picker(self, processor: Any) -> Callable[[VideoInfo], Sequence[int]]:
        """Samples as the video processor does (its `sample_frames` at its fps and frame bounds); a stream
        shorter than one temporal patch repeats its last frame to fill one (the processors need a whole one)."""
        video_processor = processor.video_processor

        def pick(info: VideoInfo) -> list[int]:
            patch = int(video_processor.temporal_patch_size)
            if info.frames < patch:
                return [min(k, info.frames - 1) for k in range(patch)]
            return [int(i) for i in video_processor.sample_frames(stream_metadata(info))]

        return pick

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
        self.configure_video_processor(processor.video_processor)
        return processor

    def packed_positions(self, bundle: Bundle) -> Positions:
        core = bundle.core
        return MRopePositions(type(core.model), core.config)

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

    def tiny_processor_classes(self) -> tuple[type, type]:
        """Returns the family's transformers processor and video processor classes, for its tiny twin."""
        raise NotImplementedError

    def tiny_processor(self, tokenizer: Any) -> Any:
        from transformers import Qwen2VLImageProcessor

        processor_cls, video_cls = self.tiny_processor_classes()
        unit = TINY_PATCH * 2  # pixels per LLM token side
        sizes = dict(patch_size=TINY_PATCH, temporal_patch_size=2, merge_size=2)
        return processor_cls(
            image_processor=Qwen2VLImageProcessor(
                min_pixels=unit * unit, max_pixels=4 * unit * 4 * unit, **sizes
            ),
            video_processor=video_cls(**sizes),
            tokenizer=tokenizer,
            chat_template=self.chat_template,
        )
