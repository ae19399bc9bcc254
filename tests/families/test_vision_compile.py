"""The Qwen VLs' vision blocks on padded patch sequences, compiled for training steps (vision_compile.py), on
the tiny twins, CPU, fp32: the padded tower gives the unpadded image features; under lora=all the loss and
every gradient (vision tower's and projector's included) are those of the eager, unpadded model; a second
micro-batch with other images of the same bucket replays the traced graphs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.testing import CompileCounterWithBackend

from pipeline.families import get_family, vision_attention, vision_compile
from pipeline.families.base import Bundle, messages_from_row
from pipeline.families.layer_compile import is_compiled_for_training
from pipeline.training.plan import resolve_compile_vision
from tests.families.test_families import picture
from tests.helpers import loss_and_grads

QWEN_VLS = ("qwen2_5_vl", "qwen3_vl")
# two micro-batches of two images each: other sizes, the same padded length and counts of pieces
FIRST = ((64, 48), (48, 64))
SECOND = ((64, 64), (32, 48))


def test_patch_counts_round_up_to_a_quarter_of_their_octave():
    lengths = {n: vision_compile.bucket_length(n) for n in (1, 256, 257, 1024, 1025, 1280, 1281, 5000)}
    assert lengths == {1: 256, 256: 256, 257: 320, 1024: 1024, 1025: 1280, 1280: 1280, 1281: 1536, 5000: 5120}
    assert all(n % 64 == 0 for n in lengths.values())


def test_the_padding_is_its_own_pieces_then_empty_ones_up_to_a_power_of_two():
    bounds = torch.tensor([0, 48, 80], dtype=torch.int32)
    padded = vision_compile.padded_bounds(bounds, 80, 256, 64)
    assert padded.tolist() == [0, 48, 80, 144, 208, 256, 256, 256, 256]
    assert vision_compile.padded_bounds(bounds, 80, 80, 64).tolist() == [0, 48, 80, *[80] * 6]
    many = torch.arange(0, 13 * 4, 4, dtype=torch.int32)  # 12 pieces, no padding
    assert vision_compile.padded_bounds(many, 48, 48, 64).numel() == 17
    with pytest.raises(ValueError, match="not at the 50 patches"):
        vision_compile.padded_bounds(bounds, 50, 256, 64)


def test_compile_vision_auto_follows_compile_and_true_says_what_is_missing():
    assert resolve_compile_vision("auto", True, True) is True
    assert resolve_compile_vision("auto", True, False) is False
    assert resolve_compile_vision("auto", False, True) is False
    assert resolve_compile_vision(False, True, True) is False
    assert resolve_compile_vision(True, True, True) is True
    # a family that compiles its blocks on request only (MiniCPM-V 4.6: measured no faster): auto leaves
    # them eager, true compiles them
    assert resolve_compile_vision("auto", True, True, by_default=False) is False
    assert resolve_compile_vision(True, True, True, by_default=False) is True
    assert not get_family("minicpm_v4_6").capabilities.compiles_vision_by_default
    assert all(get_family(name).capabilities.compiles_vision_by_default for name in QWEN_VLS)
    with pytest.raises(ValueError, match="trainer.compile resolves off"):
        resolve_compile_vision(True, False, True)
    with pytest.raises(ValueError, match="model.vision_attention=varlen"):
        resolve_compile_vision(True, True, False)


def batch_of(family, processor, sizes, seed: int) -> dict:
    samples = [
        family.encode(
            processor,
            messages_from_row("<image>What is it?", f"A thing of size {w} by {h}."),
            [picture(w, h, seed=seed + i)],
        )
        for i, (w, h) in enumerate(sizes)
    ]
    return family.collate_for_training(processor, samples)


def loaded(family_twin, name: str, preset: str):
    """The twin with the tower on VARLEN (its CPU path) and a LoRA adapter whose B matrices are not zero."""
    family = get_family(name)
    model, processor = family.load(family_twin(name))
    vision_attention.enable(model)
    torch.manual_seed(0)
    model = family.apply_lora(model, family.lora_config(model, preset, r=4, alpha=8, dropout=0.0))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)
    model.train()
    return family, model, processor


def assert_same(loss, grads, ref_loss, ref_grads) -> None:
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    assert grads.keys() == ref_grads.keys()
    assert any(".visual.blocks." in n for n in grads) and any(".visual.merger." in n for n in grads)
    for key, grad in grads.items():
        cosine = float(F.cosine_similarity(grad.flatten(), ref_grads[key].flatten(), dim=0))
        assert cosine >= 0.999, key
        torch.testing.assert_close(grad, ref_grads[key], atol=1e-5, rtol=1e-4, msg=key)


@pytest.mark.parametrize("name", QWEN_VLS)
def test_the_padded_tower_gives_the_unpadded_image_features(family_twin, name):
    family = get_family(name)
    model, processor = family.load(family_twin(name))
    vision_attention.enable(model)
    batch = batch_of(family, processor, FIRST, seed=0)
    tower = model.get_submodule(family.vision_tower).train()
    pixels, grid = batch["pixel_values"], batch["image_grid_thw"]
    reference = tower(pixels, grid_thw=grid)
    vision_compile.pad_tower(tower, windows=family.vision_windows)
    assert vision_compile.is_padded_for_training(tower)
    lengths = []
    hook = tower.blocks[0].register_forward_hook(lambda m, args, out: lengths.append(out.shape[0]))
    padded = tower(pixels, grid_thw=grid)
    with torch.no_grad():
        tower(pixels, grid_thw=grid)  # no training step: the tower as it is
    hook.remove()
    assert lengths == [256, pixels.shape[0]]
    torch.testing.assert_close(padded.pooler_output, reference.pooler_output, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(padded.last_hidden_state, reference.last_hidden_state, atol=1e-5, rtol=1e-5)
    for ours, theirs in zip(
        getattr(padded, "deepstack_features", []), getattr(reference, "deepstack_features", []), strict=True
    ):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", QWEN_VLS)
def test_a_video_and_an_image_padded_give_their_unpadded_features(family_twin, name):
    """Frames of a video are pieces of their own in full attention (and windowed frame by frame): the
    padding after them changes none of their features."""
    family = get_family(name)
    model, _ = family.load(family_twin(name))
    vision_attention.enable(model)
    tower = model.get_submodule(family.vision_tower).train()
    grid = torch.tensor([[3, 4, 6], [1, 8, 4]])  # a clip of 3 temporal patches, then an image
    width = tower.patch_embed.proj.weight[0].numel()
    pixels = torch.randn(int(grid.prod(-1).sum()), width, generator=torch.Generator().manual_seed(0))
    reference = tower(pixels, grid_thw=grid)
    vision_compile.pad_tower(tower, windows=family.vision_windows)
    padded = tower(pixels, grid_thw=grid)
    torch.testing.assert_close(padded.pooler_output, reference.pooler_output, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", QWEN_VLS)
def test_compiled_vision_blocks_train_as_the_eager_tower_and_replay_for_other_images(family_twin, name):
    family, model, processor = loaded(family_twin, name, "all")
    first, second = batch_of(family, processor, FIRST, seed=0), batch_of(family, processor, SECOND, seed=5)
    assert first["pixel_values"].shape != second["pixel_values"].shape
    tower = model.get_base_model().get_submodule(family.vision_tower)
    shapes = [
        {
            k: tuple(v.shape) if torch.is_tensor(v) else v
            for k, v in vision_compile.static_tables(
                tower, b["image_grid_thw"], b["pixel_values"].shape[0], family.vision_windows
            )["tables"].items()
            if k != "window_index"
        }
        for b in (first, second)
    ]
    assert shapes[0] == shapes[1]  # the premise: the same static shapes for the blocks
    eager = [loss_and_grads(family, model, b) for b in (first, second)]

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    bundle = Bundle(model, processor, family_twin(name), "base")
    assert family.compile_vision(bundle, backend=counter) == len(tower.blocks) >= 2
    assert all(is_compiled_for_training(block) for block in tower.blocks)
    assert_same(*loss_and_grads(family, model, first), *eager[0])
    traced = counter.frame_count
    # one graph per kind of block: windowed or full attention (Qwen2.5-VL; other cu_seqlens), and the first
    # block apart, whose input (from the frozen patch embedding) carries no gradient
    full = set(getattr(tower, "fullatt_block_indexes", None) or range(len(tower.blocks)))
    assert traced == len({(i in full, i == 0) for i in range(len(tower.blocks))})
    assert_same(*loss_and_grads(family, model, second), *eager[1])
    assert counter.frame_count == traced  # other images, same bucket: no new graph

    model.eval()
    with torch.no_grad():
        family.loss_outputs(model, first)
    assert counter.frame_count == traced  # evaluation runs the eager blocks on the unpadded tower


# MiniCPM-V 4.6: two micro-batches of two images each (slices of 8 x 8 patches and smaller), other patch counts,
# the same padded lengths (256, then 64 after the window merger) and counts of pieces
FIRST_4_6 = ((64, 48), (48, 96))
SECOND_4_6 = ((64, 64), (40, 56))


def minicpm_v4_6_features(model, batch, use_merger: bool = True):
    downsample = None if use_merger else "4x"
    return model.model.get_image_features(batch["pixel_values"], batch["target_sizes"], downsample)


@pytest.mark.parametrize("use_merger", [True, False], ids=["16x", "4x"])
def test_minicpm_v4_6_padded_tower_gives_the_unpadded_image_features(family_twin, use_merger):
    """The padding (one more image of zero pixels, two patches high) sits after the images in every table:
    the position ids, the window merger's windows, the pieces of full attention before and after the merger;
    its rows are dropped before the merger, so the slices' features are the unpadded tower's."""
    family = get_family("minicpm_v4_6")
    model, processor = family.load(family_twin("minicpm_v4_6"))
    vision_attention.enable(model)
    batch = batch_of(family, processor, FIRST_4_6, seed=0)
    tower = model.get_submodule(family.vision_tower).train()
    reference = minicpm_v4_6_features(model, batch, use_merger)
    family.pad_vision_tower(tower)
    assert vision_compile.is_padded_for_training(tower)
    lengths = []
    hooks = [
        layer.register_forward_hook(lambda m, args, out: lengths.append(out.shape[1]))
        for layer in tower.encoder.layers
    ]
    padded = minicpm_v4_6_features(model, batch, use_merger)
    with torch.no_grad():
        minicpm_v4_6_features(model, batch, use_merger)  # no training step: the tower as it is
    for hook in hooks:
        hook.remove()
    real = batch["pixel_values"].shape[-1] // processor.image_processor.patch_size
    assert real < 256
    assert lengths == ([256, 64, real, real // 4] if use_merger else [256, 256, real, real])
    torch.testing.assert_close(padded.last_hidden_state, reference.last_hidden_state, atol=1e-5, rtol=1e-5)
    assert len(padded.pooler_output) == len(reference.pooler_output) == batch["target_sizes"].shape[0]
    for ours, theirs in zip(padded.pooler_output, reference.pooler_output, strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_minicpm_v4_6_compiled_encoder_layers_train_as_the_eager_tower_and_replay(family_twin):
    """lora=all: the loss and every gradient (the tower's LoRA before and after its window merger, the
    merger's, the projector's) equal the eager unpadded model's; other images of the same buckets replay the
    traced graphs; evaluation runs the eager layers."""
    family, model, processor = loaded(family_twin, "minicpm_v4_6", "all")
    first, second = (batch_of(family, processor, s, seed=k) for s, k in ((FIRST_4_6, 0), (SECOND_4_6, 5)))
    assert first["pixel_values"].shape != second["pixel_values"].shape
    assert first["target_sizes"].tolist() != second["target_sizes"].tolist()
    eager = [loss_and_grads(family, model, b) for b in (first, second)]

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    tower = model.get_base_model().get_submodule(family.vision_tower)
    bundle = Bundle(model, processor, family_twin("minicpm_v4_6"), "base")
    assert family.compile_vision(bundle, backend=counter) == len(tower.encoder.layers) == 2
    assert all(is_compiled_for_training(layer) for layer in tower.encoder.layers)

    def same(ours, reference) -> None:
        (loss, grads), (ref_loss, ref_grads) = ours, reference
        torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
        assert grads.keys() == ref_grads.keys()
        for part in (
            "vision_tower.encoder.layers.0.",
            "vision_tower.encoder.layers.1.",
            "vit_merger.",
            "model.merger.",
        ):
            assert any(part in n for n in grads), part
        for key, grad in grads.items():
            cosine = float(F.cosine_similarity(grad.flatten(), ref_grads[key].flatten(), dim=0))
            assert cosine >= 0.999, key
            torch.testing.assert_close(grad, ref_grads[key], atol=1e-5, rtol=1e-4, msg=key)

    same(loss_and_grads(family, model, first), eager[0])
    traced = counter.frame_count
    assert traced == 2  # the layer before the merger (256 patches, no gradient in) and the one after (64)
    same(loss_and_grads(family, model, second), eager[1])
    assert counter.frame_count == traced
    model.eval()
    with torch.no_grad():
        family.loss_outputs(model, first)
    assert counter.frame_count == traced


def test_the_family_refuses_to_compile_a_tower_on_sdpa(family_twin):
    family = get_family("qwen3_vl")
    bundle = family.load_bundle(family_twin("qwen3_vl"))
    assert family.capabilities.compiles_vision
    assert family.compiles_vision_on(torch.device("cpu"), torch.float32) is False  # auto: no kernel here
    with pytest.raises(Exception, match="model.vision_attention=varlen"):
        family.compile_vision(bundle)
    assert get_family("minicpm_v4_6").capabilities.compiles_vision
