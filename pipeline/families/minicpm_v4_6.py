"""MiniCPM-V 4.6: transformers' `minicpmv4_6` (SigLIP tower with a window merger, Qwen3.5 language model).

Several images per conversation; each is sliced like MiniCPM-V-2 (`max_slice_nums`, `scale_resolution`)
and reduced 16x (`downsample_mode: 16x`) or 4x (model.processor_kwargs). The language model mixes
full-attention layers (q/k/v projections) and linear-attention layers (one fused q/k/v projection,
`in_proj_qkv`); `lora=qkv` targets both kinds. Videos: one frame per second (its processor's rule), at most
model.video_max_frames (128 by default; a longer video is sampled evenly over its length), each frame an
image of its own (`<|video_pad|>` tokens).

The tiny twin's chat template is built for the published format (ChatML turns, `<|image_pad|>` where an
image goes, expanded by the processor, and the thinking switch: with `enable_thinking` false an empty
`<think></think>` block opens every assistant turn, as the model's fine-tuning guide recommends).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from . import linear_attention, vision_compile
from .base import EncodedSample, FreezeGroups, VideoInfo
from .hf_native import HFNativeFamily, native_capabilities, stream_metadata

CHAT_TEMPLATE = (
    "{% set think = enable_thinking is defined and enable_thinking %}"
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['role'] == 'assistant' and not think %}<think>\n\n</think>\n\n{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' or 'image' in item or 'image_url' in item %}<|image_pad|>"
    "{% elif item['type'] == 'video' or 'video' in item %}<|video_pad|>"
    "{% elif 'text' in item %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if think %}<think>\n{% else %}<think>\n\n</think>\n\n{% endif %}"
    "{% endif %}"
)

LLM = "model.language_model"
VISION = "model.vision_tower"
PROJECTOR = "model.merger"
QKV_SUFFIXES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "linear_attn.in_proj_qkv")
TINY_PATCH = 8  # the tiny vision tower's patch size (the real one's is 14)


class MiniCPMV4_6(HFNativeFamily):
    name = "minicpm_v4_6"
    model_type = "minicpmv4_6"
    # its vision layers compile (trainer.compile_vision=true), but auto leaves them eager: on an H100 the
    # compiled tower (frozen, LoRA-qkv) measured 68.43 samples/s against 68.15 eager (bench/RESULTS.md,
    # 2026-12-06), not worth the padding and the compile time of a fresh machine. LoRA that trains its tower
    # (lora=all) checkpoints the tower's blocks only: 10.93 samples/s at 10.3 GB peak against 6.79 (the same
    # H100) and 9.04 (another) at 8.2 GB with every block checkpointed (three 16384-token micro-batches a
    # step; bench/RESULTS.md, "Thirteenth GPU calls"). Its checkpointed patches then count an eighth in the
    # budget (base.CHECKPOINTED_PATCH_SHARE): a 16-row step of COCO photos is one micro-batch, 18.90 samples/s
    # at 20.7 GB against 9.61 in three (lora=all, one H100), and full fine-tuning 20.95 at 32.4 GB against
    # 13.31 (another H100; "Fourteenth GPU calls")
    capabilities = native_capabilities(
        "MiniCPM-V 4.6",
        linear_attention=True,
        video_config_keys=("video_max_frames",),
        compiles_vision=True,
        compiles_vision_by_default=False,
        checkpoints_tower_only=True,
    )
    max_length = 32768
    setting_keys = ("max_slice_nums", "scale_resolution", "slice_mode")
    resolution_setting = (
        "model.processor_kwargs.max_slice_nums (slices per image; each slice adds its image tokens)"
    )
    chat_template = CHAT_TEMPLATE
    fused_norm = (1.0, "gemma")  # Qwen3.5: x * (1 + weight), all in fp32
    fused_target = "model.language_model"  # its Qwen3.5 language model
    end_of_turn = "<|im_end|>"
    min_transformers = ("5.19", "older releases fail on an image sliced into pieces of different sizes")
    # Every image of a batch is packed along the last axis of one (1, C, patch, L) tensor; video frames too.
    pixel_concat: ClassVar[dict[str, int]] = {
        "pixel_values": -1,
        "target_sizes": 0,
        "pixel_values_videos": -1,
        "target_sizes_videos": 0,
    }

    # every slice's patch grid: the vision tower and the merger read them image by image in Python
    # (transformers moves what it needs to the device itself)
    host_inputs: ClassVar[frozenset[str]] = frozenset({"target_sizes", "target_sizes_videos"})

    def sample_patches(self, processor: Any, sample: EncodedSample) -> int:
        # every slice's (and frame's) patches side by side along the last axis of one (1, C, patch, L) tensor
        patch = int(processor.image_processor.patch_size)
        return sum(
            int(sample.pixel_inputs[key].shape[-1]) // patch
            for key in ("pixel_values", "pixel_values_videos")
            if key in sample.pixel_inputs
        )

    def video_sampling(self) -> str:
        frames = self.video_settings.get("video_max_frames")
        shown = frames if frames is not None else "its processor's default (128)"
        return f"one frame per second is sampled, at most model.video_max_frames={shown}"

    def configure_processor(self, processor: Any) -> Any:
        if "video_max_frames" in self.video_settings:
            processor.video_processor.max_num_frames = int(self.video_settings["video_max_frames"])
        return processor

    def video_frame_picker(self, processor: Any) -> Callable[[VideoInfo], Sequence[int]]:
        """Samples as the video processor does (`sample_frames`: one frame a second, at most max_num_frames)."""
        video_processor = processor.video_processor

        def pick(info: VideoInfo) -> list[int]:
            return [int(i) for i in video_processor.sample_frames(stream_metadata(info))] or [0]

        return pick

    def patch_share(self, bundle: Any, name: str) -> float:
        """The tower's blocks after its window merger (`insert_layer_id`, the 7th of 27 in the published
        model) run on a quarter of the patches (2 x 2 windows merged into one)."""
        prefix = f"{VISION}.encoder.layers."
        if not name.startswith(prefix):
            return 1.0
        config = bundle.core.config
        index = int(name[len(prefix) :].split(".", 1)[0])
        window = config.vision_config.window_kernel_size
        return 1.0 / (window[0] * window[1]) if index > config.insert_layer_id else 1.0

    def freeze_groups(self) -> FreezeGroups:
        return FreezeGroups(vision=(VISION,), projector=(PROJECTOR,), llm=(LLM, "lm_head"))

    vision_tower = VISION  # its encoder layers compile on padded patch sequences (trainer.compile_vision)

    def pad_vision_tower(self, tower: nn.Module) -> None:
        pad_tower(tower)

    def vision_blocks(self, tower: nn.Module) -> Sequence[nn.Module]:
        return tower.encoder.layers

    def packs_padding_free_on(self, device: torch.device) -> bool:
        """Not where flash-linear-attention fails on the GPU (model.linear_attention=auto resolving to
        PyTorch code there): a packed row then runs its linear-attention layers on transformers' PyTorch
        code over a padded batch of its samples, outside the compiled graph, which is unmeasured on a GPU
        (when it ran them one sample at a time, traced by the compiler, an H200 made no step in 45 s against
        16.5 samples/s padded), so auto keeps the padded batch there; trainer.packing=true asks for it;
        model.linear_attention=torch asks for that code."""
        if (
            device.type == "cuda"
            and linear_attention.resolve(self.linear_attention, device, quiet=True) == "torch"
        ):
            return False
        return super().packs_padding_free_on(device)

    def enable_packing(self, language_model: nn.Module) -> None:
        """The attention layers as every family's; the linear-attention layers restart their convolution
        and state at every sample of a packed row (pipeline/families/linear_attention.py). Positions are
        plain 0, 1, 2, ... per sample: the Qwen3.5 text model gives every token, image or text, the same
        position on its four rows when none are passed, which is what the model does for a sample alone."""
        super().enable_packing(language_model)
        bound = linear_attention.choice_of(language_model)  # resolved at load
        linear_attention.enable(language_model, bound or self.linear_attention)

    def load(
        self, path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
    ) -> tuple[nn.Module, Any]:
        """Loads the model with model.linear_attention bound to its linear-attention layers
        (linear_attention.py: flash-linear-attention's kernels or transformers' PyTorch code)."""
        choice = linear_attention.resolve(self.linear_attention, torch.device(device))
        model, processor = super().load(path, dtype, device)
        linear_attention.enable(self.language_model(model), choice)
        return model, processor

    def lora_target_names(self, model: nn.Module, preset: str) -> list[str]:
        names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        if preset == "qkv":
            return [n for n in names if n.startswith(f"{LLM}.layers.") and n.endswith(QKV_SUFFIXES)]
        return [n for n in names if n.startswith((f"{LLM}.", f"{VISION}.", f"{PROJECTOR}."))]

    tiny_special_tokens: ClassVar[dict[str, str]] = {
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": "<unk>",
    }
    tiny_extra_special_tokens: ClassVar[dict[str, str]] = {
        "image_token": "<|image_pad|>",
        "video_token": "<|video_pad|>",
        "image_start_token": "<image>",
        "image_end_token": "</image>",
        "slice_start_token": "<slice>",
        "slice_end_token": "</slice>",
        "image_id_start_token": "<image_id>",
        "image_id_end_token": "</image_id>",
    }
    tiny_added_tokens = ("<think>", "</think>")

    def tiny_config(self, tokenizer: Any) -> Any:
        from transformers import MiniCPMV4_6Config

        return MiniCPMV4_6Config(
            text_config=dict(
                model_type="qwen3_5_text",
                vocab_size=len(tokenizer),
                hidden_size=64,
                head_dim=16,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                hidden_act="silu",
                max_position_embeddings=4096,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]},
                tie_word_embeddings=True,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                layer_types=["full_attention", "linear_attention"],
                linear_conv_kernel_dim=2,
                linear_key_head_dim=16,
                linear_value_head_dim=16,
                linear_num_key_heads=2,
                linear_num_value_heads=4,
            ),
            vision_config=dict(
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=2,
                intermediate_size=64,
                image_size=TINY_RESOLUTION,
                patch_size=TINY_PATCH,
                hidden_act="gelu_pytorch_tanh",
            ),
            image_token_id=tokenizer.image_token_id,
            video_token_id=tokenizer.video_token_id,
            image_size=TINY_RESOLUTION,
            insert_layer_id=0,
            tie_word_embeddings=True,
        )

    def tiny_processor(self, tokenizer: Any) -> Any:
        from transformers.models.minicpmv4_6 import MiniCPMV4_6ImageProcessor, MiniCPMV4_6Processor
        from transformers.models.minicpmv4_6.video_processing_minicpmv4_6 import MiniCPMV4_6VideoProcessor

        sizes = dict(patch_size=TINY_PATCH, scale_resolution=TINY_RESOLUTION)
        return MiniCPMV4_6Processor(
            image_processor=MiniCPMV4_6ImageProcessor(max_slice_nums=4, **sizes),
            video_processor=MiniCPMV4_6VideoProcessor(max_slice_nums=1, **sizes),
            tokenizer=tokenizer,
            chat_template=self.chat_template,
        )


TINY_RESOLUTION = 64  # the tiny twin's slice resolution (the real one's is 448)


def pad_tower(tower: nn.Module) -> None:
    """Gives the SigLIP tower a forward that, in a training step (training mode, gradients on), runs its
    encoder layers on a patch sequence of a few static lengths, so that compiled layers trace a graph per
    length rather than per micro-batch (the Qwen VLs' towers: vision_compile.py, whose lengths and piece
    tables this uses).

    The patches are padded up to `vision_compile.bucket_length` as one more image of zero pixels, `window`
    patches high (the window merger's side, 2), so the position table, the window merger and the
    downsampling cover it as they cover the images; its patches attend among themselves only (pieces of
    their own in `cu_seqlens`, then empty pieces up to a power-of-two count); the longest piece each
    attention is told of is a bucketed length too. Its rows are dropped from the last hidden state, so the
    merger, the image features and every gradient are those of the unpadded tower. Evaluation, generation
    and calls with keyword arguments of their own run the tower as it is."""
    original = tower.forward

    def forward(pixel_values: torch.Tensor, target_sizes: torch.Tensor | None = None, **kwargs: Any) -> Any:
        use_merger = kwargs.pop("use_vit_merger", True)
        if not (tower.training and torch.is_grad_enabled()) or target_sizes is None or kwargs:
            return original(pixel_values, target_sizes=target_sizes, use_vit_merger=use_merger, **kwargs)
        return _padded_forward(tower, pixel_values, target_sizes, use_merger)

    forward.padded_for_training = True  # type: ignore[attr-defined]
    tower.forward = forward


def _pieces(sizes: torch.Tensor, total: int) -> tuple[torch.Tensor, int]:
    """Returns the cu_seqlens of images of patch grids `sizes` (h, w; on the host) followed by padding up to
    `total` patches, and the longest piece the attention is told of (a bucketed length)."""
    areas = (sizes[:, 0] * sizes[:, 1]).to(torch.int32)
    real = int(areas.sum())
    bounds = torch.cat([areas.new_zeros(1), areas.cumsum(0, dtype=torch.int32)])
    longest = min(vision_compile.bucket_length(int(areas.max())), total)
    return vision_compile.padded_bounds(bounds, real, total, longest), longest


def _padded_forward(
    tower: nn.Module, pixel_values: torch.Tensor, target_sizes: torch.Tensor, use_merger: bool
):
    """The tower's forward (embeddings, encoder layers, the window merger after `insert_layer_id`, the
    final norm) on the patch sequence padded to a static length; returns its output without the padding."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    config = tower.config
    sizes = target_sizes.cpu()
    real = int((sizes[:, 0] * sizes[:, 1]).sum())
    total = vision_compile.bucket_length(real)
    window = int(config.window_kernel_size[0]) if use_merger else 1
    if (total - real) % (window * window):
        raise ValueError(f"the vision tower's {real} patches are not whole {window} x {window} windows")
    padded = (
        torch.cat([sizes, sizes.new_tensor([[window, (total - real) // window]])]) if total > real else sizes
    )
    patch = int(config.patch_size)
    pixels = F.pad(pixel_values, (0, (total - real) * patch))
    hidden = tower.embeddings(pixels, target_sizes=padded)
    device = hidden.device
    cu_seqlens, longest = _pieces(sizes, total)
    cu_seqlens = cu_seqlens.to(device)
    insert = int(config.insert_layer_id) if use_merger else -1
    for index, layer in enumerate(tower.encoder.layers):
        hidden = layer(hidden, attention_mask=None, cu_seqlens=cu_seqlens, max_seqlen=longest)
        if index == insert:
            hidden = tower.vit_merger(hidden, padded)
            # one patch a window from here (transformers' get_downsampled_inputs)
            sizes, padded = sizes // window, padded // window
            real, total = real // (window * window), total // (window * window)
            cu_seqlens, longest = _pieces(sizes, total)
            cu_seqlens = cu_seqlens.to(device)
    hidden = tower.post_layernorm(hidden)
    return BaseModelOutputWithPooling(last_hidden_state=hidden[:, :real])
