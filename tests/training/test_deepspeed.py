"""DeepSpeed ZeRO-2/3 through `accelerate launch` with the shipped configs, on two CPU processes
(DS_ACCELERATOR=cpu, gloo): the loss curve of one process with the same global batch, batches that mix
text-only and image rows, exact resume from the engine's sharded state, and whole weights in checkpoints."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file

from pipeline.families.minicpm_v2.checkpoint import check_checkpoint
from pipeline.families.minicpm_v2.configuration import MiniCPMVConfig
from pipeline.stages import dpo
from pipeline.training.loop import window_indices
from tests.entry.test_distributed import (
    BIN,
    EXACT,
    assert_same_curve,
    assert_same_rewards,
    train_single,
    write_mixed_dataset,
)
from tests.helpers import REPO_ROOT, free_port, log_records, run_folders, run_python

pytest.importorskip("deepspeed")  # installed by `make test` (Makefile); a bare environment skips


def cpu_config(stage: int, folder: Path) -> Path:
    """The shipped config with fp32 (the CPU has no bf16 DeepSpeed path worth testing)."""
    text = (REPO_ROOT / "bench" / "accelerate" / f"deepspeed_zero{stage}.yaml").read_text()
    path = folder / f"zero{stage}.yaml"
    path.write_text(text.replace("mixed_precision: bf16", "mixed_precision: 'no'"))
    return path


def ds_launch(config: Path, cwd: Path, *overrides: str, stage: str = "sft"):
    cmd = [str(BIN / "accelerate"), "launch", "--config_file", str(config), "--num_processes", "2",
           "--main_process_port", str(free_port()), "-m", "pipeline", *overrides, "tracking=none",
           f"stages=[{stage}]"]  # fmt: skip
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DS_ACCELERATOR", "cpu")
        return run_python(cmd, cwd, timeout=420)


# ZeRO-2 runs the same path with unsharded weights: it stays in `make test-all` (the fast suite keeps ZeRO-3)
@pytest.mark.parametrize("stage", [pytest.param(2, marks=pytest.mark.slow), 3])
def test_zero_with_text_only_and_image_rows_trains_like_one_process(briefly_pretrained_twin, tmp_path, stage):
    # lora=all trains the vision tower too; under ZeRO-3 its weights are partitioned, so a rank whose batch
    # has no image must still gather them with the others. Two micro-batches per step: the loop's window.
    n_rows, steps, seed = 24, 3, 42
    row_of = lambda step, rank, micro: window_indices(n_rows, seed, 0, step, 4, rank, 2)[micro]  # noqa: E731
    text_only = {row_of(0, 0, 0), row_of(0, 0, 1), row_of(1, 1, 0), row_of(1, 1, 1)}
    train, val = write_mixed_dataset(tmp_path / "data", text_only, n_rows)
    common = ["+experiment=lora_all", f"model.path={briefly_pretrained_twin}", "dataset=custom", f"dataset.path={train}",
              f"dataset.val_path={val}", *EXACT, f"trainer.max_steps={steps}", "trainer.batch_size=1",
              "optim.max_grad_norm=0.5"]  # fmt: skip
    out = tmp_path / "outputs"
    done = ds_launch(
        cpu_config(stage, tmp_path), tmp_path, *common, f"output_root={out}", "trainer.grad_accum=2"
    )
    assert done.returncode == 0, done.stderr[-4000:]
    (run_dir,) = run_folders(out)
    assert "engine: DEEPSPEED, 2 process(es)" in (run_dir / "run.log").read_text()
    single = train_single(briefly_pretrained_twin, tmp_path / "single", *common, "trainer.grad_accum=4")
    multi = log_records(run_dir / "sft")
    assert_same_curve(multi, single, steps=steps)
    # DeepSpeed clips by optim.max_grad_norm and reports the norm before clipping, as one process does
    norms = lambda records: {r["step"]: r["grad_norm"] for r in records if "loss" in r}  # noqa: E731
    for step, norm in norms(single).items():
        assert norms(multi)[step] == pytest.approx(norm, rel=1e-3), step


def test_zero3_with_text_only_and_image_rows_trains_an_hf_family_like_one_process(family_twin, tmp_path):
    # Qwen2.5-VL's tower runs inside its forward, after the input embeddings: a process whose batch has no
    # image makes a blank pass there (HFNativeFamily.balanced_vision), or ZeRO-3's gathers mismatch
    twin = family_twin("qwen2_5_vl")
    n_rows, steps, seed = 24, 3, 42
    row_of = lambda step, rank, micro: window_indices(n_rows, seed, 0, step, 4, rank, 2)[micro]  # noqa: E731
    text_only = {row_of(0, 0, 0), row_of(0, 0, 1), row_of(1, 1, 0), row_of(1, 1, 1)}
    train, val = write_mixed_dataset(tmp_path / "data", text_only, n_rows)
    common = ["+experiment=lora_all", "model=qwen2_5_vl_tiny", "dataset=custom", f"dataset.path={train}",
              f"dataset.val_path={val}", *EXACT, f"trainer.max_steps={steps}", "trainer.batch_size=1"]  # fmt: skip
    out = tmp_path / "outputs"
    done = ds_launch(cpu_config(3, tmp_path), tmp_path, *common, f"model.path={twin}", f"output_root={out}",
                     "trainer.grad_accum=2")  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    (run_dir,) = run_folders(out)
    single = train_single(twin, tmp_path / "single", *common, "trainer.grad_accum=4")
    assert_same_curve(log_records(run_dir / "sft"), single, steps=steps)


@pytest.mark.parametrize("lora", ["all", "qkv"])
def test_zero3_dpo_with_text_only_and_image_pairs_trains_an_hf_family_like_one_process(
    family_twin, tmp_path, lora
):
    # a pair batch's image features are computed before the forward (once a pair), the blank passes of a
    # process without images too; the reference pass (the adapter disabled) makes its own, or under
    # lora=qkv takes the policy's features and makes none
    import json

    twin = family_twin("qwen2_5_vl")
    n_rows, steps, seed = 24, 3, 42
    row_of = lambda step, rank, micro: window_indices(n_rows, seed, 0, step, 4, rank, 2)[micro]  # noqa: E731
    text_only = {row_of(0, 0, 0), row_of(0, 0, 1), row_of(1, 1, 0), row_of(1, 1, 1)}
    train, val = write_mixed_dataset(tmp_path / "data", text_only, n_rows)
    for path in (train, val):
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        path.write_text("".join(json.dumps({**row, "rejected_response": "No."}) + "\n" for row in rows))
    common = ["+experiment=dpo", f"lora={lora}", "model=qwen2_5_vl_tiny", "dataset=custom", f"dataset.path={train}",
              f"dataset.val_path={val}", *EXACT, "optim.lr=1e-3", f"trainer.max_steps={steps}",
              "trainer.batch_size=1", "trainer.eval_steps=3"]  # fmt: skip
    out = tmp_path / "outputs"
    done = ds_launch(cpu_config(3, tmp_path), tmp_path, *common, f"model.path={twin}", f"output_root={out}",
                     "trainer.grad_accum=2", stage="dpo")  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    (run_dir,) = run_folders(out)
    single = train_single(twin, tmp_path / "single", *common, "trainer.grad_accum=4", stage=dpo)
    multi = log_records(run_dir / "dpo")
    assert_same_curve(multi, single, steps=steps)
    assert_same_rewards(multi, single, ("rewards/margins",), steps=steps)


# the fast suite keeps ZeRO-3's whole-weight gather of full fine-tuning; the others run in `make test-all`
@pytest.mark.parametrize(
    ("stage", "experiment"),
    [
        pytest.param(2, "full", marks=pytest.mark.slow),
        (3, "full"),
        pytest.param(3, "lora_all", marks=pytest.mark.slow),
        # an adapter started from the base weights: the residual base rebuilt from the checkpoint on resume
        pytest.param(3, "lora_all+pissa", marks=pytest.mark.slow),
        # bitsandbytes' 8-bit AdamW inside ZeRO (its moments of the flat partitions in 8 bits)
        (3, "full+8bit"),
    ],
)
def test_zero_resumes_exactly_with_whole_weights(briefly_pretrained_twin, tmp_path, stage, experiment):
    config = cpu_config(stage, tmp_path)
    experiment, _, variant = experiment.partition("+")
    tuning = (
        ["optim.name=adamw_bnb_8bit"] if variant == "8bit" else [f"lora.init_weights={variant or 'true'}"]
    )
    common = [f"+experiment={experiment}", f"model.path={briefly_pretrained_twin}", "dataset.max_rows=48", *EXACT, "trainer.max_steps=4",
              "trainer.save_steps=2", "trainer.batch_size=1", "trainer.grad_accum=1", *tuning]  # fmt: skip
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    done = ds_launch(config, tmp_path, *common, f"hydra.run.dir={whole}")
    assert done.returncode == 0, done.stderr[-4000:]
    ckpt = whole / "sft" / "checkpoint-2"
    # the engine's own sharded state (one optimizer partition per process) and whole official weights
    assert len(list((ckpt / "deepspeed" / "state").glob("*optim_states.pt"))) == 2
    if experiment == "full":
        check_checkpoint(ckpt, MiniCPMVConfig.from_pretrained(briefly_pretrained_twin))
    else:
        adapter = load_file(str(ckpt / "adapter_model.safetensors"))
        assert adapter and all(t.numel() > 0 for t in adapter.values())  # gathered, not empty partitions
    assert (ckpt / "rng_state.pt").is_file() and (ckpt / "rng_state_1.pt").is_file()

    shutil.copytree(whole, resumed, symlinks=True)
    shutil.rmtree(resumed / "sft" / "checkpoint-4")
    done = ds_launch(config, tmp_path, *common, f"hydra.run.dir={resumed}")
    assert done.returncode == 0, done.stderr[-4000:]
    a = {r["step"]: r["loss"] for r in log_records(whole / "sft") if "loss" in r}
    b = {r["step"]: r["loss"] for r in log_records(resumed / "sft") if "loss" in r}
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    assert [b[s] for s in (3, 4)] == pytest.approx([a[s] for s in (3, 4)], rel=1e-5)
    # the resumed run's final weights equal the uninterrupted run's
    pattern = "model-00001-*.safetensors" if experiment == "full" else "adapter_model.safetensors"
    final_a = load_file(str(next((whole / "sft" / "checkpoint-4").glob(pattern))))
    final_b = load_file(str(next((resumed / "sft" / "checkpoint-4").glob(pattern))))
    for name, tensor in final_a.items():
        assert (final_b[name] - tensor).abs().max() <= 1e-5 * (1 + tensor.abs().max()), name


@pytest.mark.parametrize("lora", ["qkv", pytest.param("none", marks=pytest.mark.slow)])
def test_zero3_dpo_trains_like_one_process(briefly_pretrained_twin, tmp_path, lora):
    # ZeRO-3 partitions the weights: the reference pass (the adapter disabled, or the table of log-probs
    # computed before training for full fine-tuning) gathers them on every process like the policy's
    common = ["+experiment=dpo", f"lora={lora}", "dataset.max_rows=24", *EXACT, "optim.lr=1e-4",
              "trainer.max_steps=3", "trainer.batch_size=1", "trainer.eval_steps=3"]  # fmt: skip
    out = tmp_path / "outputs"
    done = ds_launch(cpu_config(3, tmp_path), tmp_path, *common, f"model.path={briefly_pretrained_twin}",
                     f"output_root={out}", "trainer.grad_accum=2", stage="dpo")  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    (run_dir,) = run_folders(out)
    single = train_single(briefly_pretrained_twin, tmp_path / "single", *common, "trainer.grad_accum=4",
                          "device=cpu", stage=dpo)  # fmt: skip
    multi = log_records(run_dir / "dpo")
    assert_same_curve(multi, single, steps=3)
    assert_same_rewards(multi, single, ("rewards/margins",), steps=3)


def test_deepspeed_state_of_another_process_count_is_refused_naming_both(tmp_path):
    from pipeline.training.checkpoints import load_training_checkpoint

    state = tmp_path / "checkpoint-2" / "deepspeed" / "state"
    state.mkdir(parents=True)
    for rank in range(2):
        (state / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").write_bytes(b"")
    with pytest.raises(ValueError, match=r"state of 2 processes, this run has 1.*--num_processes 2"):
        load_training_checkpoint(
            tmp_path / "checkpoint-2", None, None, None, read_full=lambda folder: {}, engine=object()
        )


def test_a_model_only_checkpoint_is_refused_under_deepspeed_naming_the_setting(tmp_path):
    """trainer.save_only_model=true writes no DeepSpeed state; the engine restores weights and optimizer
    together, so resuming under DeepSpeed from such a checkpoint says why and how to start anew."""
    from pipeline.training.checkpoints import CheckpointError, load_training_checkpoint

    ckpt = tmp_path / "checkpoint-2"
    ckpt.mkdir()
    (ckpt / "config.yaml").write_text("trainer:\n  save_only_model: true\n")
    with pytest.raises(
        CheckpointError, match=r"save_only_model=true.*no DeepSpeed state.*trainer.resume=never"
    ):
        load_training_checkpoint(ckpt, None, None, None, read_full=lambda folder: {}, engine=object())
