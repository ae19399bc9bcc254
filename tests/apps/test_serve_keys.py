"""The server's API key: an empty key refused by the config, empty or absent credentials refused by the
server, the key read from the environment (serve.api_key_env), and no copy of the key in the run folder."""

from __future__ import annotations

import base64
import http.client
import json
import logging
from pathlib import Path

import httpx
import pytest

from pipeline.apps.generation import load_inference_bundle
from pipeline.apps.serve.app import ServerThread, create_app
from pipeline.config import ConfigError, serve_api_key, validate
from pipeline.stages import serve
from pipeline.utils.secrets import REDACTED, redact_overrides
from tests.apps.test_serve import MODEL, options, user
from tests.helpers import compose_config, free_port, run_entry, run_folders, run_stage, twin_config

KEY = "s3cret-k3y"
ENV = "PIPELINE_TEST_API_KEY"


def basic(user_name: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user_name}:{password}".encode()).decode()


def status(server: ServerThread, method: str, path: str, headers: dict[str, str]) -> int:
    """The status of a request sent with its headers byte for byte (httpx refuses `Bearer ` with its trailing
    space, which curl sends)."""
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        body = json.dumps(user("hi")) if method == "POST" else None
        connection.request(method, path, body=body, headers={"Content-Type": "application/json", **headers})
        return connection.getresponse().status
    finally:
        connection.close()


@pytest.fixture(scope="module")
def loaded(tiny_twin):
    return load_inference_bundle(str(tiny_twin), device="cpu")


def serving(loaded, key: str | None) -> ServerThread:
    bundle, family = loaded
    return ServerThread(create_app(bundle, options(api_key=key), MODEL, family), "127.0.0.1", free_port())


# ----- the config
@pytest.mark.parametrize("value", ["''", "' '"])
def test_an_empty_key_is_a_config_error_naming_the_key(value):
    with pytest.raises(ConfigError, match=r"serve.api_key is empty \(an unset shell variable"):
        validate(compose_config([f"serve.api_key={value}"]))


def test_the_redaction_placeholder_and_two_key_sources_are_refused():
    with pytest.raises(ConfigError, match="placeholder run folders record"):
        validate(compose_config([f"serve.api_key={REDACTED}"]))
    with pytest.raises(ConfigError, match="serve.api_key and serve.api_key_env are both set"):
        validate(compose_config([f"serve.api_key={KEY}", f"serve.api_key_env={ENV}"]))
    with pytest.raises(ConfigError, match="serve.api_key_env=no-such is not an environment variable name"):
        validate(compose_config(["serve.api_key_env=no-such"]))


def test_the_key_variable_unset_or_empty_is_a_clear_error_when_serving(monkeypatch):
    overrides = ["stages=[serve]", "ckpt=base", f"serve.api_key_env={ENV}"]
    monkeypatch.delenv(ENV, raising=False)
    with pytest.raises(ConfigError, match=rf"serve.api_key_env={ENV} but \${ENV} is not set; export {ENV}="):
        validate(compose_config(overrides))
    validate(compose_config(["stages=[]", f"serve.api_key_env={ENV}"]))  # read only when a run serves
    monkeypatch.setenv(ENV, "")
    with pytest.raises(ConfigError, match=rf"\${ENV} is empty"):
        validate(compose_config(overrides))
    monkeypatch.setenv(ENV, KEY)
    cfg = compose_config(overrides)
    validate(cfg)
    assert serve_api_key(cfg.serve) == KEY and cfg.serve.api_key is None


# ----- the server
def test_empty_or_absent_credentials_get_401(loaded):
    running = serving(loaded, KEY)
    try:
        refused = [
            {},
            {"Authorization": ""},
            {"Authorization": "Bearer "},
            {"Authorization": "Bearer"},
            {"Authorization": basic("x", "")},
            {"Authorization": basic("", "")},
            {"Authorization": "Basic "},
            {"Authorization": f"Token {KEY}"},
            {"Authorization": f"Bearer {KEY}x"},
        ]
        for headers in refused:
            for method, path in (("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("GET", "/")):
                assert status(running, method, path, headers) == 401, (headers, path)
        for headers in ({"Authorization": f"Bearer {KEY}"}, {"Authorization": basic("anyone", KEY)}):
            assert status(running, "GET", "/v1/models", headers) == 200
    finally:
        running.stop()


def test_a_server_given_an_empty_key_lets_nobody_in(loaded):
    running = serving(loaded, "")
    try:
        for headers in ({}, {"Authorization": "Bearer "}, {"Authorization": basic("x", "")}):
            assert status(running, "GET", "/v1/models", headers) == 401, headers
    finally:
        running.stop()


def test_the_serve_stage_takes_the_key_from_the_environment_and_never_logs_it(
    tiny_twin, tmp_path, monkeypatch, caplog
):
    caplog.set_level(logging.INFO)
    monkeypatch.setenv(ENV, KEY)
    port = free_port()
    overrides = [
        "stages=[serve]",
        "ckpt=base",
        "device=cpu",
        f"serve.port={port}",
        f"serve.api_key_env={ENV}",
    ]
    cfg = twin_config(tiny_twin, *overrides)
    validate(cfg)
    codes = {}

    def serve_once(app, host, port):  # a few requests instead of serving until Ctrl-C
        running = ServerThread(app, host, port)
        try:
            for name, headers in (("none", {}), ("key", {"Authorization": f"Bearer {KEY}"})):
                codes[name] = httpx.get(f"{running.url}/v1/models", headers=headers).status_code
        finally:
            running.stop()

    monkeypatch.setattr("pipeline.apps.serve.app.run_server", serve_once)
    run_stage(serve, cfg, tmp_path / "run", ckpt=None)
    assert codes == {"none": 401, "key": 200}
    assert f"API key required: the value of ${ENV}" in caplog.text
    log_text = (tmp_path / "run" / "serve" / "serve.log").read_text()
    assert "API key required" in log_text and KEY not in log_text and KEY not in caplog.text

    monkeypatch.delenv(ENV)
    with pytest.raises(ConfigError, match=rf"\${ENV} is not set"):
        run_stage(serve, cfg, tmp_path / "run2", ckpt=None)


# ----- the run folder
def test_overrides_setting_a_secret_are_redacted():
    argv = ["-m", f"serve.api_key={KEY}", f"+serve.api_key={KEY}", "~serve.api_key", "serve.port=9", "x.py"]
    assert redact_overrides(argv) == [
        "-m",
        f"serve.api_key={REDACTED}",
        f"+serve.api_key={REDACTED}",
        "~serve.api_key",
        "serve.port=9",
        "x.py",
    ]


def _files_holding(root: Path, text: str) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and text.encode() in p.read_bytes()]


def test_no_file_of_a_run_or_a_sweep_holds_the_key(tiny_twin, tmp_path):
    out = tmp_path / "outputs"
    args = [f"model.path={tiny_twin}", "device=cpu", f"serve.api_key={KEY}", f"output_root={out}"]
    done = run_entry(
        [*args, "stages=[infer]", "ckpt=base", "infer.max_samples=1", "infer.max_new_tokens=2"], tmp_path
    )
    assert done.returncode == 0, done.stderr
    swept = run_entry(["-m", *args, "stages=[]", "experiment_name=sweep", "seed=1,2"], tmp_path)
    assert swept.returncode == 0, swept.stderr
    runs = run_folders(out)
    assert len(runs) == 3 and (runs[0] / ".hydra" / "hydra.yaml").is_file()
    assert (runs[-1].parent / "multirun.yaml").is_file() and (runs[-1].parent / "summary.csv").is_file()
    assert _files_holding(out, KEY) == []
    for run_dir in runs:  # what was redacted still says a key was set
        assert f"serve.api_key={REDACTED}" in (run_dir / ".hydra" / "overrides.yaml").read_text()
        assert f"api_key: {REDACTED}" in (run_dir / "config.yaml").read_text()
