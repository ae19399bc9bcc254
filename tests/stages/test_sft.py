"""The sft stage on the tiny twin: checkpoints, exact resume, signals, and that training actually learns."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
from pathlib import Path

import pytest
import torch

from pipeline.data.rows import DatasetError
from pipeline.stages import eval as eval_stage
from pipeline.stages import infer as infer_stage
from pipeline.stages import sft
from pipeline.training import loop
from pipeline.training.checkpoints import CheckpointError, list_checkpoints
from tests.helpers import eval_losses, log_records, losses_by_step, run_stage
from tests.helpers import twin_config as make_cfg  # the name the stage calls below use


@pytest.fixture
def twin(pretrained_twin) -> Path:
    """The session's pre-trained twin (so that fine-tuning has something to adapt), under the name the
    stage calls below give it."""
    return pretrained_twin


SHORT = (
    "+experiment=lora_qkv",
    "trainer.max_steps=6",
    "trainer.save_steps=3",
    "trainer.eval_steps=3",
    "trainer.logging_steps=1",
    "trainer.batch_size=2",
    "trainer.max_eval_samples=4",
    "model.gradient_checkpointing=false",
    "optim.lr=1e-3",
)


def test_checkpoints_pointers_logs_and_rotation(twin, tmp_path, monkeypatch):
    planned = {}

    def plan_training(*args, **kwargs):
        planned.update(kwargs)
        return real_plan(*args, **kwargs)

    real_plan = sft.plan_training
    monkeypatch.setattr(sft, "plan_training", plan_training)
    cfg = make_cfg(twin, *SHORT, "trainer.save_steps=2", "trainer.eval_steps=2", "trainer.save_total_limit=2")
    out = run_stage(sft, cfg, tmp_path)
    sft_dir = tmp_path / "sft"
    names = [p.name for p in list_checkpoints(sft_dir)]
    best = (sft_dir / "best").resolve().name
    assert names[-1] == "checkpoint-6" and len(set(names) - {best}) <= 2
    assert (sft_dir / "last").resolve().name == "checkpoint-6"
    ckpt = sft_dir / "checkpoint-6"
    for name in (
        "adapter_model.safetensors",
        "adapter_config.json",
        "optimizer.pt",
        "scheduler.pt",
        "rng_state.pt",
        "trainer_state.json",
        "config.yaml",
        "base_model.json",
        "tokenizer.model",
        "preprocessor_config.json",
    ):
        assert (ckpt / name).is_file(), name
    assert not list(sft_dir.glob(".tmp-*"))
    adapter_config = json.loads((ckpt / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(twin.resolve())  # the base, for PeftModel
    assert sorted(losses_by_step(sft_dir)) == [1, 2, 3, 4, 5, 6]
    assert 0 in eval_losses(sft_dir)  # the starting point is evaluated too
    assert (sft_dir / "loss.png").stat().st_size > 1000
    assert not (sft_dir / "profile").exists()  # trainer.profile_steps=0: no profiler
    assert all(0.0 <= r["data_wait_pct"] <= 100.0 for r in log_records(sft_dir) if "loss" in r)
    summary = json.loads((sft_dir / "summary.json").read_text())
    assert summary["global_step"] == 6 and summary["trainable_params"] < summary["total_params"]
    # the plan knew the base model's size before it loaded (full fine-tuning's budget on large cards)
    assert planned["parameters"] == summary["total_params"] - summary["trainable_params"]
    assert out["ckpt"] == (sft_dir / "best").resolve()


def crash_at_micro_step(n: int, monkeypatch, cfg, run_dir: Path) -> None:
    """Runs the sft stage with `cfg` into `run_dir`, crashing it at its `n`-th micro-step."""
    real_step = loop.Trainer._step
    calls = {"n": 0}

    def crashing(self, micro):
        calls["n"] += 1
        if calls["n"] == n:
            raise RuntimeError("simulated crash")
        return real_step(self, micro)

    monkeypatch.setattr(loop.Trainer, "_step", crashing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_stage(sft, cfg, run_dir)
    monkeypatch.setattr(loop.Trainer, "_step", real_step)


def test_resume_after_a_crash_repeats_the_uninterrupted_losses(twin, tmp_path, monkeypatch):
    whole = tmp_path / "whole"
    run_stage(sft, make_cfg(twin, *SHORT), whole)
    reference = losses_by_step(whole / "sft")

    crashed = tmp_path / "crashed"
    crash_at_micro_step(5, monkeypatch, make_cfg(twin, *SHORT), crashed)
    assert [p.name for p in list_checkpoints(crashed / "sft")] == ["checkpoint-3"]

    out = run_stage(sft, make_cfg(twin, *SHORT), crashed)  # trainer.resume=auto
    assert out["sft"]["resumed_from"].endswith("checkpoint-3")
    resumed = losses_by_step(crashed / "sft")
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]
    for step in range(1, 7):
        assert resumed[step] == pytest.approx(reference[step], rel=1e-5, abs=1e-6), step


def test_a_model_only_checkpoint_resumes_with_fresh_optimizer_moments(twin, tmp_path, monkeypatch, caplog):
    """trainer.save_only_model=true (ms-swift's save_only_model): checkpoints hold the weights, the schedule,
    the step and the random state but no optimizer state; a crashed run resumes from one with a warning, its
    next step's loss that of the uninterrupted run (the same weights and rows), and trains to its end."""
    only_model = (*SHORT, "trainer.save_only_model=true")
    whole = tmp_path / "whole"
    run_stage(sft, make_cfg(twin, *only_model), whole)
    reference = losses_by_step(whole / "sft")
    for ckpt in list_checkpoints(whole / "sft"):
        assert not (ckpt / "optimizer.pt").exists() and (ckpt / "adapter_model.safetensors").is_file()
        assert (ckpt / "scheduler.pt").is_file() and (ckpt / "trainer_state.json").is_file()

    crashed = tmp_path / "crashed"
    crash_at_micro_step(5, monkeypatch, make_cfg(twin, *only_model), crashed)
    with caplog.at_level("WARNING", logger="pipeline.training.checkpoints"):
        out = run_stage(sft, make_cfg(twin, *only_model), crashed)  # trainer.resume=auto
    assert out["sft"]["resumed_from"].endswith("checkpoint-3")
    assert "holds no optimizer state (trainer.save_only_model=true)" in caplog.text
    resumed = losses_by_step(crashed / "sft")
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]
    for step in range(1, 5):  # step 4's loss is computed before its update: the weights of checkpoint-3
        assert resumed[step] == pytest.approx(reference[step], rel=1e-5, abs=1e-6), step
    # a checkpoint with the optimizer's state, whose optimizer.pt is lost, is damaged, not model-only
    normal = tmp_path / "normal"
    run_stage(sft, make_cfg(twin, *SHORT), normal)
    third, sixth = list_checkpoints(normal / "sft")
    shutil.rmtree(sixth)
    (third / "optimizer.pt").unlink()
    with pytest.raises(CheckpointError, match="optimizer.pt"):
        run_stage(sft, make_cfg(twin, *SHORT), normal)


def test_sigterm_saves_a_checkpoint_then_stops(twin, tmp_path, monkeypatch):
    real_step = loop.Trainer._step
    calls = {"n": 0}

    def terminate_during_step_2(self, micro):
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(self, micro)

    monkeypatch.setattr(loop.Trainer, "_step", terminate_during_step_2)
    with pytest.raises(KeyboardInterrupt, match="SIGTERM at step 2"):
        run_stage(sft, make_cfg(twin, *SHORT), tmp_path)
    assert [p.name for p in list_checkpoints(tmp_path / "sft")] == ["checkpoint-2"]
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_bad_resume_path_is_refused(twin, tmp_path):
    with pytest.raises(loop.TrainingError, match="not a complete checkpoint"):
        run_stage(sft, make_cfg(twin, *SHORT, f"trainer.resume={tmp_path / 'nope'}"), tmp_path)


LEARN = (
    "trainer.max_steps=30",
    "trainer.batch_size=4",
    "trainer.eval_steps=30",
    "trainer.save_steps=30",
    "trainer.max_eval_samples=12",
    "model.gradient_checkpointing=false",
)


def test_full_finetuning_lowers_eval_loss_markedly(twin, tmp_path):
    run_stage(sft, make_cfg(twin, "+experiment=full", *LEARN, "optim.lr=1e-3"), tmp_path)
    losses = eval_losses(tmp_path / "sft")
    assert losses[30] < 0.95 * losses[0], losses


def test_full_finetuning_with_a_share_of_checkpointed_layers_trains_as_without(twin, tmp_path, caplog):
    """model.gradient_checkpointing=0.5 through the entry: the same losses as without checkpointing (the
    recompute changes where activations come from, not their values), and the plan says what it checkpoints."""
    from pipeline.__main__ import run_pipeline

    steps = ("trainer.max_steps=3", "trainer.logging_steps=1", "trainer.batch_size=2", "stages=[sft]")
    losses = {}
    for share in ("0.5", "false"):
        run_dir = tmp_path / share
        cfg = make_cfg(twin, "+experiment=full", *steps, f"model.gradient_checkpointing={share}")
        with caplog.at_level("INFO"):
            run_pipeline(cfg, run_dir)
        losses[share] = losses_by_step(run_dir / "sft")
    assert len(losses["false"]) == 3
    assert losses["0.5"] == pytest.approx(losses["false"], rel=1e-5)
    assert "the vision tower and 0.5 of the language model's layers (the first ones)" in caplog.text


@pytest.mark.parametrize("preset", ["lora_qkv", "lora_all"])
def test_lora_lowers_eval_loss_measurably(twin, tmp_path, preset):
    run_stage(sft, make_cfg(twin, f"+experiment={preset}", *LEARN, "optim.lr=3e-3"), tmp_path)
    losses = eval_losses(tmp_path / "sft")
    assert losses[30] < 0.99 * losses[0], losses


def test_a_nan_loss_stops_training_with_the_step_and_advice(twin, tmp_path, monkeypatch):
    from pipeline.families.minicpm_v2.modeling import MiniCPMV

    real = MiniCPMV.lm_loss

    def nan_loss(self, hidden, labels, chunking="off"):
        loss_sum, tokens, correct = real(self, hidden, labels, chunking)
        return loss_sum * float("nan"), tokens, correct

    monkeypatch.setattr(MiniCPMV, "lm_loss", nan_loss)
    with pytest.raises(loop.TrainingError, match=r"loss is nan at step 1: lower optim.lr"):
        run_stage(sft, make_cfg(twin, *SHORT), tmp_path)


@pytest.mark.parametrize(
    ("regime", "first_knob"),
    [
        (("trainer.micro_batch_tokens=4096",), r"trainer\.micro_batch_tokens=2048 \(now 4096: the tokens a"),
        (("trainer.micro_batch_tokens=0",), r"a smaller trainer\.batch_size \(now 2\) with a larger"),
        ((), r"trainer\.micro_batch_tokens=256 \(now 512: the tokens a micro-batch holds"),
    ],
)
def test_out_of_memory_names_the_knob_that_bounds_a_micro_batch_in_its_regime(
    twin, tmp_path, monkeypatch, regime, first_knob
):
    """With a token budget a micro-batch is bounded by trainer.micro_batch_tokens, not trainer.batch_size;
    the plain regime's by batch_size. auto (4096 on the CPU and small cards) first halves its budget down to
    512, and says so. The family's resolution setting is named too."""
    from pipeline.families.minicpm_v2.modeling import MiniCPMV

    real = MiniCPMV.lm_loss

    def out_of_memory(self, hidden, labels, chunking="off"):
        if torch.is_grad_enabled():  # training's forward; the first evaluation runs
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, hidden, labels, chunking)

    monkeypatch.setattr(MiniCPMV, "lm_loss", out_of_memory)
    with pytest.raises(loop.TrainingError) as caught:
        run_stage(sft, make_cfg(twin, *SHORT, "trainer.micro_batch_tokens=auto", *regime), tmp_path)
    said = str(caught.value)
    assert re.match(
        r"out of GPU memory at step 1 \(its largest of \d+ micro-batch\(es\): \d+ padded tokens\)", said
    )
    assert re.search(r"Knobs, cheapest first: " + first_knob, said), said
    assert "model.max_slice_nums (fewer image tokens)" in said
    assert ("trainer.batch_size" in said) == ("trainer.micro_batch_tokens=0" in regime)
    halved = "(trainer.micro_batch_tokens=auto halved the budget down to 512 tokens, its smallest)"
    assert (halved in said) == (not regime), said
    assert isinstance(caught.value.__cause__, torch.OutOfMemoryError)


def test_a_run_stopped_out_of_memory_resumes_with_the_smaller_budget_it_was_told(twin, tmp_path, monkeypatch):
    """Out of memory at step 5 (checkpoint-3 written): the rerun with the advised trainer.micro_batch_tokens
    resumes from checkpoint-3 and ends the run; its steps equal an uninterrupted run's (the budget cuts the
    same rows into other micro-batches, with the same token-weighted loss)."""
    real = loop.Trainer._step

    def out_of_memory_at_step_5(self, micro):
        if self.state.global_step == 4:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, micro)

    common = (*SHORT, "lora.dropout=0.0")
    whole = tmp_path / "whole"
    run_stage(sft, make_cfg(twin, *common, "trainer.micro_batch_tokens=auto"), whole)
    monkeypatch.setattr(loop.Trainer, "_step", out_of_memory_at_step_5)
    with pytest.raises(loop.TrainingError, match=r"at step 5 .*trainer\.micro_batch_tokens=2048 \(now 4096"):
        run_stage(sft, make_cfg(twin, *common, "trainer.micro_batch_tokens=4096"), tmp_path / "run")
    assert [p.name for p in list_checkpoints(tmp_path / "run" / "sft")] == ["checkpoint-3"]
    monkeypatch.setattr(loop.Trainer, "_step", real)
    run_stage(sft, make_cfg(twin, *common, "trainer.micro_batch_tokens=2048"), tmp_path / "run")
    resumed, uninterrupted = losses_by_step(tmp_path / "run" / "sft"), losses_by_step(whole / "sft")
    assert sorted(resumed) == sorted(uninterrupted) == [1, 2, 3, 4, 5, 6]
    assert resumed == pytest.approx(uninterrupted, rel=1e-5)


def test_the_auto_budget_halves_and_redoes_a_step_out_of_memory_and_resumes_at_it(
    twin, tmp_path, monkeypatch, caplog
):
    """trainer.micro_batch_tokens=auto: step 2 (16 rows, ~700 tokens) runs out of memory at 4096, 2048 and
    1024 tokens a micro-batch; it is redone at 512 with the same rows, the run goes on at 512 and
    checkpoint-3 records it. Killed at step 5, the same command resumes at 512 from checkpoint-3. Every
    step's loss equals an uninterrupted run's at 4096 (the loss is summed over the step's tokens), in more
    micro-batches from step 2 on."""
    real = loop.Trainer._step
    killed = {"on": True}

    def small_memory(self, micro):
        if self.state.global_step == 1 and self.s.micro_batch_tokens > 512:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if killed["on"] and self.state.global_step == 4:
            raise RuntimeError("killed")
        return real(self, micro)

    common = (*SHORT, "lora.dropout=0.0", "trainer.micro_batch_tokens=auto", "trainer.grad_accum=8")
    whole = tmp_path / "whole"
    run_stage(sft, make_cfg(twin, *common), whole)
    monkeypatch.setattr(loop.Trainer, "_step", small_memory)
    with (
        caplog.at_level("WARNING", logger="pipeline.training.loop"),
        pytest.raises(RuntimeError, match="killed"),
    ):
        run_stage(sft, make_cfg(twin, *common), tmp_path / "run")
    said = [r.getMessage() for r in caplog.records if "out of GPU memory at step 2" in r.getMessage()]
    assert [re.search(r"up to (\d+) tokens: .* retries at (\d+)", m).groups() for m in said] == [
        ("4096", "2048"),
        ("2048", "1024"),
        ("1024", "512"),
    ]
    state = json.loads((tmp_path / "run" / "sft" / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["micro_batch_tokens"] == 512
    killed["on"] = False
    caplog.clear()
    with caplog.at_level("INFO", logger="pipeline.training.loop"):
        run_stage(sft, make_cfg(twin, *common), tmp_path / "run")
    assert any(
        "resuming at the token budget the run halved to: 512" in r.getMessage() for r in caplog.records
    )
    resumed, uninterrupted = losses_by_step(tmp_path / "run" / "sft"), losses_by_step(whole / "sft")
    assert sorted(resumed) == sorted(uninterrupted) == [1, 2, 3, 4, 5, 6]
    assert resumed == pytest.approx(uninterrupted, rel=1e-5)
    micro = {
        name: {r["step"]: r["micro_batches"] for r in log_records(folder / "sft") if "micro_batches" in r}
        for name, folder in (("run", tmp_path / "run"), ("whole", whole))
    }
    assert micro["run"][1] == micro["whole"][1]
    assert all(micro["run"][step] > micro["whole"][step] for step in range(2, 7)), micro


def test_the_auto_budget_halves_for_an_evaluation_out_of_memory(twin, tmp_path, monkeypatch, caplog):
    """The evaluation at step 3 runs out of memory at auto's 4096 tokens and at 2048, 1024: it is redone at
    512, and the steps after it run at 512 too (the one budget bounds both), in more micro-batches; the
    checkpoint records it."""
    real = loop.Trainer._evaluate

    def small_memory(self):
        if self.state.global_step == 3 and self.s.micro_batch_tokens > 512:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self)

    monkeypatch.setattr(loop.Trainer, "_evaluate", small_memory)
    overrides = (*SHORT, "trainer.micro_batch_tokens=auto", "trainer.grad_accum=8", "lora.dropout=0.0")
    with caplog.at_level("WARNING", logger="pipeline.training.loop"):
        run_stage(sft, make_cfg(twin, *overrides), tmp_path)
    said = [r.getMessage() for r in caplog.records if "out of GPU memory" in r.getMessage()]
    assert len(said) == 3 and all("evaluating at step 3 with micro-batches" in m for m in said), said
    assert sorted(eval_losses(tmp_path / "sft")) == [0, 3, 6]
    micro = {r["step"]: r["micro_batches"] for r in log_records(tmp_path / "sft") if "micro_batches" in r}
    assert [micro[step] for step in range(1, 7)] == [1, 1, 1, 2, 2, 2], micro
    state = json.loads((tmp_path / "sft" / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["micro_batch_tokens"] == 512


def test_out_of_memory_while_evaluating_names_the_evaluations_knobs(twin, tmp_path, monkeypatch):
    from pipeline.families.minicpm_v2.modeling import MiniCPMV

    def out_of_memory(self, hidden, labels, chunking="off"):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(MiniCPMV, "lm_loss", out_of_memory)
    with pytest.raises(loop.TrainingError) as caught:
        run_stage(
            sft, make_cfg(twin, *SHORT, "trainer.micro_batch_tokens=0", "trainer.eval_batch_size=2"), tmp_path
        )
    said = str(caught.value)
    assert said.startswith("out of GPU memory evaluating at step 0 (its largest of 1 micro-batch(es): ")
    assert (
        "Knobs, cheapest first: a smaller trainer.eval_batch_size (now 2), a smaller dataset.max_length"
        in said
    )
    assert "gradient_checkpointing" not in said


@pytest.mark.parametrize("stage", ["sft", "eval", "infer"])
def test_the_dataset_is_read_and_checked_before_the_weights_load(tmp_path, stage):
    data = tmp_path / "rows.jsonl"
    data.write_text('{"query": "q", "response": "a"}\n{"query": "q", "response": ""}\n', encoding="utf-8")
    overrides = ["dataset=custom", f"dataset.path={data}", "model.build_if_missing=false", "device=cpu"]
    if stage != "sft":
        overrides += [f"stages=[{stage}]", "ckpt=base"]
    cfg = make_cfg(tmp_path / "no_model_here", *overrides)
    module = {"sft": sft, "eval": eval_stage, "infer": infer_stage}[stage]
    with pytest.raises(DatasetError, match=r"rows.jsonl:2: 'response' is empty"):
        run_stage(module, cfg, tmp_path / "run")


@pytest.mark.parametrize(("loss_scale", "answers"), [("auto", 2), ("last_round", 1)])
def test_the_loss_scale_picks_the_answers_that_train(twin, tmp_path, monkeypatch, loss_scale, answers):
    from pipeline.families import get_family

    family = type(get_family("minicpm_v2"))
    built = []
    original = family.dataset

    def keep(self, *args, **kwargs):
        built.append(original(self, *args, **kwargs))
        return built[-1]

    monkeypatch.setattr(family, "dataset", keep)
    rows = [
        {"history": [[f"Name {k}.", f"It is {k}."]], "query": "Twice?", "response": f"{2 * k}."}
        for k in range(8)
    ]
    data = tmp_path / "rounds.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    extra = (
        "dataset=custom",
        f"dataset.path={data}",
        "dataset.test_ratio=0.25",
        f"dataset.loss_scale={loss_scale}",
    )
    out = run_stage(sft, make_cfg(twin, *SHORT, "trainer.max_steps=1", *extra), tmp_path)
    assert out["sft"]["global_step"] == 1
    train, val = built[:2]
    for dataset in (train, val):
        for k in range(len(dataset)):
            labelled = [i for i, label in enumerate(dataset[k].labels) if label != -100]
            runs = sum(1 for i in labelled if i - 1 not in labelled)  # each answer is one unbroken run
            assert runs == answers
