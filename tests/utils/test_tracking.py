"""Tests for pipeline.utils.tracking: the no-op, Weights & Biases (offline) and TensorBoard trackers."""

from __future__ import annotations

import json
import logging
import struct
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from pipeline.utils.tracking import (
    NoOpTracker,
    TensorBoardTracker,
    Tracker,
    WandbTracker,
    build_tracker,
    parse_tracking_settings,
    resolve_wandb_mode,
    sanitize_artifact_name,
    wandb_api_key_available,
)

RESOLVED_CONFIG = {"optim": {"lr": 0.0001}, "lora": {"r": 8}, "seed": 7}


def _wandb_cfg(**overrides) -> dict:
    cfg = {
        "backend": "wandb",
        "project": "minicpm-tests",
        "entity": "lab",
        "group": "sweep-1",
        "tags": ["lora", "smoke"],
        "name": "job-0",
        "mode": "offline",
        "log_model": False,
    }
    cfg.update(overrides)
    return cfg


@pytest.fixture
def offline_wandb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep wandb offline, quiet and away from the user's home folder and credentials."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    monkeypatch.setenv("WANDB_X_DISABLE_STATS", "true")
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    for var in ("CONFIG", "CACHE", "DATA", "ARTIFACT"):
        monkeypatch.setenv(f"WANDB_{var}_DIR", str(tmp_path / f"wandb-{var.lower()}"))
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    for var in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL", "WANDB_RUN_ID"):
        monkeypatch.delenv(var, raising=False)


def _read_wandb_records(run_file: Path) -> list:
    """Return the protobuf records of an offline ``.wandb`` file.

    The file is a 7-byte W&B header followed by a LevelDB-style log: 32 KiB blocks of chunks, each with a
    7-byte header (crc32c, little-endian length, type) where type 1 is a whole record and 2/3/4 are the
    first/middle/last pieces of a record spanning blocks. wandb ships no public reader for it offline.
    """
    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    assert data[:4] == b":W&B", f"{run_file} does not start with the W&B header"
    block_size, position, pending, payloads = 32768, 7, b"", []
    while position + 7 <= len(data):
        left_in_block = block_size - position % block_size
        if left_in_block < 7:  # block trailer padding
            position += left_in_block
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        if kind == 0 and length == 0:  # zero padding up to the block end
            position += left_in_block
            continue
        chunk = data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind == 1:
            payloads.append(chunk)
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            payloads.append(pending + chunk)
    records = []
    for payload in payloads:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        records.append(record)
    return records


def _settled_records(run_dir: Path, timeout: float = 15.0) -> list:
    """Return the run file's records once the exit record, the last that finish() writes, is on disk
    (wandb's writer may lag finish(), most of all on a loaded machine)."""
    deadline = time.monotonic() + timeout
    while True:
        records = _read_wandb_records(_only_run_file(run_dir))
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def _only_run_file(run_dir: Path) -> Path:
    files = sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1, f"expected one offline run under {run_dir / 'wandb'}, found {files}"
    return files[0]


def _history_rows(records: list) -> list[dict]:
    rows = []
    for record in records:
        if record.WhichOneof("record_type") == "history":
            rows.append(
                {
                    "/".join(item.nested_key) or item.key: json.loads(item.value_json)
                    for item in record.history.item
                }
            )
    return rows


def _final_summary(records: list) -> dict:
    summary: dict = {}
    for record in records:
        if record.WhichOneof("record_type") == "summary":
            for item in record.summary.update:
                summary["/".join(item.nested_key) or item.key] = json.loads(item.value_json)
    return summary


def test_none_backend_is_a_real_no_op_that_writes_nothing(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"

    tracker = build_tracker({"backend": "none"}, run_dir, RESOLVED_CONFIG)
    tracker.log({"loss": 1.0}, step=1)
    tracker.summary({"best": 0.5})
    tracker.log_artifact(tmp_path / "missing", name="adapter", type="model")
    tracker.finish()

    assert isinstance(tracker, NoOpTracker)
    assert isinstance(tracker, Tracker)
    assert not run_dir.exists()
    assert list(tmp_path.iterdir()) == []


def test_non_main_process_gets_the_no_op_tracker(tmp_path: Path) -> None:
    tracker = build_tracker(_wandb_cfg(), tmp_path / "run", RESOLVED_CONFIG, is_main_process=False)

    assert isinstance(tracker, NoOpTracker)
    assert not (tmp_path / "run").exists()


def test_settings_accept_dictconfig_and_reject_bad_keys_and_values() -> None:
    settings = parse_tracking_settings(OmegaConf.create({"backend": "tensorboard", "tags": None}))
    assert settings.backend == "tensorboard"
    assert settings.tags == ()
    assert parse_tracking_settings(None).backend == "none"

    with pytest.raises(ValueError, match=r"unknown key\(s\) \['projet'\]"):
        parse_tracking_settings({"backend": "wandb", "projet": "x"})
    with pytest.raises(ValueError, match=r"tracking.backend='mlflow'; expected one of \['none', 'wandb'"):
        parse_tracking_settings({"backend": "mlflow"})
    with pytest.raises(ValueError, match="tracking.mode='cloud'"):
        parse_tracking_settings({"backend": "wandb", "mode": "cloud"})
    with pytest.raises(ValueError, match="tracking.tags='a'"):
        parse_tracking_settings({"tags": "a"})


def test_auto_mode_follows_env_then_api_key_then_offline(tmp_path: Path) -> None:
    no_netrc = {"NETRC": str(tmp_path / "absent")}
    assert resolve_wandb_mode("auto", no_netrc) == ("offline", "no API key found")
    assert resolve_wandb_mode("auto", {**no_netrc, "WANDB_API_KEY": "k" * 40})[0] == "online"
    assert resolve_wandb_mode("auto", {**no_netrc, "WANDB_MODE": "dryrun"})[0] == "offline"
    assert resolve_wandb_mode("online", no_netrc)[0] == "online"

    netrc_file = tmp_path / "netrc"
    netrc_file.write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    assert wandb_api_key_available({"NETRC": str(netrc_file)})
    # A key stored for another W&B server does not count for the default host.
    assert not wandb_api_key_available({"NETRC": str(netrc_file), "WANDB_BASE_URL": "https://wandb.example"})


def test_sanitize_artifact_name_replaces_refused_characters() -> None:
    assert sanitize_artifact_name("lr=1e-4,r=8/adapter") == "lr-1e-4-r-8-adapter"
    with pytest.raises(ValueError, match="has no letters"):
        sanitize_artifact_name("///")


def test_wandb_offline_logs_metrics_summary_and_run_metadata(
    tmp_path: Path, offline_wandb: None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    run_dir = tmp_path / "run"
    # No WANDB_MODE and no key: `auto` itself must choose offline (and say so).
    monkeypatch.delenv("WANDB_MODE")

    with caplog.at_level(logging.INFO, logger="pipeline.utils.tracking"):
        tracker = build_tracker(_wandb_cfg(mode="auto"), run_dir, RESOLVED_CONFIG)
    try:
        assert isinstance(tracker, WandbTracker)
        for step, loss in enumerate([2.0, 1.5, 1.25], start=1):
            tracker.log({"train/loss": loss, "train/lr": 0.0001}, step=step)
        tracker.summary({"eval/best_cider": 0.75})
        tracker.log_artifact(tmp_path / "not-written", name="adapter", type="model")  # log_model is off
    finally:
        tracker.finish()
    tracker.finish()  # a second finish is harmless

    run_file = _only_run_file(run_dir)
    (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert warning.getMessage() == (
        f"W&B: no API key found, logging offline to {run_file.parent}; "
        f"sync later with `wandb sync {run_file.parent}`"
    )
    records = _settled_records(run_dir)

    rows = _history_rows(records)
    assert [(row["_step"], row["train/loss"]) for row in rows] == [(1, 2.0), (2, 1.5), (3, 1.25)]
    summary = _final_summary(records)
    assert summary["train/loss"] == 1.25
    assert summary["eval/best_cider"] == 0.75

    (run_record,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert (run_record.project, run_record.entity) == ("minicpm-tests", "lab")
    assert run_record.run_group == "sweep-1"
    assert list(run_record.tags) == ["lora", "smoke"]
    assert run_record.display_name == "job-0"
    config = {item.key: json.loads(item.value_json) for item in run_record.config.update}
    assert config["optim"] == {"lr": 0.0001}
    assert config["lora"] == {"r": 8}
    assert not any(r.WhichOneof("record_type") == "artifact" for r in records)


def test_wandb_sweep_jobs_get_separate_runs_in_one_group_and_artifacts_when_asked(
    tmp_path: Path, offline_wandb: None
) -> None:
    checkpoint = tmp_path / "adapter"
    checkpoint.mkdir()
    (checkpoint / "adapter_config.json").write_text('{"r": 8}')
    run_ids = []
    for job in range(2):
        run_dir = tmp_path / f"job{job}"
        tracker = build_tracker(
            _wandb_cfg(name=f"lr=1e-4,job={job}", log_model=True), run_dir, RESOLVED_CONFIG
        )
        tracker.log({"loss": float(job)}, step=0)
        tracker.log_artifact(checkpoint, name=f"lr=1e-4,job={job}", type="model")
        tracker.finish()

        records = _settled_records(run_dir)
        (run_record,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
        assert run_record.run_group == "sweep-1"
        run_ids.append(run_record.run_id)
        artifacts = [r.artifact for r in records if r.WhichOneof("record_type") == "artifact"]
        assert [(a.name, a.type) for a in artifacts] == [(f"lr-1e-4-job-{job}", "model")]

    assert run_ids[0] != run_ids[1]


def test_tensorboard_writes_scalars_that_tensorboard_reads_back(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard", reason="the tensorboard package is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    tracker = build_tracker({"backend": "tensorboard"}, run_dir, RESOLVED_CONFIG)
    assert isinstance(tracker, TensorBoardTracker)
    tracker.log({"train/loss": 2.0}, step=1)
    tracker.log({"train/loss": 1.5, "eval/bleu4": 0.25}, step=2)
    tracker.summary({"best_bleu4": 0.25, "best_checkpoint": "step-2"})
    tracker.log_artifact(tmp_path, name="adapter", type="model")  # no artifact store: nothing happens
    tracker.finish()

    assert tracker.log_dir == run_dir / "tensorboard"
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    scalars = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    assert scalars["train/loss"] == [(1, 2.0), (2, 1.5)]
    assert scalars["eval/bleu4"] == [(2, 0.25)]
    assert scalars["summary/best_bleu4"] == [(2, 0.25)]


def test_tensorboard_rejects_non_numeric_metrics_by_name(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard", reason="the tensorboard package is not installed")
    tracker = build_tracker({"backend": "tensorboard"}, tmp_path / "run", RESOLVED_CONFIG)
    try:
        with pytest.raises(TypeError, match="metric 'note' is 'hello'; expected a number"):
            tracker.log({"note": "hello"}, step=0)  # type: ignore[dict-item]
    finally:
        tracker.finish()
