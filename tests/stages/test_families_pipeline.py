"""The stages on the transformers-native families: sft -> eval -> merge -> infer on their tiny twins, on CPU."""

from __future__ import annotations

import io
import json
import logging
import math
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from pipeline.__main__ import run_pipeline
from pipeline.apps.chat import Chat
from pipeline.apps.chat_cli import main as chat_main
from pipeline.config import ConfigError, validate
from pipeline.families import get_family, image_limit
from tests.helpers import (
    compose_config,
    copy_twin,
    log_records,
    read_rows,
    run_stage,
    step_fails_at,
    write_rows,
)

# A few steps on a few rows: enough to pass through every stage, not to learn.
QUICK = [
    "device=cpu",
    "dataset.max_rows=12",
    "dataset.test_ratio=0.25",
    "trainer.max_steps=2",
    "trainer.batch_size=2",
    "trainer.eval_steps=2",
    "trainer.max_eval_samples=2",
    "eval.max_samples=2",
    "eval.max_new_tokens=2",
    "eval.compare_base=false",
    "infer.max_samples=2",
    "infer.max_new_tokens=2",
    "merge.verify_samples=1",
]
FAMILY_OF = {
    "qwen2_5_vl_tiny": "qwen2_5_vl",
    "minicpm_v4_6_tiny": "minicpm_v4_6",
    "qwen3_vl_tiny": "qwen3_vl",
}


@pytest.fixture(scope="module")
def twin_root(tmp_path_factory, family_twin) -> Path:
    """A folder holding this module's copies of the session's twins, under their model configs' names (a path
    outside a twin's cache place is never built by a run)."""
    root = tmp_path_factory.mktemp("twins")
    for model, family in FAMILY_OF.items():
        copy_twin(family_twin(family), root / model)
    return root


def run(model: str, experiment: str, twin_root: Path, run_dir: Path, *extra: str) -> Path:
    cfg = compose_config(
        [
            f"+experiment={experiment}",
            f"model={model}",
            f"model.path={twin_root / model}",
            f"output_root={run_dir.parent}",
            *QUICK,
            *extra,
        ]
    )
    run_pipeline(cfg, run_dir)
    return run_dir


def check_eval_and_infer(run_dir: Path, ckpt: Path) -> None:
    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
    assert math.isfinite(metrics["eval_loss"]) and metrics["eval_loss"] > 0
    assert metrics["num_samples"] == 2 and metrics["num_tokens"] > 0
    assert Path(metrics["checkpoint"]).resolve() == ckpt.resolve()
    results = read_rows(run_dir / "infer" / "results.jsonl")
    assert len(results) == 2
    assert all(isinstance(r["response"], str) and r["query"] and r["images"] for r in results)


def adapted_modules(ckpt: Path, model: torch.nn.Module) -> set[str]:
    """Returns the names of the model's modules the saved adapter config targets."""
    targets = json.loads((ckpt / "adapter_config.json").read_text())["target_modules"]
    names = [name for name, _ in model.named_modules()]
    if isinstance(targets, str):
        return {name for name in names if re.fullmatch(targets, name)}
    return {name for name in names if name.rsplit(".", 1)[-1] in targets or name in targets}


def logged_losses(run_dir: Path) -> list[float]:
    return [record["loss"] for record in log_records(run_dir / "sft") if "loss" in record]


@pytest.mark.parametrize("model", list(FAMILY_OF))
def test_lora_qkv_runs_sft_eval_merge_infer(model, twin_root, tmp_path):
    run_dir = run(model, "lora_qkv", twin_root, tmp_path / "run")
    ckpt = run_dir / "sft" / "checkpoint-2"
    family = get_family(FAMILY_OF[model])
    base, _ = family.load(twin_root / model)
    assert adapted_modules(ckpt, base) == set(family.lora_target_names(base, "qkv"))
    assert (ckpt / "trainer_state.json").is_file() and (ckpt / "optimizer.pt").is_file()
    losses = logged_losses(run_dir)
    assert losses and all(math.isfinite(x) and x > 0 for x in losses)
    check_eval_and_infer(run_dir, ckpt)

    info = json.loads((run_dir / "merge" / "merge_info.json").read_text())
    assert info["verified"] is True and info["verify_samples"] == 1
    merged = Path(info["output"])
    assert merged == (run_dir / "sft" / "checkpoint-2-merged").resolve()
    assert not (merged / "adapter_config.json").exists()
    plain = AutoModelForImageTextToText.from_pretrained(merged)
    processor = AutoProcessor.from_pretrained(merged)
    assert plain.config.model_type == family.model_type and processor.tokenizer.pad_token_id is not None
    assert not any("lora" in name for name in plain.state_dict())
    # infer answered with the merged model (this run's merge comes first)
    assert (run_dir / "infer" / "results.jsonl").is_file()


def test_lora_all_targets_the_vision_tower_too(twin_root, tmp_path, caplog):
    """lora=all through the entry point, with the vision tower's blocks checkpointed and the language
    model's not (model.gradient_checkpointing=vision; tests/families/test_vision_checkpointing.py)."""
    model = "qwen2_5_vl_tiny"
    with caplog.at_level(logging.INFO, logger="pipeline.stages.sft"):
        run_dir = run(model, "lora_all", twin_root, tmp_path / "run", "model.gradient_checkpointing=vision")
    assert "gradient checkpointing: vision tower only" in caplog.text
    ckpt = run_dir / "sft" / "checkpoint-2"
    base = AutoModelForImageTextToText.from_pretrained(twin_root / model)
    targets = adapted_modules(ckpt, base)
    assert targets == set(get_family("qwen2_5_vl").lora_target_names(base, "all"))
    assert any(t.startswith("model.visual.") for t in targets)
    assert any(t.startswith("model.language_model.") and t.endswith("mlp.down_proj") for t in targets)
    check_eval_and_infer(run_dir, ckpt)
    assert json.loads((run_dir / "merge" / "merge_info.json").read_text())["verified"] is True


def test_full_finetuning_writes_the_native_layout(twin_root, tmp_path):
    model = "qwen2_5_vl_tiny"
    # trainer.save_only_model: the weights without AdamW's moments (the resume that keeps them is tested below)
    run_dir = run(
        model, "full", twin_root, tmp_path / "run", "lora.freeze_vision=true", "trainer.save_only_model=true"
    )
    ckpt = run_dir / "sft" / "checkpoint-2"
    assert not (ckpt / "adapter_config.json").exists() and not (ckpt / "optimizer.pt").exists()
    trained = AutoModelForImageTextToText.from_pretrained(ckpt)
    AutoProcessor.from_pretrained(ckpt)
    base = AutoModelForImageTextToText.from_pretrained(twin_root / model)
    before, after = base.state_dict(), trained.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    groups = get_family("qwen2_5_vl").freeze_groups()
    assert {groups.of(k) for k in changed} == {"llm", "projector"}  # the vision tower stayed frozen
    check_eval_and_infer(run_dir, ckpt)


def test_an_interrupted_full_run_resumes_with_the_same_losses(twin_root, tmp_path, monkeypatch):
    from pipeline.stages import sft

    model = "qwen2_5_vl_tiny"
    cfg = compose_config(
        ["+experiment=full", f"model={model}", f"model.path={twin_root / model}", *QUICK]
        + ["trainer.max_steps=4", "trainer.save_steps=2", "trainer.logging_steps=1"]
    )
    run_stage(sft, cfg, tmp_path / "whole")
    with step_fails_at(monkeypatch, 2, "power cut"), pytest.raises(RuntimeError, match="power cut"):
        run_stage(sft, cfg, tmp_path / "cut")
    out = run_stage(sft, cfg, tmp_path / "cut")  # trainer.resume=auto
    assert out["sft"]["resumed_from"].endswith("checkpoint-2")
    whole, resumed = logged_losses(tmp_path / "whole"), logged_losses(tmp_path / "cut")
    assert len(whole) == 4 and resumed == pytest.approx(whole, rel=1e-5)


@pytest.mark.parametrize(
    "override, said",
    [
        ("dataset.truncation=truncate", "dataset.truncation=truncate runs for model.family=minicpm_v2"),
    ],
)
def test_what_only_minicpm_v2_runs_is_refused_naming_the_family(override, said):
    cfg = compose_config(["model=minicpm_v4_6_tiny", override])
    with pytest.raises(ConfigError, match=said + ".*model.family=minicpm_v4_6 does not take it"):
        validate(cfg)


def test_every_family_packs_and_packing_needs_a_token_budget():
    for model in ("minicpm_v2_tiny", *FAMILY_OF):
        validate(compose_config([f"model={model}", "trainer.packing=true"]))
    with pytest.raises(ConfigError, match=r"trainer.packing=true needs trainer.micro_batch_tokens > 0"):
        validate(
            compose_config(["model=qwen2_5_vl_tiny", "trainer.packing=true", "trainer.micro_batch_tokens=0"])
        )
    validate(
        compose_config(["model=qwen2_5_vl_tiny", "trainer.packing=auto", "trainer.micro_batch_tokens=0"])
    )


@pytest.mark.parametrize("model", ["qwen2_5_vl_tiny", "minicpm_v4_6_tiny"])
def test_packed_sft_steps_equal_the_padded_ones(model, twin_root, tmp_path, caplog):
    """sft through the entry point's stage with trainer.packing=true on rows of different lengths (images of
    several sizes, two images, none): the steps' losses and gradient norms are the padded run's (fp32 on
    the CPU), with no padding but a packed row's tail."""
    from PIL import Image

    from pipeline.stages import sft

    for name, size in (("small", (32, 32)), ("wide", (96, 40)), ("large", (80, 72))):
        Image.new("RGB", size, (200, 30, 30)).save(tmp_path / f"{name}.png")
    rows = [
        {"query": "<image>Colour?", "response": "Red.", "images": ["small.png"]},
        {"query": "<image><image>Which is larger?", "response": "The second, by far.",
         "images": ["small.png", "large.png"]},
        {"query": "Two plus two?", "response": "Four."},
        {"query": "<image>Describe it in a sentence.", "response": "A wide red field under no sky at all.",
         "images": ["wide.png"]},
    ] * 3  # fmt: skip
    data = write_rows(tmp_path / "rows.jsonl", rows)

    def steps(packing: str, run_dir: Path, *extra: str) -> list[dict]:
        cfg = compose_config(
            ["+experiment=lora_qkv", f"model={model}", f"model.path={twin_root / model}", *QUICK]
            + ["dataset=custom", f"dataset.path={data}", "dataset.max_rows=null"]
            + ["trainer.batch_size=4", "trainer.grad_accum=1", "trainer.logging_steps=1"]
            + ["trainer.micro_batch_tokens=2048", f"trainer.packing={packing}"]
            # dropout masks are drawn per layout: padded and packed ones differ
            + ["lora.dropout=0.0", *extra]
        )
        run_stage(sft, cfg, run_dir)
        return [r for r in log_records(run_dir / "sft") if "loss" in r]

    padded, packed = steps("false", tmp_path / "padded"), steps("true", tmp_path / "packed")
    assert len(padded) == len(packed) == 2
    for p, b in zip(padded, packed, strict=True):
        assert b["loss"] == pytest.approx(p["loss"], rel=1e-5), (p, b)
        assert b["grad_norm"] == pytest.approx(p["grad_norm"], rel=1e-4), (p, b)
        assert b["micro_batches"] == p["micro_batches"] == 1
        assert b["padding_pct"] == 0 < p["padding_pct"]
    # compiled decoder layers (inductor on the CPU): rows padded to a static bucket (a quarter of the
    # budget, 512), the same steps within the compiler's float reordering. MiniCPM-V 4.6's linear-attention
    # layers run outside the graph on purpose (one deliberate break a layer, which the log counts but does not
    # warn of: the last assertion); every other layer traces whole
    deliberate = model == "minicpm_v4_6_tiny"
    compiled = steps("true", tmp_path / "compiled", "trainer.compile=true")
    for b, c in zip(packed, compiled, strict=True):
        assert c["loss"] == pytest.approx(b["loss"], rel=1e-4), (b, c)
        assert c["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-3), (b, c)
        assert c["padding_pct"] > 0
        assert c["compiled_graphs"] >= 1 and (c["graph_breaks"] == 0 or deliberate), c
    assert "compiled_graphs" not in packed[0]
    # and the vision blocks compiled too, on patch sequences padded to a static length (the varlen
    # vision attention's CPU path): the same steps again
    caplog.set_level(logging.INFO, logger="pipeline")
    vision = steps(
        "true",
        tmp_path / "vision",
        "trainer.compile=true",
        "trainer.compile_vision=true",
        "model.vision_attention=varlen",
    )
    for b, v in zip(packed, vision, strict=True):
        assert v["loss"] == pytest.approx(b["loss"], rel=1e-4), (b, v)
        assert v["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-3), (b, v)
        # the decoder layers replay the graphs the run above traced (same process, same shapes): what this
        # run traced is the vision blocks', whole
        assert v["compiled_graphs"] >= 1 and v["graph_breaks"] == 0, v
    assert "compile: on (vision blocks too)" in caplog.text
    assert "graph breaks" not in caplog.text


def test_the_chat_runs_another_family_and_validation_takes_it():
    validate(
        compose_config(["model=minicpm_v4_6_tiny", "stages=[infer]", "ckpt=base", "infer.interactive=true"])
    )


def test_the_chat_finds_the_family_by_model_type_and_refuses_an_unknown_one(
    family_twin, tmp_path, monkeypatch, capsys
):
    folder = family_twin("qwen2_5_vl")
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello?\n\nquit\n"))
    assert chat_main(["--model", str(folder), "--device", "cpu", "--max-new-tokens", "2"]) == 0
    assert "images: up to 16 per conversation" in capsys.readouterr().out
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "config.json").write_text(json.dumps({"model_type": "llava"}), encoding="utf-8")
    assert chat_main(["--model", str(unknown)]) == 1
    said = (
        f"{unknown} holds a 'llava' model (config.json model_type), which no family runs; known model types: "
    )
    err = capsys.readouterr().err
    assert said in err and "minicpmv, minicpmv4_6, qwen2_5_vl, qwen3_vl" in err
    with pytest.raises(ValueError, match="which no family runs; known model types: minicpmv"):
        Chat.from_pretrained(str(unknown))


def test_several_images_per_conversation_train_and_answer(twin_root, tmp_path):
    """Qwen2.5-VL takes several images a conversation: rows with two (tags placing them, one in a history
    query) train and are answered; MiniCPM-V-2 refuses the same file naming the line."""
    from PIL import Image

    from pipeline.data.images import ImageFiles
    from pipeline.data.prepare import read_dataset
    from pipeline.data.rows import DatasetError
    from pipeline.families.base import row_images

    for name, colour in (("red", (200, 30, 30)), ("blue", (30, 30, 200))):
        Image.new("RGB", (48, 40), colour).save(tmp_path / f"{name}.png")
    rows = [
        {"query": "<image><image>Which is red, the first or the second?", "response": "The first.",
         "images": ["red.png", "blue.png"]},
        {"query": "And this one?<image>", "response": "Blue.", "history": [["<image>Colour?", "Red."]],
         "images": ["red.png", "blue.png"]},
        {"query": "Describe.", "response": "A red field.", "images": ["red.png"]},
    ] * 4  # fmt: skip
    data = write_rows(tmp_path / "two.jsonl", rows)
    model = "qwen2_5_vl_tiny"
    run_dir = run(
        model, "lora_qkv", twin_root, tmp_path / "run", "dataset=custom", f"dataset.path={data}",
        f"infer.input={data}", "stages=[sft,infer]",
    )  # fmt: skip
    assert logged_losses(run_dir) and all(math.isfinite(x) for x in logged_losses(run_dir))
    answered = read_rows(run_dir / "infer" / "results.jsonl")
    assert [len(r["images"]) for r in answered] == [2, 2]
    # both images are in the encoded conversation, where their tags put them
    family = get_family("qwen2_5_vl")
    _, processor = family.load(twin_root / model)
    row = read_dataset({"name": "custom", "path": str(data)}, 0, (16, "model.family=qwen2_5_vl")).rows[1]
    sample = family._encode_row(processor, row, row_images(row, ImageFiles()), generation=False)
    start = processor.tokenizer.convert_tokens_to_ids("<|vision_start|>")
    assert sample.input_ids.count(start) == 2
    assert sample.pixel_inputs["image_grid_thw"].shape[0] == 2
    with pytest.raises(DatasetError, match=f"{data}:1: 2 images; MiniCPM-V-2 takes at most one image"):
        read_dataset({"name": "custom", "path": str(data)}, 0, image_limit(compose_config([]).model))
