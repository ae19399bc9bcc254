"""What the entry does around a run: one writer per run folder, exit codes by signal, error lines that
stand alone after a progress bar."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
from tqdm.auto import tqdm

import pipeline.__main__ as entry
from pipeline.__main__ import describe_error, run_pipeline
from pipeline.training.loop import SignalGuard, StopRequested
from pipeline.utils.lock import FolderBusy, folder_lock
from tests.helpers import REPO_ROOT


def test_a_second_process_on_a_run_folder_is_refused_naming_the_holder(tmp_path, compose):
    run_dir = tmp_path / "run"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys\nfrom pipeline.utils.lock import folder_lock\n"
            f"with folder_lock({str(run_dir)!r}):\n    print('locked', flush=True)\n    sys.stdin.read()\n",
        ],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    cfg = compose(["stages=[]"])
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(FolderBusy) as caught:
            run_pipeline(cfg, run_dir)
        assert str(caught.value).startswith(
            f"run folder {run_dir} is in use by another process (pid {holder.pid} on "
        )
        assert str(caught.value).endswith(
            "wait for it to finish, or write into another folder (hydra.run.dir=...)"
        )
        assert describe_error(caught.value) == str(caught.value)
        assert not (run_dir / "run.json").exists(), "the refused process must not write the folder"
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    run_pipeline(cfg, run_dir)  # the holder has exited: the folder is free again
    assert json.loads((run_dir / "run.json").read_text())["status"] == "ok"
    run_pipeline(cfg, run_dir)  # and a finished run released it too


def test_the_lock_is_per_folder_and_released_after_the_block(tmp_path):
    with folder_lock(tmp_path / "a", what="run folder"):
        with pytest.raises(FolderBusy, match=rf"run folder {tmp_path / 'a'} is in use .*pid {os.getpid()} "):
            with folder_lock(tmp_path / "a", what="run folder"):
                pass
        with folder_lock(tmp_path / "b"):
            pass
    with folder_lock(tmp_path / "a"):
        pass


@pytest.mark.parametrize(("signal_name", "code"), [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_stop_by_signal_exits_128_plus_the_signal(monkeypatch, capsys, signal_name, code):
    def stopped_by_signal():
        with SignalGuard() as guard:
            os.kill(os.getpid(), getattr(signal, signal_name))
            raise StopRequested(f"stopped by {guard.requested}", guard.requested)

    monkeypatch.setattr(entry, "hydra_main", stopped_by_signal)
    assert entry.main() == code
    assert capsys.readouterr().err.startswith(f"interrupted ({signal_name})")


def test_an_error_after_a_progress_bar_stands_on_its_own_line(monkeypatch, capsys):
    kept = []

    def fails_with_a_bar_open():
        kept.append(tqdm(total=10, desc="sft"))  # left open, as a failing loop leaves its bar
        kept[0].update(3)
        raise RuntimeError("the batch could not be built")

    monkeypatch.setattr(entry, "hydra_main", fails_with_a_bar_open)
    assert entry.main() == 1
    err = capsys.readouterr().err
    before, line, after = err.partition("error: RuntimeError: the batch could not be built\n")
    assert line and "sft:" in before and before.endswith("\n")
    del kept[:]  # collecting the bar must draw nothing more
    assert after == "" and capsys.readouterr().err == ""


@pytest.mark.slow  # two interpreters importing DeepSpeed
def test_deepspeed_does_not_announce_the_cpu_on_a_run_without_it(tmp_path):
    pytest.importorskip("deepspeed")
    script = (
        "import os\nos.environ.pop('DS_ACCELERATOR', None)\n"
        "from pipeline.stages.engine import name_deepspeed_accelerator\n"
        "name_deepspeed_accelerator({named})\n"
        "from accelerate.utils.other import extract_model_from_parallel\nimport torch\n"
        "extract_model_from_parallel(torch.nn.Linear(1, 1))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "CUDA_VISIBLE_DEVICES": ""}
    for uses_deepspeed in (False, True):
        done = subprocess.run(
            [sys.executable, "-c", script.format(named=uses_deepspeed)],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        warned = "Setting accelerator to CPU" in done.stdout + done.stderr
        assert warned == uses_deepspeed  # with DeepSpeed in use its own detection is left alone


def test_the_entry_loads_no_model_code_before_a_run_reaches_its_stages(tmp_path):
    # a mistyped override is answered by Hydra before any job: it must not wait on torch and the model's code
    probe = (
        "import sys\nimport pipeline.__main__\n"
        "print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))"
    )
    loaded = subprocess.run([sys.executable, "-c", probe], cwd=REPO_ROOT, capture_output=True, text=True)
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.strip() == "[]"


def test_the_run_state_resolves_the_base_model_folder_when_a_stage_first_reads_it(compose, tmp_path):
    from pipeline.stages.state import RunState

    cfg = compose(["stages=[infer]", "ckpt=base", f"model.path={tmp_path / 'model'}"])
    state = RunState.resolve(cfg)
    assert state._model_path is None and state.ckpt_set and state.ckpt is None
    assert state.model_path == str(tmp_path / "model")  # not the twin's cache place: returned as given
