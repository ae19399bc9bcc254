"""Several processes (gloo on CPU): one run folder for all ranks, rank 0 writes, and 2 processes train exactly
like 1 process with the same global batch, also when text-only and image rows meet in one step."""

from __future__ import annotations

import json
import sys
import textwrap
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from PIL import Image

from pipeline import distributed
from pipeline.config import ConfigError
from pipeline.stages import dpo, sft
from pipeline.training.loop import window_indices
from tests.helpers import (
    CONF_DIR,
    REPO_ROOT,
    compose_config,
    free_port,
    log_records,
    run_folders,
    run_python,
    run_stage,
    write_rows,
)

BIN = Path(sys.executable).parent
# no learning-rate schedule and no dropout: any difference in the gradients shows in the next step's loss
EXACT = (
    "trainer.logging_steps=1",
    "trainer.eval_steps=100",
    "trainer.save_steps=100",
    "trainer.max_eval_samples=4",
    "lora.dropout=0",
    "optim.lr=1e-2",
    "optim.scheduler=constant",
    "optim.warmup_ratio=0",
    "tracking=none",
)


def assert_same_curve(multi: list[dict], single: list[dict], steps: int) -> None:
    """The train losses (every step) and eval losses (start and end) agree to a relative 1e-4."""
    losses = lambda records, key: {r["step"]: r[key] for r in records if key in r}  # noqa: E731
    for key in ("loss", "eval_loss"):
        got, want = losses(multi, key), losses(single, key)
        assert sorted(got) == sorted(want) and got, key
        for step in want:
            assert got[step] == pytest.approx(want[step], rel=1e-4), (key, step, got, want)
    assert sorted(losses(multi, "loss")) == list(range(1, steps + 1))


def train_single(twin: Path, folder: Path, *overrides: str, stage=sft) -> list[dict]:
    """Train with `stage` (sft or dpo) in this process (one process) and return its logging.jsonl records."""
    cfg = compose_config([f"model.path={twin}", *overrides])
    run_stage(stage, cfg, folder)
    return log_records(folder / stage.__name__.rsplit(".", 1)[-1])


def assert_same_rewards(
    multi: list[dict], single: list[dict], keys: tuple[str, ...], steps: int, first: int = 1
) -> None:
    """The preference statistics `keys` of every train step from `first` on agree to a relative 1e-4."""
    for key in keys:
        got = {r["step"]: r[key] for r in multi if key in r and r["step"] >= first}
        want = {r["step"]: r[key] for r in single if key in r and r["step"] >= first}
        assert got.keys() == want.keys() == set(range(first, steps + 1))
        assert got == pytest.approx(want, rel=1e-4, abs=1e-5), key


# ----- the run folder every process agrees on (no model)


def test_one_process_keeps_argv_as_it_is(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    argv = ["pipeline", "a=1"]
    assert distributed.pin_run_dirs(argv, CONF_DIR / "config.yaml") == argv


def test_run_folders_are_pinned_before_the_first_override(monkeypatch):
    start = datetime(2025, 3, 4, 5, 6, 7)
    monkeypatch.setattr(distributed, "shared_start_time", lambda: start)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    argv = ["pipeline", "-m", "a=1", "b=2"]
    pinned = distributed.pin_run_dirs(argv, CONF_DIR / "config.yaml")
    assert pinned == [
        "pipeline",
        "-m",
        "hydra.run.dir=${output_root}/${experiment_name}/20250304-050607",
        "hydra.sweep.dir=${output_root}/${experiment_name}/multirun-20250304-050607",
        "a=1",
        "b=2",
    ]
    monkeypatch.setenv("RANK", "1")  # the other ranks leave Hydra's .hydra/ record to rank 0
    assert distributed.pin_run_dirs(argv, CONF_DIR / "config.yaml")[-3:] == [
        "hydra.output_subdir=null",
        "a=1",
        "b=2",
    ]
    # a folder given on the command line wins; --cfg runs nothing
    assert distributed.pin_run_dirs(["p", "hydra.run.dir=x"], CONF_DIR / "config.yaml") == [
        "p",
        "hydra.sweep.dir=${output_root}/${experiment_name}/multirun-20250304-050607",
        "hydra.output_subdir=null",
        "hydra.run.dir=x",
    ]
    assert distributed.pin_run_dirs(["p", "--cfg", "job"], CONF_DIR / "config.yaml") == ["p", "--cfg", "job"]


def test_pinned_folder_composes_to_the_shared_time(monkeypatch):
    monkeypatch.setattr(distributed, "shared_start_time", lambda: datetime(2025, 3, 4, 5, 6, 7))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    pinned = distributed.pin_run_dirs(["pipeline", "+experiment=lora_qkv"], CONF_DIR / "config.yaml")
    cfg = compose_config(pinned[1:], return_hydra_config=True)
    assert cfg.hydra.run.dir == "outputs/lora_qkv/20250304-050607"


def test_start_time_comes_from_the_first_process_to_ask(monkeypatch):
    from torch.distributed import TCPStore

    port = free_port()
    server = TCPStore("127.0.0.1", port, is_master=True, timeout=timedelta(seconds=10))
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    first = distributed.shared_start_time(timeout_s=10)
    monkeypatch.setattr(distributed.time, "time", lambda: first.timestamp() + 3600)  # a later process
    assert distributed.shared_start_time(timeout_s=10) == first
    del server


def test_processes_without_a_launcher_store_must_name_the_folder(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)
    with pytest.raises(ConfigError, match=r"pass the folder yourself, e\.g\. hydra\.run\.dir=outputs/my_run"):
        distributed.pin_run_dirs(["pipeline", "a=1"], CONF_DIR / "config.yaml")
    monkeypatch.setenv("RANK", "one")
    with pytest.raises(ConfigError, match="environment variable RANK='one' is not an integer"):
        distributed.process_rank()


def test_other_ranks_run_only_the_distributed_stages(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    assert [s for s in ("sft", "eval", "merge", "infer") if distributed.runs_here(s)] == ["sft"]
    monkeypatch.setenv("RANK", "0")
    assert all(distributed.runs_here(s) for s in ("sft", "eval", "merge", "infer"))


# ----- real multi-process runs


def test_torchrun_two_processes_train_like_one_with_the_same_global_batch(tiny_twin, tmp_path):
    # rank 1 starts a second and a half late: `${now:...}` alone would give it a run folder of its own
    script = tmp_path / "late_rank.py"
    script.write_text(
        textwrap.dedent(
            """
            import os, sys, time
            if os.environ["RANK"] == "1":
                time.sleep(1.5)
            from pipeline.__main__ import main
            sys.argv = ["pipeline", *sys.argv[1:]]
            sys.exit(main())
            """
        )
    )
    out = tmp_path / "outputs"
    common = [
        "+experiment=lora_qkv",
        f"model.path={tiny_twin}",
        "dataset.max_rows=48",
        *EXACT,
        "trainer.max_steps=4",
    ]
    done = run_python(
        [
            str(BIN / "torchrun"),
            "--standalone",
            "--nproc_per_node",
            "2",
            str(script),
            *common,
            f"output_root={out}",
            "stages=[sft,eval]",
            "eval.generate=false",
            "eval.max_samples=2",
            "trainer.batch_size=2",
            "trainer.grad_accum=1",
        ],  # fmt: skip
        tmp_path,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    (run_dir,) = run_folders(out)  # one folder for both ranks
    assert [p.name for p in (out / "lora_qkv").iterdir()] == [run_dir.name]
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "ok" and info["stages_done"] == ["sft", "eval"]
    assert (run_dir / "eval").is_dir() and (run_dir / "sft" / "checkpoint-4").is_dir()
    log_text = (run_dir / "run.log").read_text()
    assert log_text.count("stage sft: writing into") == 1  # only rank 0 logs into run.log
    assert done.stdout.count("run folder:") == 1

    single = train_single(
        tiny_twin, tmp_path / "single", *common, "trainer.batch_size=2", "trainer.grad_accum=2"
    )
    assert_same_curve(log_records(run_dir / "sft"), single, steps=4)


def test_dpo_in_two_processes_trains_like_one_with_the_cached_reference_gathered(tiny_twin, tmp_path):
    # full fine-tuning: each process scores every other pair for the reference table, which is gathered; the
    # loss is normalised over the pairs of both processes
    common = ["+experiment=dpo", "lora=none", "dataset.max_rows=24", *EXACT, "optim.lr=1e-4",
              "trainer.max_steps=3", "trainer.batch_size=2", "trainer.eval_steps=3"]  # fmt: skip
    out = tmp_path / "outputs"
    done = run_python(
        [
            str(BIN / "torchrun"),
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "pipeline",
            *common,
            f"model.path={tiny_twin}",
            f"output_root={out}",
            "stages=[dpo]",
            "trainer.grad_accum=1",
            "device=cpu",
        ],  # fmt: skip
        tmp_path,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    (run_dir,) = run_folders(out)
    single = train_single(
        tiny_twin, tmp_path / "single", *common, "trainer.grad_accum=2", "device=cpu", stage=dpo
    )
    multi = log_records(run_dir / "dpo")
    assert_same_curve(multi, single, steps=3)
    assert_same_rewards(multi, single, ("rewards/margins", "logps/chosen"), steps=3)
    # at step 1 the policy is the reference: its margins are float noise around 0 (equal to 1e-5 above), so the
    # share of them above 0 is noise too; the steps after it compare
    assert_same_rewards(multi, single, ("rewards/accuracies",), steps=3, first=2)


def write_mixed_dataset(folder: Path, text_only: set[int], n_rows: int) -> tuple[Path, Path]:
    """Write train.jsonl (rows in `text_only` without an image, the others with one) and val.jsonl."""
    folder.mkdir(parents=True, exist_ok=True)
    colors = {"red": (220, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 220)}
    rows = []
    for i in range(n_rows):
        if i in text_only:
            rows.append({"query": f"What is {i} + 2?", "response": f"{i} + 2 = {i + 2}"})
        else:
            name = list(colors)[i % 3]
            path = folder / f"{i}.png"
            Image.new("RGB", (112 + 8 * (i % 4), 112), colors[name]).save(path)
            rows.append(
                {"query": "What color is the image?", "response": f"It is {name}.", "images": [str(path)]}
            )
    return write_rows(folder / "train.jsonl", rows), write_rows(folder / "val.jsonl", rows[:2])


def test_accelerate_launch_with_text_only_and_image_rows_in_one_step(tiny_twin, tmp_path):
    # lora=all trains the vision tower too: a rank whose batch has no image must still take part in the
    # gradient all-reduce of the vision weights, or DDP hangs or fails
    n_rows, steps, seed = 24, 3, 42
    row_of = lambda step, rank: window_indices(n_rows, seed, 0, step, 2, rank, 2)[0]  # noqa: E731
    # step 1: rank 0 text-only, rank 1 an image; step 2: both text-only; step 3: both images
    text_only = {row_of(0, 0), row_of(1, 0), row_of(1, 1)}
    train, val = write_mixed_dataset(tmp_path / "data", text_only, n_rows)

    out = tmp_path / "outputs"
    common = ["+experiment=lora_all", f"model.path={tiny_twin}", "dataset=custom", f"dataset.path={train}",
              f"dataset.val_path={val}", *EXACT, f"trainer.max_steps={steps}", "trainer.batch_size=1"]  # fmt: skip
    done = run_python(
        [
            str(BIN / "accelerate"),
            "launch",
            "--config_file",
            str(REPO_ROOT / "bench" / "accelerate" / "ddp_cpu.yaml"),
            "--main_process_port",
            str(free_port()),
            "-m",
            "pipeline",
            *common,
            f"output_root={out}",
            "stages=[sft]",
            "trainer.grad_accum=1",
            "device=cpu",
        ],
        tmp_path,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    (run_dir,) = run_folders(out)
    single = train_single(tiny_twin, tmp_path / "single", *common, "trainer.grad_accum=2")
    assert_same_curve(log_records(run_dir / "sft"), single, steps=steps)


def test_submitit_job_of_two_tasks_trains_as_two_processes(tiny_twin, tmp_path):
    # tasks_per_node=2 (on SLURM: one task per GPU) makes each job of a sweep one data-parallel run
    out = tmp_path / "outputs"
    done = run_python(
        [
            sys.executable,
            "-m",
            "pipeline",
            "-m",
            "hydra/launcher=local",
            "hydra.launcher.tasks_per_node=2",
            "+experiment=lora_qkv",
            f"model.path={tiny_twin}",
            f"output_root={out}",
            "stages=[sft]",
            "trainer.max_steps=2",
            "trainer.batch_size=1",
            "trainer.max_eval_samples=1",
            "dataset.max_rows=24",
            "trainer.logging_steps=1",
        ],  # fmt: skip
        tmp_path,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    (run_dir,) = run_folders(out)
    summary = json.loads((run_dir / "sft" / "summary.json").read_text())
    first = next(r for r in log_records(run_dir / "sft") if r.get("step") == 1 and "loss" in r)
    # an epoch of N rows is N // (batch 1 x accumulation 1 x 2 processes) steps
    assert first["epoch"] == round(1 / (summary["train_rows"] // 2), 4)
    assert (run_dir.parent / "summary.csv").is_file()


def test_shipped_accelerate_configs_load():
    from accelerate.commands.config.config_args import load_config_from_file

    kinds = {
        path.stem: load_config_from_file(str(path))
        for path in sorted((REPO_ROOT / "bench" / "accelerate").glob("*.yaml"))
    }
    assert {name: str(c.distributed_type).split(".")[-1] for name, c in kinds.items()} == {
        "ddp": "MULTI_GPU",
        "ddp_cpu": "MULTI_GPU",
        "fsdp": "FSDP",
        "fsdp_grad_op": "FSDP",
        "deepspeed_zero2": "DEEPSPEED",
        "deepspeed_zero3": "DEEPSPEED",
    }
    for name in ("fsdp", "fsdp_grad_op"):
        fsdp = kinds[name].fsdp_config
        assert fsdp["fsdp_version"] == 2 and fsdp["fsdp_state_dict_type"] == "FULL_STATE_DICT"
        # no family's classes named: the pipeline wraps the loaded model's own units (tests/training/test_fsdp.py)
        assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
        assert "fsdp_transformer_layer_cls_to_wrap" not in fsdp
    # full sharding (ZeRO-3's counterpart) and sharding of gradients and optimizer state only (ZeRO-2's)
    assert kinds["fsdp"].fsdp_config["fsdp_reshard_after_forward"] is True
    assert kinds["fsdp_grad_op"].fsdp_config["fsdp_reshard_after_forward"] is False
    assert [kinds[f"deepspeed_zero{n}"].deepspeed_config["zero_stage"] for n in (2, 3)] == [2, 3]
