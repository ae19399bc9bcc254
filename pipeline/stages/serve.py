"""serve: answer OpenAI-compatible chat requests over HTTP, with a web chat page, until stopped (Ctrl-C, SIGTERM).

    python -m pipeline stages=[serve] ckpt=outputs/<exp>/<time> serve.port=8000     # a run's sft/best
    python -m pipeline stages=[serve] ckpt=outputs/.../checkpoint-40-merged          # a merged folder
    PIPELINE_API_KEY=... python -m pipeline stages=[serve] ckpt=base serve.api_key_env=PIPELINE_API_KEY \
        serve.host=0.0.0.0

Which weights: this run's merged model, else this run's (or `ckpt`'s) checkpoint; ckpt=base serves model.path
as it is. Every family serves: MiniCPM-V-2 batches concurrent requests, the others answer one at a time.
Routes: POST /v1/chat/completions, GET /v1/models, GET /health, GET / (the page). Reads: model,
ckpt, serve, dataset.system (the system prompt of a request that sends none), seed, device. Writes
run_dir/serve/serve.log (the server's log). Returns {"serve": the URL it served on}.
"""

from __future__ import annotations

import logging
import socket
from pathlib import Path

from omegaconf import DictConfig

from pipeline.apps.generation import load_inference_bundle
from pipeline.config import ConfigError, resolve_device, serve_api_key
from pipeline.families import family_from_config
from pipeline.stages.state import RunState

log = logging.getLogger(__name__)

LOG_FILE = "serve.log"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
LOGGERS = (__name__, "pipeline.apps.serve", "uvicorn")  # what serve.log holds (uvicorn's children propagate)


def served_model_id(cfg: DictConfig, ckpt: Path | None) -> str:
    """Returns the name clients give as `model`: the checkpoint folder's name, or model.name for the base."""
    return ckpt.name if ckpt is not None else str(cfg.model.name)


def _log_to_file(path: Path) -> logging.Handler:
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    for name in LOGGERS:
        logging.getLogger(name).addHandler(handler)
    return handler


def check_port_free(host: str, port: int) -> None:
    """Returns None when host:port can be listened on; raises ConfigError (before the model loads) otherwise."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise ConfigError(
                f"serve.host={host} serve.port={port}: cannot listen there ({exc.strerror}); "
                "choose another serve.port, or stop what uses it"
            ) from None


def _key_note(cfg: DictConfig) -> str:
    """Returns what the log says of the key: whether one is required and where it came from, never the key."""
    if cfg.serve.api_key_env is not None:
        return f" (API key required: the value of ${cfg.serve.api_key_env})"
    return "" if cfg.serve.api_key is None else " (API key required: serve.api_key)"


def run(cfg: DictConfig, run_dir: Path, state: RunState) -> dict:
    """Serves until stopped and returns {"serve": the URL it served on}."""
    from pipeline.apps.serve.app import ServeOptions, create_app, run_server
    from pipeline.apps.serve.limits import ServeLimits

    family = family_from_config(cfg.model)
    api_key = serve_api_key(cfg.serve)  # from serve.api_key_env's variable when set; checked before loading
    check_port_free(str(cfg.serve.host), int(cfg.serve.port))
    serve_dir = Path(run_dir) / "serve"
    serve_dir.mkdir(parents=True, exist_ok=True)
    ckpt = state.weights_for("serve", cfg)
    capabilities = family.capabilities
    if not capabilities.batches_requests:
        how = "answers one request at a time (serve.max_batch_size is not used)"
    elif capabilities.continuous_batching:
        how = f"decodes up to {cfg.serve.max_batch_size} requests together; new ones join between steps"
    else:
        how = f"decodes up to {cfg.serve.max_batch_size} requests together, a batch at a time"
    log.info("%s (model.family=%s) %s", capabilities.display_name, family.name, how)
    bundle, family = load_inference_bundle(
        state.model_path,
        ckpt,
        family=family,
        device=resolve_device(cfg),
        dtype=str(cfg.model.dtype),
        allow_download=cfg.model.trust_hub,
        quantization=cfg.model.quantization,
    )
    options = ServeOptions(
        api_key=api_key,
        max_batch_size=cfg.serve.max_batch_size,
        max_new_tokens=cfg.serve.max_new_tokens,
        max_image_bytes=cfg.serve.max_image_bytes,
        max_video_bytes=cfg.serve.max_video_bytes,
        url_timeout=cfg.serve.url_timeout,
        allow_local_files=cfg.serve.allow_local_files,
        allowed_url_hosts=tuple(cfg.serve.allowed_url_hosts),
        allow_private_urls=cfg.serve.allow_private_urls,
        url_fetch_workers=cfg.serve.url_fetch_workers,
        system=cfg.dataset.system,
        seed=int(cfg.seed),
        limits=ServeLimits.from_config(cfg.serve),
    )
    model_id = served_model_id(cfg, ckpt)
    if api_key is None and str(cfg.serve.host) not in LOOPBACK_HOSTS:
        log.warning(
            "serve.host=%s without an API key: anyone who reaches this port can use the model; "
            "set serve.api_key_env=<variable> (README: serving safely)",
            cfg.serve.host,
        )
    app = create_app(bundle, options, model_id, family)
    url = f"http://{cfg.serve.host}:{cfg.serve.port}"
    handler = _log_to_file(serve_dir / LOG_FILE)
    try:
        log.info(
            "serving %s (%s) on %s: the chat page at %s/, the API at %s/v1%s",
            model_id,
            ckpt if ckpt is not None else f"the base model {bundle.base_path}",
            url,
            url,
            url,
            _key_note(cfg),
        )
        stopped_by = run_server(app, str(cfg.serve.host), int(cfg.serve.port))
        log.info("server stopped%s", f" by {stopped_by}" if stopped_by else "")
    finally:
        for name in LOGGERS:
            logging.getLogger(name).removeHandler(handler)
        handler.close()
    return {"serve": url}
