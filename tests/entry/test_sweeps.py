"""Sweeps: the per-job result files and the sweep summary, a grid multirun, Optuna, and submitit's launcher."""

from __future__ import annotations

import csv
import io
import json
import multiprocessing
import sys
from pathlib import Path

import pytest
import yaml

from pipeline import sweep
from tests.helpers import compose_config, run_entry

# the smallest run that still trains, evaluates and returns an objective
TINY = (
    "stages=[sft,eval]",
    "trainer.max_steps=1",
    "trainer.batch_size=1",
    "trainer.max_eval_samples=1",
    "dataset.max_rows=24",
    "model.gradient_checkpointing=false",
    "eval.generate=false",
    "eval.max_samples=2",
)


def only_sweep_dir(root: Path) -> Path:
    (found,) = list(root.glob("*/multirun-*"))
    return found


def read_csv(path: Path) -> list[dict]:
    return list(csv.DictReader(io.StringIO(path.read_text())))


# ----- the summary itself (no model)


def fake_job(sweep_dir: Path, num: int, overrides: list[str], status: str, objective: float | None) -> Path:
    job_dir = sweep_dir / str(num)
    job_dir.mkdir(parents=True)
    (job_dir / "run.json").write_text(json.dumps({"metrics": {"eval_loss": objective}}))
    sweep.write_job_result(
        job_dir,
        job=num,
        overrides=overrides,
        status=status,
        objective=objective,
        objective_name="eval_loss",
        direction="minimize",
        error="ValueError: boom" if status == "failed" else None,
    )
    return job_dir


def test_summary_lists_every_job_with_varying_overrides_and_best(tmp_path):
    sweep_dir = tmp_path / "multirun-x"
    fake_job(sweep_dir, 10, ["+experiment=lora_qkv", "lora.r=8", "optim.lr=1e-4"], "ok", 1.5)
    fake_job(sweep_dir, 2, ["+experiment=lora_qkv", "lora.r=4", "optim.lr=3e-4"], "ok", 1.25)
    fake_job(sweep_dir, 3, ["+experiment=lora_qkv", "lora.r=4", "optim.lr=1e-4"], "failed", None)
    (sweep_dir / "4" / ".hydra").mkdir(parents=True)  # a job still running: no result yet
    (sweep_dir / "4" / "run.json").write_text("{}")
    csv_path, md_path, records = sweep.build_summary(sweep_dir)

    assert [r["job"] for r in records] == [2, 3, 10]  # numeric order, not text order
    rows = read_csv(csv_path)
    assert list(rows[0]) == [
        "job",
        "+experiment",
        "lora.r",
        "optim.lr",
        "eval_loss",
        "status",
        "error",
        "folder",
    ]
    assert [(r["job"], r["lora.r"], r["optim.lr"], r["status"]) for r in rows] == [
        ("2", "4", "3e-4", "ok"),
        ("3", "4", "1e-4", "failed"),
        ("10", "8", "1e-4", "ok"),
    ]
    assert float(rows[0]["eval_loss"]) == 1.25 and rows[1]["eval_loss"] == ""
    assert rows[1]["error"] == "ValueError: boom" and rows[2]["folder"] == "10"

    md = md_path.read_text()
    assert (
        "| job | lora.r | optim.lr | eval_loss | status | folder |" in md
    )  # common +experiment not a column
    assert "common overrides: `+experiment=lora_qkv`" in md
    assert "3 job(s): 2 ok, 1 failed" in md and "failed: ValueError: boom" in md
    assert "best: job 2 (lora.r=4 optim.lr=3e-4), eval_loss = 1.25" in md
    assert json.loads((sweep_dir / "2" / "result.json").read_text())["metrics"] == {"eval_loss": 1.25}


def test_best_follows_the_direction():
    records = [
        {"job": 0, "status": "ok", "objective": 0.2, "direction": "maximize"},
        {"job": 1, "status": "ok", "objective": 0.9, "direction": "maximize"},
        {"job": 2, "status": "failed", "objective": 5.0, "direction": "maximize"},
    ]
    assert sweep.best_result(records)["job"] == 1
    assert sweep.best_result([{"job": 0, "status": "ok", "objective": float("nan")}]) is None


def test_unknown_status_and_missing_folder_are_refused(tmp_path):
    with pytest.raises(ValueError, match="status='done' is not a job status; valid: ok, failed, interrupted"):
        sweep.write_job_result(
            tmp_path,
            job=0,
            overrides=[],
            status="done",
            objective=None,
            objective_name="x",
            direction="minimize",
        )
    with pytest.raises(FileNotFoundError, match="sweep folder .*nowhere does not exist"):
        sweep.build_summary(tmp_path / "nowhere")


def _record_in_other_process(sweep_dir: str, num: int) -> None:
    sweep.record_job(
        sweep_dir,
        Path(sweep_dir) / str(num),
        job=num,
        overrides=[f"seed={num}"],
        status="ok",
        objective=float(num),
        objective_name="eval_loss",
        direction="minimize",
    )


def test_jobs_finishing_together_leave_a_complete_table(tmp_path):
    # As SLURM or submitit-local jobs do: each job records itself and rebuilds the table in its own process.
    context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    procs = [context.Process(target=_record_in_other_process, args=(str(tmp_path), n)) for n in range(6)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(60)
        assert proc.exitcode == 0
    rows = read_csv(tmp_path / sweep.SUMMARY_CSV)
    assert [r["seed"] for r in rows] == [str(n) for n in range(6)]
    assert not list(tmp_path.glob(".*.tmp"))  # no leftover temp files of the atomic writes


def test_group_name_is_the_sweep_folder_name(tmp_path):
    assert (
        sweep.sweep_group_name(tmp_path / "lora_qkv" / "multirun-20250101-120000")
        == "multirun-20250101-120000"
    )


# ----- configs


def test_launcher_and_search_configs_compose():
    slurm = compose_config(
        ["hydra/launcher=slurm", "hydra.launcher.partition=gpu", "hydra.launcher.account=proj"],
        return_hydra_config=True,
    ).hydra.launcher
    assert slurm._target_.endswith("SlurmLauncher")
    assert (slurm.partition, slurm.account, slurm.gpus_per_node, slurm.timeout_min) == ("gpu", "proj", 1, 240)
    local = compose_config(["hydra/launcher=local"], return_hydra_config=True).hydra.launcher
    assert local._target_.endswith("LocalLauncher") and local.gpus_per_node == 0

    cfg = compose_config(["+hparams_search=optuna", "eval.direction=maximize"], return_hydra_config=True)
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and sweeper.direction == "maximize"
    assert set(sweeper.params) == {"lora.r", "optim.lr"} and sweeper.n_trials > 0
    assert cfg.hydra.mode.name == "MULTIRUN"


# ----- whole sweeps through the entry point


def test_grid_sweep_writes_one_folder_per_job_and_a_summary(tiny_twin, tmp_path):
    out = tmp_path / "outputs"
    done = run_entry(
        [
            "-m",
            "+experiment=lora_qkv",
            f"model.path={tiny_twin}",
            f"output_root={out}",
            *TINY,
            "lora.r=4,8",
            "optim.lr=1e-4,3e-4",
            "tracking=wandb",
            "tracking.group=null",
            "tracking.mode=disabled",
            "+hydra.callbacks.sweep_summary._target_=pipeline.sweep.SweepSummaryCallback",
        ],
        tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    sweep_dir = only_sweep_dir(out)
    assert sorted(p.name for p in sweep_dir.iterdir() if not p.name.startswith(".")) == [
        "0", "1", "2", "3", "multirun.yaml", "summary.csv", "summary.md"
    ]  # fmt: skip
    rows = read_csv(sweep_dir / "summary.csv")
    assert [(r["lora.r"], r["optim.lr"], r["status"]) for r in rows] == [
        ("4", "0.0001", "ok"), ("4", "0.0003", "ok"), ("8", "0.0001", "ok"), ("8", "0.0003", "ok")
    ]  # fmt: skip
    for row in rows:
        job_dir = sweep_dir / row["folder"]
        run_info = json.loads((job_dir / "run.json").read_text())
        assert run_info["status"] == "ok" and float(row["eval_loss"]) == pytest.approx(run_info["objective"])
        saved = yaml.safe_load((job_dir / "config.yaml").read_text())
        assert saved["lora"]["r"] == int(row["lora.r"])
        assert saved["tracking"]["group"] == sweep_dir.name  # every job in one W&B group
    assert "| job | lora.r | optim.lr | eval_loss | status | folder |" in done.stdout  # printed at the end
    assert f"sweep summary: {sweep_dir / 'summary.md'}" in done.stdout


def test_a_failing_job_is_in_the_summary_and_fails_the_sweep(tmp_path):
    out = tmp_path / "outputs"
    done = run_entry(["-m", "stages=[]", f"output_root={out}", "lora.r=4,0"], tmp_path)
    assert done.returncode == 1
    assert "lora.r=0 is out of range" in done.stderr
    rows = read_csv(only_sweep_dir(out) / "summary.csv")
    assert [(r["lora.r"], r["status"], r["eval_loss"]) for r in rows] == [
        ("4", "ok", ""),
        ("0", "failed", ""),
    ]
    assert "lora.r=0 is out of range; must be >= 1" in rows[1]["error"]


def test_optuna_search_runs_its_trials_and_summarises_them(tiny_twin, tmp_path):
    out = tmp_path / "outputs"
    done = run_entry(
        [
            "+hparams_search=optuna",
            "+experiment=lora_qkv",
            f"model.path={tiny_twin}",
            f"output_root={out}",
            *TINY,
            "hydra.sweeper.n_trials=3",
        ],
        tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    sweep_dir = only_sweep_dir(out)
    study = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    rows = read_csv(sweep_dir / "summary.csv")
    assert len(rows) == 3 and {r["status"] for r in rows} == {"ok"}
    assert {r["lora.r"] for r in rows} <= {"4", "8", "16"}
    assert all(1e-5 <= float(r["optim.lr"]) <= 1e-3 for r in rows)
    objectives = [float(r["eval_loss"]) for r in rows]
    assert study["best_value"] == pytest.approx(min(objectives))  # the study optimised eval's objective
    assert f"eval_loss = {min(objectives):.6g}" in (sweep_dir / "summary.md").read_text()
    # Optuna's log comes through the pipeline's: plain text, without alembic's import chatter
    output = done.stdout + done.stderr
    assert "A new study created in memory with name: lora_qkv" in output
    assert "\x1b[" not in output and "setup plugin" not in output


def test_submitit_local_launcher_runs_a_two_job_sweep(tiny_twin, tmp_path):
    out = tmp_path / "outputs"
    done = run_entry(
        [
            "-m",
            "hydra/launcher=local",
            "+experiment=lora_qkv",
            f"model.path={tiny_twin}",
            f"output_root={out}",
            *TINY,
            "stages=[sft]",
            "lora.r=4,8",
        ],
        tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    sweep_dir = only_sweep_dir(out)
    rows = read_csv(sweep_dir / "summary.csv")
    assert [(r["lora.r"], r["status"]) for r in rows] == [("4", "ok"), ("8", "ok")]
    for row in rows:
        assert (sweep_dir / row["folder"] / "sft" / "checkpoint-1" / "adapter_model.safetensors").is_file()
    assert list((sweep_dir / ".submitit").glob("*/*_log.out"))  # the jobs ran as submitit jobs
