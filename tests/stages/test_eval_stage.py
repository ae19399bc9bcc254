"""The eval stage: loss, perplexity and token accuracy on the held-out rows, generation metrics, objective."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from pipeline.families.minicpm_v2.bundle import load_bundle
from pipeline.families.minicpm_v2.collate import collate_for_training, encode_example
from pipeline.stage_names import GENERATION_METRICS, LOSS_METRICS
from pipeline.stages import eval as eval_stage
from pipeline.stages import sft
from tests.helpers import copy_twin, read_rows, run_stage, run_state, workdir_config, write_rows

LOSS_KEYS = {"eval_loss", "perplexity", "token_acc"}
GENERATION_KEYS = {"bleu4", "rouge_l", "cider", "exact_match", "numeric_accuracy"}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_twin) -> Path:
    root = tmp_path_factory.mktemp("eval")
    # A random (not pre-trained) twin: scoring and generation need real code paths, not a good model.
    copy_twin(tiny_twin, root / "tiny")
    Image.new("RGB", (112, 112), (220, 40, 40)).save(root / "red.png")
    Image.new("RGB", (224, 160), (40, 80, 220)).save(root / "blue.png")
    train = [
        {"query": f"What colour is shape {i}?", "response": "a red circle", "images": ["red.png"]}
        for i in range(6)
    ]
    val = [
        {"query": "Describe the image.", "response": "a red circle", "images": ["red.png"]},
        {"query": "How many squares?", "response": "two blue squares", "images": ["blue.png"]},
        {"query": "What is the result?", "response": "4", "history": [["What is 2 plus 2?", "the sum"]]},
        {"query": "Describe the image.", "response": "a blue square", "images": ["blue.png"]},
        {"query": "Say hello.", "response": "hello there"},
    ]
    write_rows(root / "train.jsonl", train)
    write_rows(root / "val.jsonl", val)
    return root


def config(workdir: Path, *overrides: str):
    return workdir_config(
        workdir,
        "eval.max_samples=4",
        "eval.batch_size=2",
        "eval.max_new_tokens=6",
        "trainer.max_steps=1",
        "trainer.eval_steps=1",
        "trainer.save_steps=1",
        "trainer.batch_size=2",
        "trainer.max_eval_samples=1",
        "optim.lr=1e-2",
        "optim.warmup_ratio=0.0",  # one step: a warm-up would leave it at lr 0
        *overrides,
    )


@pytest.fixture(scope="module")
def sft_run(workdir: Path) -> tuple[Path, dict]:
    run_dir = workdir / "run"
    state = run_stage(sft, config(workdir, "stages=[sft,eval]"), run_dir)
    assert state["ckpt"] is not None
    return run_dir, state


@pytest.fixture(scope="module")
def adapter_eval(workdir: Path, sft_run) -> tuple[Path, dict]:
    run_dir, state = sft_run
    cfg = config(workdir, "stages=[sft,eval]")
    return run_dir, run_stage(eval_stage, cfg, run_dir, ckpt=state["ckpt"])


def test_eval_of_this_runs_checkpoint_writes_metrics_and_predictions(workdir: Path, sft_run, adapter_eval):
    run_dir, result = adapter_eval
    metrics = result["metrics"]
    assert LOSS_KEYS | GENERATION_KEYS <= set(metrics)  # "4" is a numeric reference
    written = json.loads((run_dir / "eval" / "metrics.json").read_text())
    assert {k: written[k] for k in metrics} == metrics
    assert written["num_samples"] == 4 and written["num_tokens"] > 0
    assert written["checkpoint"] == str(sft_run[1]["ckpt"])
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["eval_loss"]))
    assert 0.0 <= metrics["token_acc"] <= 1.0
    rows = read_rows(run_dir / "eval" / "predictions.jsonl")
    assert len(rows) == 4  # eval.max_samples of the 5 held-out rows
    assert [r["label"] for r in rows] == ["a red circle", "two blue squares", "4", "a blue square"]
    assert all({"query", "response", "label", "images", "history"} <= set(r) for r in rows)
    assert rows[0]["images"] == [str(workdir / "red.png")] and rows[2]["history"] == [
        ["What is 2 plus 2?", "the sum"]
    ]
    assert all(isinstance(r["response"], str) for r in rows)


def test_base_model_eval_works_and_differs_from_the_adapter(workdir: Path, adapter_eval, tmp_path: Path):
    cfg = config(workdir, "stages=[eval]", "ckpt=base", "eval.generate=false")
    result = run_stage(eval_stage, cfg, tmp_path)
    metrics = result["metrics"]
    assert set(metrics) == LOSS_KEYS
    assert cfg.eval.objective in metrics
    assert not (tmp_path / "eval" / "predictions.jsonl").exists()
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["checkpoint"] == "base"
    # the adapter trained at lr 1e-2 changes the scores: eval really used it
    assert metrics["eval_loss"] != pytest.approx(adapter_eval[1]["metrics"]["eval_loss"], rel=1e-6)


@pytest.mark.parametrize(("loss_scale", "last_round"), [("auto", False), ("last_round", True)])
def test_eval_loss_is_token_weighted_over_every_response_token(
    workdir: Path, tmp_path: Path, loss_scale: str, last_round: bool
):
    # with dataset.loss_scale=last_round the history's response ("the sum" of the third row) is context only
    cfg = config(
        workdir,
        "stages=[eval]",
        "ckpt=base",
        "eval.generate=false",
        "eval.batch_size=3",
        f"dataset.loss_scale={loss_scale}",
    )
    metrics = run_stage(eval_stage, cfg, tmp_path)["metrics"]
    bundle = load_bundle(str(workdir / "tiny"))
    rows = read_rows(workdir / "val.jsonl")[:4]
    loss_sum = tokens = 0.0
    for row in rows:
        image = Image.open(workdir / row["images"][0]).convert("RGB") if row.get("images") else None
        sample = encode_example(
            bundle.tokenizer,
            bundle.processor,
            row["query"],
            row["response"],
            history=row.get("history", []),
            image=image,
            last_round=last_round,
        )
        with torch.no_grad():
            scored = bundle.model(**collate_for_training([sample], bundle.tokenizer.pad_id))
        loss_sum += float(scored.loss_sum)
        tokens += float(scored.num_tokens)
    assert metrics["eval_loss"] == pytest.approx(loss_sum / tokens, rel=1e-4)
    written = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    answers = sum(len(bundle.tokenizer.encode(row["response"])) + 1 for row in rows)  # each with its </s>
    history = 0 if last_round else len(bundle.tokenizer.encode("the sum"))
    assert written["num_tokens"] == tokens == answers + history


@pytest.mark.parametrize(
    ("generate", "knobs"),
    [
        ("false", "eval.batch_size=1 (now 3), a smaller dataset.max_length, model.max_slice_nums"),
        ("true", "eval.batch_size=1 (now 3), eval.max_new_tokens="),
    ],
)
def test_out_of_memory_in_eval_names_the_stage_and_its_settings(
    workdir, tmp_path, monkeypatch, generate, knobs
):
    from pipeline.families.minicpm_v2.family import MiniCPMV2
    from pipeline.utils.memory import OutOfGPUMemory

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(MiniCPMV2, "generate_batch" if generate == "true" else "loss_outputs", out_of_memory)
    cfg = config(workdir, "stages=[eval]", "ckpt=base", f"eval.generate={generate}", "eval.batch_size=3")
    with pytest.raises(OutOfGPUMemory) as caught:
        run_stage(eval_stage, cfg, tmp_path)
    said = str(caught.value)
    assert said.startswith("out of GPU memory in the eval stage (")
    assert "Knobs, cheapest first: " + knobs in said, said
    assert isinstance(caught.value.__cause__, torch.OutOfMemoryError)


def test_checkpoint_comes_from_state_else_from_ckpt(workdir: Path, sft_run):
    run_dir, state = sft_run

    def pick(cfg, **fields):
        return run_state(cfg, **fields).weights_for("eval", cfg)

    # an earlier run folder stands for its sft/best checkpoint
    assert pick(config(workdir, "stages=[eval]", f"ckpt={run_dir}")) == state["ckpt"]
    assert pick(config(workdir, "stages=[eval]", "ckpt=base")) is None
    assert pick(config(workdir, "stages=[eval]", "ckpt=base"), ckpt=state["ckpt"]) == state["ckpt"]


def test_every_generation_objective_exists_when_generating(adapter_eval):
    metrics = adapter_eval[1]["metrics"]
    for objective in LOSS_METRICS + GENERATION_METRICS:
        assert objective in metrics
