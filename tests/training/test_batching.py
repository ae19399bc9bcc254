"""Micro-batches of an optimizer step: the planner, and that filling them to a token budget (the default)
gives the loss and gradients of the plain one-row-at-a-time regime on the same rows."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest

from pipeline.stages import sft
from pipeline.training.batching import (
    budget_micro_batches,
    budget_sizes,
    fixed_micro_batches,
    padded_size,
    plan_window,
    split_to_count,
)
from tests.helpers import log_records, run_stage, twin_config


def test_budget_micro_batches_cover_the_window_once_within_the_budget():
    lengths = [30, 200, 31, 199, 500, 40, 41, 120, 121, 10, 11, 900]
    rows = list(range(100, 100 + len(lengths)))
    groups = budget_micro_batches(rows, lengths, budget=512, multiple=8)
    assert sorted(i for g in groups for i in g) == rows
    by_row = dict(zip(rows, lengths, strict=True))
    for g in groups:
        # a row longer than the budget runs alone; every other group fits
        assert len(g) == 1 or padded_size([by_row[i] for i in g], 8) <= 512, g
    # longest first, and similar lengths together: the 900-token row alone, then the 500
    assert groups[0] == [111] and groups[1] == [104]
    assert groups == budget_micro_batches(rows, lengths, budget=512, multiple=8)  # deterministic


def test_fixed_micro_batches_are_the_plain_regime():
    assert fixed_micro_batches([5, 3, 9, 1, 7], 2) == [[5, 3], [9, 1], [7]]
    assert plan_window([[5, 3, 9], [1, 7, 2]], [1] * 10, 1, 0) == [[[5], [3], [9]], [[1], [7], [2]]]


def test_plans_even_out_across_processes_when_every_forward_is_collective():
    lengths = [100] * 8 + [1100] * 8
    per_rank = [list(range(8)), list(range(8, 16))]  # short rows on rank 0, long ones on rank 1
    uneven = plan_window(per_rank, lengths, 1, 2048)
    assert [len(p) for p in uneven] == [1, 8]
    even = plan_window(per_rank, lengths, 1, 2048, equal_counts=True)
    assert [len(p) for p in even] == [8, 8]
    assert sorted(i for g in even[0] for i in g) == per_rank[0]
    with pytest.raises(ValueError, match="cannot split"):
        split_to_count([[1], [2]], 3, lambda i: 1)


def step_records(twin: Path, run_dir: Path, *overrides: str) -> list[dict]:
    cfg = twin_config(
        twin,
        "device=cpu",
        # ms-swift's window: 16 rows per optimizer step, one at a time in the plain regime
        "trainer.batch_size=1",
        "trainer.grad_accum=16",
        "trainer.max_steps=3",
        "trainer.logging_steps=1",
        "trainer.eval_steps=100",
        "trainer.save_steps=100",
        "trainer.max_eval_samples=8",
        "lora.dropout=0.0",  # dropout masks depend on how rows are grouped
        "optim.lr=1e-3",
        *overrides,
    )
    run_stage(sft, cfg, run_dir)
    return log_records(run_dir / "sft")


@pytest.mark.parametrize(
    ("preset", "packing"), [("lora_qkv", False), ("full", False), ("lora_qkv", True), ("lora_all", True)]
)
def test_token_budget_steps_equal_the_plain_regime(tiny_twin, tmp_path, preset, packing):
    """Padded micro-batches, or packed rows (positions restart per sample, attention within each sample)."""
    plain = step_records(
        tiny_twin, tmp_path / "plain", f"+experiment={preset}", "trainer.micro_batch_tokens=0"
    )
    packed = step_records(
        tiny_twin,
        tmp_path / "budget",
        f"+experiment={preset}",
        "trainer.micro_batch_tokens=4096",
        f"trainer.packing={str(packing).lower()}",
    )
    train = [(p, b) for p, b in zip(plain, packed, strict=True) if "loss" in p]
    assert len(train) == 3
    for p, b in train:
        # the same loss and gradient norm at every step: the updates were the same too
        assert b["loss"] == pytest.approx(p["loss"], rel=1e-5), (p, b)
        assert b["grad_norm"] == pytest.approx(p["grad_norm"], rel=1e-4), (p, b)
        assert b["samples_per_s"] > 0 and 0 <= b["padding_pct"] < 100 and "epoch_eta_s" in b
        if packing:
            assert b["padding_pct"] < 5  # only the tail of a packed row
        assert p["padding_pct"] == 0 and p["micro_batches"] == 16  # one row per forward: no padding
        assert b["micro_batches"] < 4  # the 16 rows in a few forwards
    evals = [(p, b) for p, b in zip(plain, packed, strict=True) if "eval_loss" in p]
    assert evals and all(b["eval_loss"] == pytest.approx(p["eval_loss"], rel=1e-5) for p, b in evals)


def test_preallocated_gradients_give_the_same_steps(tiny_twin, tmp_path, monkeypatch):
    """With CUDA graphs the loop gives every trainable parameter its .grad up front (gradients are then
    added in place, never kept in the graphs' memory pool); on the CPU the steps must come out the same."""
    reference = step_records(tiny_twin, tmp_path / "plain", "+experiment=lora_qkv", "trainer.grad_accum=4")

    class Preallocating(sft.Trainer):
        def __init__(self, engine, data, family, settings, outputs):
            settings = dataclasses.replace(settings, preallocate_grads=True)
            super().__init__(engine, data, family, settings, outputs)

    monkeypatch.setattr(sft, "Trainer", Preallocating)
    records = step_records(tiny_twin, tmp_path / "prealloc", "+experiment=lora_qkv", "trainer.grad_accum=4")
    for r, p in zip(reference, records, strict=True):
        if "loss" in r:
            assert p["loss"] == pytest.approx(r["loss"], rel=1e-5)
            assert p["grad_norm"] == pytest.approx(r["grad_norm"], rel=1e-4)


def test_a_packed_row_scores_each_sample_as_if_alone(tiny_twin):
    """The model on one packed row gives every sample the loss it gets in a batch of its own."""
    import torch

    from pipeline.families.minicpm_v2.bundle import load_bundle
    from pipeline.families.minicpm_v2.collate import collate_for_training, collate_packed
    from pipeline.families.minicpm_v2.modeling import MiniCPMV

    bundle = load_bundle(str(tiny_twin), dtype=torch.float32, device=torch.device("cpu"))
    model: MiniCPMV = bundle.model.eval()
    from PIL import Image

    from pipeline.families.minicpm_v2.collate import encode_example

    texts = [("What colour is it?", "red"), ("Count the shapes.", "three shapes"), ("Say hi.", "hi there")]
    sizes = [(112, 112), (300, 200), None, (224, 160), None, (80, 80)]  # unsliced, sliced and text-only
    samples = []
    for k, size in enumerate(sizes):
        query, response = texts[k % len(texts)]
        image = Image.new("RGB", size, (40 * k, 200 - 30 * k, 90)) if size else None
        samples.append(encode_example(bundle.tokenizer, bundle.processor, query, response, image=image))
    assert any(s.pixel_values for s in samples)
    with torch.no_grad():
        alone = [model(**collate_for_training([s], bundle.tokenizer.pad_id)).loss_sum for s in samples]
        packed = model(**collate_packed(samples, bundle.tokenizer.pad_id, pad_to_multiple=64))
    assert float(packed.loss_sum) == pytest.approx(float(sum(alone)), rel=1e-5)


def test_budget_sizes_add_the_weighted_patches_rounded_up():
    assert budget_sizes([10, 20], [100, 0], 0.25) == [35, 20]
    assert budget_sizes([10, 20], [3, 1], 0.5) == [12, 21]
    assert budget_sizes([10, 20], None, 0.5) == [10, 20] == budget_sizes([10, 20], [5, 5], 0)
    with pytest.raises(ValueError, match="2 token counts but 1 patch counts"):
        budget_sizes([10, 20], [1], 1.0)


def test_a_budget_counting_vision_patches_cuts_more_micro_batches_for_the_same_steps(family_twin, tmp_path):
    twin = family_twin("qwen2_5_vl")
    common = ("model=qwen2_5_vl_tiny", "+experiment=lora_qkv", "trainer.micro_batch_tokens=512")
    tokens = step_records(twin, tmp_path / "tokens", *common, "trainer.patch_weight=0")
    patches = step_records(twin, tmp_path / "patches", *common, "trainer.patch_weight=2")
    train = [(t, p) for t, p in zip(tokens, patches, strict=True) if "loss" in t]
    assert len(train) == 3
    for t, p in train:
        assert p["loss"] == pytest.approx(t["loss"], rel=1e-5) and p["grad_norm"] == pytest.approx(
            t["grad_norm"], rel=1e-4
        )
        assert p["micro_batches"] > t["micro_batches"]


def test_a_frozen_towers_patches_count_a_third_and_a_checkpointed_ones_an_eighth(
    family_twin, tmp_path, caplog
):
    """trainer.patch_weight=auto through the sft stage: with lora=qkv the vision tower runs forward only, so
    a patch counts a third of what it counts when lora=all trains the tower without checkpointing (the same
    tower, the weight read off the prepared model: its adapters counted, its frozen parameters seen as
    frozen); lora=all with the tower's blocks checkpointed (every block, or the tower's only) counts an
    eighth: its patches keep their blocks' inputs only."""
    twin = family_twin("qwen2_5_vl")
    weights = {}
    runs = {
        "qkv": ("+experiment=lora_qkv",),
        "all": ("+experiment=lora_all", "model.gradient_checkpointing=false"),
        "all_checkpointed": ("+experiment=lora_all", "model.gradient_checkpointing=true"),
        "all_tower_checkpointed": ("+experiment=lora_all", "model.gradient_checkpointing=vision"),
    }
    for run, overrides in runs.items():
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="pipeline.stages.sft"):
            step_records(twin, tmp_path / run, "model=qwen2_5_vl_tiny", "trainer.max_steps=1", *overrides)
        said = [r.getMessage() for r in caplog.records if "vision patches x" in r.getMessage()]
        assert len(said) == 1, said
        weights[run] = float(said[0].split("vision patches x")[1].split()[0])
        assert ("checkpointed" in said[0]) == run.endswith("checkpointed"), said[0]
    assert weights["qkv"] == pytest.approx(weights["all"] / 3, rel=0.15)
    for run in ("all_checkpointed", "all_tower_checkpointed"):
        assert weights[run] == pytest.approx(weights["all"] / 8, rel=0.01)
