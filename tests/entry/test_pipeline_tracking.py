"""One tracking run per pipeline: sft's training curve and eval's metrics land in the same W&B run."""

from __future__ import annotations

import os

from tests.helpers import run_entry, run_folders
from tests.utils.test_tracking import _history_rows, _read_wandb_records


def test_sft_and_eval_log_into_one_offline_wandb_run(tiny_twin, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    args = [
        f"model.path={tiny_twin}",
        "stages=[sft,eval]",
        "tracking=wandb",
        "trainer.max_steps=2",
        "trainer.logging_steps=1",
        "trainer.eval_steps=2",
        "trainer.save_steps=2",
        "eval.generate=false",
        "eval.max_samples=4",
        f"output_root={tmp_path / 'out'}",
    ]
    proc = run_entry(args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (run_dir,) = run_folders(tmp_path / "out")
    files = sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1, files  # one run for the whole pipeline, not one per stage
    rows = _history_rows(_read_wandb_records(files[0]))
    assert any("loss" in row for row in rows)
    assert any("eval/eval_loss" in row for row in rows)
    assert os.path.isfile(run_dir / "eval" / "metrics.json")
