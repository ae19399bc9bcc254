"""The vision patches a row costs the token budget: counted from image headers where the processor can, equal
to the encoded pixels, and weighted by the vision tower's size relative to the language model's."""

from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import Image

from pipeline.config import ConfigError, validate
from pipeline.data.images import ImageFiles
from pipeline.data.rows import Row
from pipeline.families import get_family
from pipeline.families.base import CHECKPOINTED_PATCH_SHARE
from pipeline.training.batching import budget_sizes
from tests.helpers import compose_config

HF_FAMILIES = ("qwen2_5_vl", "qwen3_vl", "minicpm_v4_6")


def row_with_images(tmp_path, sizes: list[tuple[int, int]]) -> Row:
    paths = []
    for k, (width, height) in enumerate(sizes):
        path = tmp_path / f"image{k}.png"
        Image.fromarray(np.random.RandomState(k).randint(0, 255, (height, width, 3), dtype=np.uint8)).save(
            path
        )
        paths.append(str(path))
    query = "".join("<image>" for _ in paths) + "What is here?"
    return Row(query, "Colours.", [], paths, None, "rows.jsonl:1")


@pytest.mark.parametrize("name", HF_FAMILIES)
def test_a_rows_patches_equal_its_encoded_pixels_and_weigh_by_the_towers_size(family_twin, tmp_path, name):
    family = get_family(name)
    assert family.capabilities.counts_patches
    bundle = family.load_bundle(family_twin(name))
    images = ImageFiles()
    count = family.patch_counter(bundle, images)
    for sizes in ([(200, 120)], [(64, 64), (150, 90)], []):
        row = row_with_images(tmp_path, sizes)
        sample = family._encode_row(
            bundle.processor, row, [images.load(p) for p in row.images], generation=False
        )
        encoded = family.sample_patches(bundle.processor, sample)
        assert count(row) == encoded and (encoded > len(sample) // 2 if sizes else encoded == 0)

    groups = family.freeze_groups()
    vision = sum(
        p.numel() * family.patch_share(bundle, n)
        for n, p in bundle.core.named_parameters()
        if groups.of(n) == "vision"
    )
    llm = sum(
        p.numel()
        for n, p in bundle.core.named_parameters()
        if groups.of(n) == "llm" and "embed_tokens" not in n and not n.startswith("lm_head")
    )
    assert 0 < family.patch_weight(bundle) == pytest.approx(vision / llm)  # the tower trains (lora=all, full)
    # its blocks checkpointed, a trained patch keeps its blocks' inputs only
    assert family.patch_weight(bundle, tower_checkpointed=True) == pytest.approx(
        vision / llm * CHECKPOINTED_PATCH_SHARE
    )
    # a frozen tower (lora=qkv) runs forward only: a third of a trained patch's FLOPs, checkpointed or not
    for name, param in bundle.core.named_parameters():
        param.requires_grad_(groups.of(name) != "vision")
    assert family.patch_weight(bundle) == pytest.approx(vision / llm / 3)
    assert family.patch_weight(bundle, tower_checkpointed=True) == pytest.approx(vision / llm / 3)


@pytest.mark.parametrize("name", HF_FAMILIES)
def test_a_row_encoded_to_count_its_tokens_is_not_encoded_again_for_its_patches(
    family_twin, tmp_path, monkeypatch, name
):
    """A family that counts a row by encoding it (MiniCPM-V 4.6: its slices are laid out in the text) keeps
    the patches of that encoding for the token budget: one encoding per row before training, not two, with
    the same count. A family that counts from image headers (the Qwen VLs) encodes none."""
    family = get_family(name)
    bundle = family.load_bundle(family_twin(name))
    images = ImageFiles()
    rows = [row_with_images(tmp_path, sizes) for sizes in ([(200, 120)], [(64, 64), (150, 90)])]
    fresh = [row_with_images(tmp_path, sizes) for sizes in ([(200, 120)], [(64, 64), (150, 90)])]
    expected = [family.patch_counter(bundle, images)(row) for row in fresh]  # encodes where it must

    encodings = []
    encode = family._encode_row_from
    monkeypatch.setattr(family, "_encode_row_from", lambda *a, **k: encodings.append(1) or encode(*a, **k))
    tokens = [family.token_counter(bundle, 2048, "delete", images)(row) for row in rows]
    counted = len(encodings)
    patches = [family.patch_counter(bundle, images)(row) for row in rows]
    assert patches == expected and all(n > 0 for n in tokens)
    assert len(encodings) == counted  # the budget encoded nothing more
    assert counted == (0 if family.counts_from_sizes else len(rows))
    assert [row.num_patches for row in rows] == ([None, None] if family.counts_from_sizes else expected)


def test_minicpm_v4_6s_blocks_after_the_window_merger_count_a_quarter_of_the_patches(family_twin):
    """MiniCPM-V 4.6's tower merges 2 x 2 windows of patches after block `insert_layer_id` (the 7th of 27 in
    the published model; the twin's first of two): the blocks after it run on a quarter of the patches."""
    family = get_family("minicpm_v4_6")
    bundle = family.load_bundle(family_twin("minicpm_v4_6"))
    assert bundle.core.config.insert_layer_id == 0
    layers = "model.vision_tower.encoder.layers."
    assert family.patch_share(bundle, f"{layers}0.mlp.fc1.weight") == 1.0
    assert family.patch_share(bundle, f"{layers}1.mlp.fc1.weight") == 0.25
    assert family.patch_share(bundle, "model.vision_tower.embeddings.patch_embedding.weight") == 1.0
    assert get_family("qwen2_5_vl").patch_share(bundle, f"{layers}1.mlp.fc1.weight") == 1.0


def test_minicpm_v2_counts_language_model_tokens_only(tiny_twin):
    family = get_family("minicpm_v2")
    bundle = family.load_bundle(tiny_twin)
    assert not family.capabilities.counts_patches
    assert family.patch_counter(bundle, ImageFiles()) is None and family.patch_weight(bundle) == 0.0


@pytest.mark.parametrize(
    ("overrides", "said"),
    [
        (["trainer.patch_weight=-1"], "trainer.patch_weight=-1 must be auto or a number >= 0"),
        (["trainer.patch_weight=many"], "trainer.patch_weight=many must be auto or a number >= 0"),
        (["trainer.patch_weight=0.5"], "trainer.patch_weight=0.5 runs for model.family=minicpm_v4_6, "),
    ],
)
def test_bad_patch_weights_are_refused_naming_the_key(overrides, said):
    with pytest.raises(ConfigError, match=re.escape(said)):
        validate(compose_config(["model=minicpm_v2_tiny", *overrides]))
    validate(compose_config(["model=qwen2_5_vl_tiny", "trainer.patch_weight=0.5"]))
    validate(compose_config(["model=minicpm_v2_tiny", "trainer.patch_weight=0"]))


def test_a_lora_qkv_step_of_coco_rows_fits_one_micro_batch_of_minicpm_v4_6_at_its_published_size():
    """MiniCPM-V 4.6 at its published sizes (built on the meta device), LoRA-qkv (the tower frozen), COCO's
    640 x 480 photos sliced as its processor slices them: a 16-row step fits one micro-batch of the 16384
    budget (auto on 80 GB cards). At the tower's plain parameter ratio it took four, and one micro-batch a
    step ran 2.8x faster on an H100 (bench/RESULTS.md, "Sixth GPU calls")."""
    import torch
    from transformers import AutoModelForImageTextToText, MiniCPMV4_6Config
    from transformers.models.minicpmv4_6 import MiniCPMV4_6ImageProcessor

    family = get_family("minicpm_v4_6")
    text = dict(
        model_type="qwen3_5_text", vocab_size=248320, hidden_size=1024, intermediate_size=3584,
        num_hidden_layers=24, num_attention_heads=8, num_key_value_heads=2, head_dim=256,
        linear_num_key_heads=16, linear_num_value_heads=16, linear_key_head_dim=128, linear_value_head_dim=128,
        linear_conv_kernel_dim=4, tie_word_embeddings=True,
    )  # fmt: skip
    vision = dict(
        hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
        image_size=980, patch_size=14, hidden_act="gelu_pytorch_tanh",
    )  # fmt: skip
    config = MiniCPMV4_6Config(
        text_config=text, vision_config=vision, image_size=448, insert_layer_id=6, tie_word_embeddings=True
    )
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)

    class Bundle:
        core = model

    targets = set(family.lora_target_names(model, "qkv"))
    for name, param in model.named_parameters():
        param.requires_grad_(name.rsplit(".", 1)[0] in targets)
    weight = family.patch_weight(Bundle())
    assert weight == pytest.approx(0.20, abs=0.01)

    processor = MiniCPMV4_6ImageProcessor(max_slice_nums=9, patch_size=14, scale_resolution=448)
    photo = Image.fromarray(np.random.RandomState(0).randint(0, 255, (480, 640, 3), dtype=np.uint8))
    patches = processor(images=[photo], return_tensors="pt")["pixel_values"].shape[-1] // 14
    tokens = 260  # its image tokens (~220 after the 16x merge), the query and a caption
    assert 3000 < patches < 3500
    assert 16 * budget_sizes([tokens], [patches], weight)[0] <= 16384
    groups = family.freeze_groups()
    vision = sum(p.numel() for n, p in model.named_parameters() if groups.of(n) == "vision")
    llm = sum(
        p.numel()
        for n, p in model.named_parameters()
        if groups.of(n) == "llm" and "embed_tokens" not in n and not n.startswith("lm_head")
    )
    assert 16 * budget_sizes([tokens], [patches], vision / llm)[0] > 3 * 16384  # the tower's plain ratio
    # lora=all and full fine-tuning train the tower with its blocks checkpointed (auto on one GPU): the step
    # fits one micro-batch too, where the trained tower's plain weight cut it into three (bench/RESULTS.md,
    # "Fourteenth GPU calls": 18.90 samples/s in one against 9.61 in three, on one H100)
    for param in model.parameters():
        param.requires_grad_(True)
    trained = family.patch_weight(Bundle())
    assert 3 * 16384 >= 16 * budget_sizes([tokens], [patches], trained)[0] > 2 * 16384
    checkpointed = family.patch_weight(Bundle(), tower_checkpointed=True)
    assert 16 * budget_sizes([tokens], [patches], checkpointed)[0] <= 16384
