"""The serve stage: its config, which weights it serves, and `python -m pipeline stages=[serve]` end to end."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from pipeline.apps.serve.app import ServerThread
from pipeline.config import ConfigError, validate
from pipeline.families.minicpm_v2.checkpoint import load_model
from pipeline.families.minicpm_v2.lora import apply_lora, build_lora_config
from pipeline.stages import STAGES, serve
from tests.helpers import REPO_ROOT, compose_config, copy_twin, free_port, run_stage, run_state


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_twin) -> Path:
    root = tmp_path_factory.mktemp("serve-stage")
    copy_twin(tiny_twin, root / "tiny")
    model = load_model(root / "tiny")
    apply_lora(model, build_lora_config(model, "qkv", r=4, alpha=8, dropout=0.0)).save_pretrained(
        root / "checkpoint-7"
    )
    return root


def config(workdir: Path, *overrides: str):
    return compose_config([f"model.path={workdir / 'tiny'}", "device=cpu", "stages=[serve]", *overrides])


def test_serve_config_is_typed_and_checked(workdir: Path):
    cfg = config(workdir, "ckpt=base")
    validate(cfg)
    assert cfg.serve.host == "127.0.0.1" and cfg.serve.api_key is None and not cfg.serve.allow_local_files
    # it runs until stopped: only when asked for
    assert "serve" in STAGES and "serve" not in compose_config().stages
    with pytest.raises(ConfigError, match="ckpt is required when stages=\\[serve\\]"):
        validate(config(workdir))
    bad = (
        "serve.port=70000",
        "serve.max_batch_size=0",
        "serve.max_new_tokens=0",
        "serve.url_timeout=0",
        "serve.url_fetch_workers=0",
        "serve.allowed_url_hosts=[images.example.org,'http://cdn.example.org/',10.0.0.5:8080]",
    )
    with pytest.raises(ConfigError) as raised:
        validate(config(workdir, "ckpt=base", *bad))
    for value in (
        "serve.port=70000",
        "serve.max_batch_size=0",
        "serve.max_new_tokens=0",
        "serve.url_timeout=0.0",
        "serve.url_fetch_workers=0",
    ):
        assert f"{value} is out of range" in str(raised.value)
    assert (
        "serve.allowed_url_hosts: 'http://cdn.example.org/', '10.0.0.5:8080' is not a host name or IP address"
        in str(raised.value)
    )
    assert cfg.serve.allowed_url_hosts == [] and cfg.serve.allow_private_urls is False
    with pytest.raises(Exception, match="serve.allow_private_urls"):
        config(workdir, "ckpt=base", "serve.allow_private_urls=sometimes")
    with pytest.raises(ConfigError, match="serve.bogus is not a known key; valid keys of serve: host, port"):
        validate(config(workdir, "ckpt=base", "+serve.bogus=1"))
    with pytest.raises(Exception, match="serve.port"):
        config(workdir, "ckpt=base", "serve.port=eighty")


def test_serve_reads_this_runs_merge_then_its_checkpoint_then_ckpt(workdir: Path, tmp_path: Path):
    merged, ckpt = tmp_path / "merged", tmp_path / "ckpt"

    def pick(cfg, state):
        return run_state(cfg, **state).weights_for("serve", cfg)

    cfg = config(workdir, "stages=[serve]", f"ckpt={workdir / 'checkpoint-7'}")
    assert pick(cfg, {"merged": merged, "ckpt": ckpt}) == merged
    assert pick(cfg, {"ckpt": None}) is None  # ckpt=base, as the entry resolves it
    assert pick(cfg, {}) == (workdir / "checkpoint-7").resolve()
    assert pick(config(workdir, "stages=[serve]", "ckpt=base"), {}) is None
    assert serve.served_model_id(cfg, workdir / "checkpoint-7") == "checkpoint-7"
    assert serve.served_model_id(cfg, None) == cfg.model.name


def test_a_port_in_use_fails_before_the_model_loads(workdir: Path, tmp_path: Path, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(serve, "load_inference_bundle", no_loading)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        with pytest.raises(ConfigError, match=f"serve.port={port}: cannot listen there"):
            run_stage(serve, config(workdir, "ckpt=base", f"serve.port={port}"), tmp_path)


@pytest.mark.parametrize("which", ["merged", "base"])
def test_the_stage_serves_a_merged_folder_and_the_base_model(
    workdir: Path, tmp_path: Path, monkeypatch, caplog, which
):
    caplog.set_level(logging.INFO)  # as the entry's logging is
    if which == "merged":  # a folder in the official layout, as merge writes it
        shutil.copytree(workdir / "tiny", tmp_path / "checkpoint-7-merged")
        state, expected = {"merged": tmp_path / "checkpoint-7-merged"}, "checkpoint-7-merged"
    else:
        state, expected = {"ckpt": None}, "minicpm_v2_tiny"
    seen = {}

    def serve_once(app, host, port):  # instead of serving until Ctrl-C: one request, then stop
        running = ServerThread(app, host, port)
        try:
            client = openai.OpenAI(base_url=f"{running.url}/v1", api_key="x", max_retries=0)
            seen["models"] = [m.id for m in client.models.list()]
            seen["answer"] = client.chat.completions.create(
                model=expected, messages=[{"role": "user", "content": "Hi"}], max_tokens=3
            )
        finally:
            running.stop()

    monkeypatch.setattr("pipeline.apps.serve.app.run_server", serve_once)
    port = free_port()
    cfg = config(workdir, "ckpt=base", f"serve.port={port}", "model.name=minicpm_v2_tiny")
    assert run_stage(serve, cfg, tmp_path / "run", **state) == {"serve": f"http://127.0.0.1:{port}"}
    assert seen["models"] == [expected] and seen["answer"].usage.completion_tokens >= 1
    assert "serving " + expected in (tmp_path / "run" / "serve" / "serve.log").read_text()


def test_the_entry_serves_a_lora_checkpoint_until_interrupted(workdir: Path, tmp_path: Path):
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "pipeline",
        "stages=[serve]",
        f"ckpt={workdir / 'checkpoint-7'}",
        f"model.path={workdir / 'tiny'}",
        "device=cpu",
        f"serve.port={port}",
        "serve.max_new_tokens=4",
        f"output_root={tmp_path / 'outputs'}",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, process.stdout.read().decode()
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.2)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        assert [m.id for m in client.models.list()] == ["checkpoint-7"]
        answer = client.chat.completions.create(
            model="checkpoint-7", messages=[{"role": "user", "content": "Hello?"}], max_tokens=4
        )
        assert 1 <= answer.usage.completion_tokens <= 4
    finally:
        process.send_signal(signal.SIGINT)
        output = process.communicate(timeout=60)[0].decode()
    assert process.returncode == 0, output
    (run_json,) = (tmp_path / "outputs").rglob("run.json")
    info = json.loads(run_json.read_text())
    assert info["status"] == "ok" and info["stages_done"] == ["serve"]
    log = (run_json.parent / "serve" / "serve.log").read_text()
    assert "serving checkpoint-7" in log and "POST /v1/chat/completions" in log
