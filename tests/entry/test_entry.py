"""The entry point and run folders: what a run writes, how it fails, how stages hand artifacts on."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from pipeline.__main__ import run_pipeline
from pipeline.config import ConfigError
from pipeline.runinfo import (
    adopt_earlier_run,
    ended_attempt,
    find_run_dir,
    load_run_config,
    overridden_sections,
    resolve_ckpt,
    write_run_start,
)
from pipeline.stages import UnknownStageError, get_stage
from pipeline.utils.io import append_jsonl, atomic_dir, atomic_write_json, atomic_write_text
from tests.helpers import run_folders, run_python


def _run_entry(args: list[str], tmp_path: Path, prelude: str = "") -> subprocess.CompletedProcess:
    """Run the entry in a fresh interpreter (prelude: Python run first, e.g. to install fake stages)."""
    script = textwrap.dedent(prelude) + textwrap.dedent(
        f"""
        import sys
        sys.argv = ["pipeline", *{args!r}]
        from pipeline.__main__ import main
        sys.exit(main())
        """
    )
    return run_python([sys.executable, "-c", script], tmp_path, timeout=120)


def _fake_stage_prelude(name: str, body: str) -> str:
    return f"""
    import sys, types
    module = types.ModuleType("pipeline.stages.{name}")
    def run(cfg, run_dir, state):
        {body}
    module.run = run
    sys.modules["pipeline.stages.{name}"] = module
    """


def test_empty_stage_list_writes_config_and_run_json(tmp_path):
    out = tmp_path / "outputs"
    done = _run_entry(["stages=[]", f"output_root={out}", "experiment_name=smoke", "seed=7"], tmp_path)
    assert done.returncode == 0, done.stderr
    (run_dir,) = run_folders(out)
    assert run_dir.parent == out / "smoke"
    saved = OmegaConf.load(run_dir / "config.yaml")
    assert list(saved.stages) == [] and saved.seed == 7 and saved.model.name == "minicpm_v2_tiny"
    assert "${" not in (run_dir / "config.yaml").read_text(), "config.yaml must be resolved"
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "ok" and info["seed"] == 7 and info["device"] in ("cpu", "cuda")
    assert info["command"] == f"python -m pipeline 'stages=[]' output_root={out} experiment_name=smoke seed=7"
    assert set(info["packages"]) >= {"torch", "transformers", "peft", "accelerate", "timm", "hydra-core"}
    assert {"git_commit", "hostname", "start_time", "end_time", "argv"} <= set(info)
    assert (run_dir / "run.log").is_file()
    assert f"run folder: {run_dir}" in done.stdout


def test_invalid_override_exits_with_one_plain_line(tmp_path):
    out = tmp_path / "outputs"
    done = _run_entry(["lora.rank=4", f"output_root={out}"], tmp_path)
    assert done.returncode == 1
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines == [lines[0]] and lines[0].startswith("error: lora.rank is not a key of lora")
    assert "Traceback" not in done.stderr


def test_invalid_value_leaves_no_run_folder(tmp_path):
    out = tmp_path / "outputs"
    done = _run_entry(["stages=[sft,bogus]", f"output_root={out}"], tmp_path)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "error: stages: unknown stage 'bogus'; valid stages, in this order: sft, dpo, eval, merge, infer, serve"
    ]
    assert not any(p.is_dir() for p in out.glob("*/*")), "a rejected config must not leave a run folder"


def test_stage_failure_is_one_line_with_traceback_in_run_log(tmp_path):
    out = tmp_path / "outputs"
    prelude = _fake_stage_prelude("infer", 'raise RuntimeError("adapter is corrupt")')
    done = _run_entry(["stages=[infer]", "ckpt=base", f"output_root={out}"], tmp_path, prelude)
    assert done.returncode == 1
    (run_dir,) = run_folders(out)
    assert done.stderr.strip().splitlines() == [
        "error: RuntimeError: adapter is corrupt",
        f"full traceback in {run_dir / 'run.log'}",
    ]
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "failed" and "adapter is corrupt" in info["error"]
    assert "Traceback" in (run_dir / "run.log").read_text()


def test_keyboard_interrupt_exits_130_and_marks_the_run(tmp_path):
    out = tmp_path / "outputs"
    prelude = _fake_stage_prelude("eval", "raise KeyboardInterrupt")
    done = _run_entry(["stages=[eval]", "ckpt=base", f"output_root={out}"], tmp_path, prelude)
    assert done.returncode == 130
    (run_dir,) = run_folders(out)
    assert json.loads((run_dir / "run.json").read_text())["status"] == "interrupted"
    assert done.stderr.strip().startswith("interrupted")


def test_multirun_gives_each_job_its_folder(tmp_path):
    out = tmp_path / "outputs"
    done = _run_entry(["-m", "stages=[]", "seed=1,2", f"output_root={out}"], tmp_path)
    assert done.returncode == 0, done.stderr
    run_dirs = run_folders(out)
    assert [p.name for p in run_dirs] == ["0", "1"] and run_dirs[0].parent.name.startswith("multirun-")
    seeds = [json.loads((p / "run.json").read_text())["seed"] for p in run_dirs]
    assert seeds == [1, 2]


@pytest.fixture
def fake_stages(monkeypatch):
    """Install stand-in stage modules that record what they were given; yields the call log."""
    calls: list[tuple[str, dict]] = []

    def install(name, result):
        def run(cfg, run_dir, state):
            # what the stage was handed: the run state's fields, as they were then
            calls.append((name, {**vars(state), "metrics": dict(state.metrics)}))
            (run_dir / name).mkdir(parents=True, exist_ok=True)
            return result(run_dir) if callable(result) else result

        module = types.ModuleType(f"pipeline.stages.{name}")
        module.run = run
        monkeypatch.setitem(sys.modules, f"pipeline.stages.{name}", module)

    install("sft", lambda d: {"ckpt": d / "sft" / "checkpoint-4", "metrics": {"train_loss": 2.0}})
    install("eval", {"metrics": {"eval_loss": 1.25, "bleu4": 0.5}})
    install("merge", lambda d: {"merged": d / "merge"})
    install("infer", {"results": Path("infer/results.jsonl")})
    return calls


def test_stages_run_in_order_and_hand_on_state(compose, fake_stages, tmp_path, capsys):
    cfg = compose([f"output_root={tmp_path}"])
    objective = run_pipeline(cfg, tmp_path / "run")
    assert objective == 1.25
    assert [name for name, _ in fake_stages] == ["sft", "eval", "merge", "infer"]
    assert fake_stages[1][1]["ckpt"] == tmp_path / "run" / "sft" / "checkpoint-4"
    assert fake_stages[3][1]["merged"] == tmp_path / "run" / "merge"
    assert fake_stages[3][1]["metrics"] == {"train_loss": 2.0, "eval_loss": 1.25, "bleu4": 0.5}
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["status"] == "ok" and info["objective"] == 1.25
    assert info["stages_done"] == ["sft", "eval", "merge", "infer"]
    printed = capsys.readouterr().out
    assert f"sft    {tmp_path / 'run' / 'sft'}" in printed and "objective eval_loss = 1.25" in printed


def test_objective_follows_eval_objective_and_must_exist(compose, fake_stages, tmp_path):
    assert run_pipeline(compose(["eval.objective=bleu4"]), tmp_path / "a") == 0.5
    with pytest.raises(ValueError, match="eval.objective=cider is not among the metrics eval wrote: bleu4"):
        run_pipeline(compose(["eval.objective=cider"]), tmp_path / "b")
    assert json.loads((tmp_path / "b" / "run.json").read_text())["status"] == "failed"


def test_without_eval_the_objective_is_none(compose, fake_stages, tmp_path):
    assert run_pipeline(compose(["stages=[sft,merge]"]), tmp_path / "run") is None


def test_ckpt_base_hands_no_checkpoint_and_run_folder_resolves(compose, fake_stages, tmp_path):
    run_pipeline(compose(["stages=[eval]", "ckpt=base"]), tmp_path / "a")
    assert fake_stages[-1][1]["ckpt"] is None
    earlier = tmp_path / "earlier"
    (earlier / "sft" / "checkpoint-8").mkdir(parents=True)
    (earlier / "sft" / "best").symlink_to("checkpoint-8")
    run_pipeline(compose(["stages=[eval]", f"ckpt={earlier}"]), tmp_path / "b")
    assert fake_stages[-1][1]["ckpt"] == (earlier / "sft" / "checkpoint-8").resolve()


def test_get_stage_refuses_unknown_names_and_finds_run(monkeypatch):
    with pytest.raises(UnknownStageError, match="valid stages, in run order: sft, dpo, eval, merge, infer"):
        get_stage("train")
    module = types.ModuleType("pipeline.stages.infer")
    module.run = lambda cfg, run_dir, state: {"ok": True}
    monkeypatch.setitem(sys.modules, "pipeline.stages.infer", module)
    assert get_stage("infer") is module.run
    monkeypatch.setitem(sys.modules, "pipeline.stages.infer", types.ModuleType("pipeline.stages.infer"))
    with pytest.raises(TypeError, match="defines no function run"):
        get_stage("infer")


def _earlier_run(compose, tmp_path: Path) -> Path:
    run_dir = tmp_path / "outputs" / "exp" / "20250101-000000"
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"query": "q", "response": "a"}\n', encoding="utf-8")
    cfg = compose(
        ["dataset=custom", f"dataset.path={rows}", "dataset.max_length=512", "model.max_slice_nums=4"]
    )
    write_run_start(run_dir, cfg, {"status": "ok"})
    (run_dir / "sft" / "checkpoint-10").mkdir(parents=True)
    return run_dir


def test_load_run_config_walks_up_from_a_checkpoint(compose, tmp_path):
    run_dir = _earlier_run(compose, tmp_path)
    ckpt = run_dir / "sft" / "checkpoint-10"
    assert find_run_dir(ckpt) == run_dir.resolve()
    loaded = load_run_config(ckpt)
    assert loaded.dataset.path == str(tmp_path / "rows.jsonl") and loaded.dataset.max_length == 512
    assert load_run_config(tmp_path) is None


def test_earlier_run_supplies_dataset_and_model_unless_overridden(compose, tmp_path):
    run_dir = _earlier_run(compose, tmp_path)
    ckpt = run_dir / "sft" / "checkpoint-10"
    cfg = compose(["stages=[eval]", f"ckpt={ckpt}"])
    assert adopt_earlier_run(cfg, ckpt, ["stages=[eval]", f"ckpt={ckpt}"]) == run_dir.resolve()
    assert cfg.dataset.name == "custom" and cfg.dataset.path == str(tmp_path / "rows.jsonl")
    assert cfg.model.max_slice_nums == 4
    cfg = compose(["stages=[eval]", f"ckpt={ckpt}", "dataset.max_length=64"])
    adopt_earlier_run(cfg, ckpt, ["dataset.max_length=64"])
    assert cfg.dataset.name == "demo" and cfg.dataset.max_length == 64 and cfg.model.max_slice_nums == 4


def test_entry_records_the_reused_run(compose, fake_stages, tmp_path):
    run_dir = _earlier_run(compose, tmp_path)
    ckpt = run_dir / "sft" / "checkpoint-10"
    overrides = ["stages=[eval]", f"ckpt={ckpt}"]
    run_pipeline(compose(overrides), tmp_path / "new", overrides)
    info = json.loads((tmp_path / "new" / "run.json").read_text())
    assert info["reused_config_from"] == str(run_dir.resolve())
    assert OmegaConf.load(tmp_path / "new" / "config.yaml").dataset.path == str(tmp_path / "rows.jsonl")


def test_rerun_into_the_same_folder_keeps_earlier_attempts(compose, fake_stages, tmp_path):
    run_pipeline(compose(["stages=[sft]"]), tmp_path / "run")
    run_pipeline(compose(["stages=[sft]"]), tmp_path / "run")
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["status"] == "ok" and [a["status"] for a in info["previous_attempts"]] == ["ok"]


def test_an_attempt_killed_outright_is_recorded_as_killed(tmp_path):
    run_dir = tmp_path / "run"
    args = [f"hydra.run.dir={run_dir}", f"output_root={tmp_path}"]
    prelude = _fake_stage_prelude("infer", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)")
    killed = _run_entry(["stages=[infer]", "ckpt=base", *args], tmp_path, prelude)
    assert killed.returncode == -9
    assert json.loads((run_dir / "run.json").read_text())["status"] == "running"  # it could not say more
    done = _run_entry(["stages=[]", *args], tmp_path)
    assert done.returncode == 0, done.stderr
    info = json.loads((run_dir / "run.json").read_text())
    (earlier,) = info["previous_attempts"]
    assert info["status"] == "ok" and earlier["status"] == "killed" and earlier["killed_noticed"]


def test_only_attempts_whose_process_is_gone_become_killed():
    host = socket.gethostname()
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert ended_attempt({"status": "running", "pid": alive.pid, "hostname": host})["status"] == "running"
        assert (
            ended_attempt({"status": "running", "pid": finished.pid, "hostname": host})["status"] == "killed"
        )
        # on another host the pid says nothing; the run folder's lock, held by the new attempt, does
        assert (
            ended_attempt({"status": "running", "pid": alive.pid, "hostname": "other"})["status"] == "killed"
        )
        assert (
            ended_attempt({"status": "failed", "pid": finished.pid, "hostname": host})["status"] == "failed"
        )
    finally:
        alive.kill()
        alive.wait()


def test_overridden_sections():
    assert overridden_sections(["dataset=custom", "+dataset.x=1", "~model.path", "seed=1"]) == {
        "dataset",
        "model",
        "seed",
    }


def test_resolve_ckpt_pointer_forms(tmp_path):
    run = tmp_path / "run"
    (run / "sft" / "checkpoint-3").mkdir(parents=True)
    (run / "sft" / "last").write_text("checkpoint-3\n")
    assert resolve_ckpt(run) == (run / "sft" / "checkpoint-3").resolve()
    assert resolve_ckpt(run / "sft" / "checkpoint-3") == (run / "sft" / "checkpoint-3").resolve()
    (run / "sft" / "last").unlink()
    with pytest.raises(FileNotFoundError, match="no sft/best or sft/last"):
        resolve_ckpt(run)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_ckpt(tmp_path / "missing")


def test_atomic_writes_leave_no_temp_files(tmp_path):
    atomic_write_text(tmp_path / "a" / "x.txt", "hello")
    atomic_write_json(tmp_path / "a" / "x.json", {"path": tmp_path, "n": 1})
    append_jsonl(tmp_path / "a" / "log.jsonl", {"step": 1})
    append_jsonl(tmp_path / "a" / "log.jsonl", {"step": 2})
    assert (tmp_path / "a" / "x.txt").read_text() == "hello"
    assert json.loads((tmp_path / "a" / "x.json").read_text()) == {"path": str(tmp_path), "n": 1}
    lines = (tmp_path / "a" / "log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2]
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["log.jsonl", "x.json", "x.txt"]


def test_atomic_dir_appears_whole_or_not_at_all(tmp_path):
    final = tmp_path / "ckpt"
    with pytest.raises(RuntimeError), atomic_dir(final) as tmp:
        (tmp / "weights.bin").write_bytes(b"half")
        assert not final.exists()
        raise RuntimeError("crash while writing")
    assert not final.exists() and list(tmp_path.iterdir()) == []
    with atomic_dir(final) as tmp:
        (tmp / "weights.bin").write_bytes(b"v1")
    assert (final / "weights.bin").read_bytes() == b"v1"
    with pytest.raises(FileExistsError, match="overwrite=True"), atomic_dir(final):
        pass
    with atomic_dir(final, overwrite=True) as tmp:
        (tmp / "weights.bin").write_bytes(b"v2")
    assert (final / "weights.bin").read_bytes() == b"v2" and sorted(os.listdir(tmp_path)) == ["ckpt"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["stages=[sft,eval]", "eval.objective=bleu4", "eval.generate=false"],
            r"eval.objective=bleu4 is not a metric eval writes \(generation metrics need eval.generate=true\)",
        ),
        (["dataset=custom", "dataset.path=/nowhere/rows.jsonl"], r"/nowhere/rows.jsonl: data file not found"),
        (
            ["dataset.sources=[{name: demo, ratoi: 0.5}]"],
            r"sources\[0\] \(demo\): unknown key\(s\) ratoi; accepted: .*ratio",
        ),
        (["dataset=coco_en_2_mini"], r"coco_en_2_mini: 'path' is not set"),
        (
            ["stages=[infer]", "ckpt=base", "infer.input=/nowhere/q.jsonl"],
            r"infer.input=/nowhere/q.jsonl: file not found",
        ),
    ],
)
def test_checks_that_need_no_model_fail_before_any_stage_runs(
    compose, fake_stages, tmp_path, overrides, message
):
    with pytest.raises(ConfigError, match=message):
        run_pipeline(compose(overrides), tmp_path / "run")
    assert fake_stages == [] and not (tmp_path / "run" / "run.json").exists()
