"""The vision tower: timm's SigLIP-so400m ViT without its attention pool and (officially) its last block."""

from __future__ import annotations

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from .configuration import MiniCPMVConfig


def build_vision_tower(config: MiniCPMVConfig) -> VisionTransformer:
    """Returns the timm ViT with the official keys: no class token, no pool head, `norm` kept."""
    sizes = config.vision_sizes()
    depth = sizes["depth"] - (1 if config.drop_vision_last_layer else 0)
    tower = VisionTransformer(
        img_size=sizes["img_size"],
        patch_size=sizes["patch_size"],
        embed_dim=sizes["embed_dim"],
        depth=depth,
        num_heads=sizes["num_heads"],
        mlp_ratio=sizes["mlp_dim"] / sizes["embed_dim"],
        class_token=False,
        global_pool="",
        num_classes=0,
        dynamic_img_size=True,
        dynamic_img_pad=True,
    )
    if tower.blocks[0].mlp.fc1.out_features != sizes["mlp_dim"]:
        raise ValueError(f"vision mlp_dim {sizes['mlp_dim']} is not reachable through timm's mlp_ratio")
    return tower


def patch_grid(pixel_values: torch.Tensor, patch_size: int) -> tuple[int, int]:
    """Returns (rows, cols) of patches for [.., H, W] pixels; timm pads the right and bottom edges."""
    h, w = pixel_values.shape[-2:]
    return -(-h // patch_size), -(-w // patch_size)


def vision_tower_features(tower: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """Returns [N, rows*cols, embed_dim] patch features for a batch of same-size images [N, 3, H, W].

    Through the module call (no pool, no head: the same as `forward_features`), so that module hooks fire:
    DeepSpeed ZeRO-3 gathers the tower's own weights (`pos_embed`) in its forward and backward hooks.
    """
    return tower(pixel_values)
