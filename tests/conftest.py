"""Shared test setup: offline, quiet, one CPU thread (tiny models gain nothing from more, and lose much when cores are shared), and Hydra's compose API over the shipped conf/."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

# before anything imports wandb, transformers or tokenizers
os.environ["WANDB_MODE"] = "offline"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
# The pre-trained tiny twin comes from the checkout's cache (.cache/, or $PIPELINE_CACHE), as for `make run`:
# built once per checkout, under a lock, so concurrent test processes share it safely.

import pytest  # noqa: E402
import torch  # noqa: E402
from hydra import compose as hydra_compose  # noqa: E402
from hydra import initialize_config_dir  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from pipeline.config import register_configs  # noqa: E402

torch.set_num_threads(1)

REPO_ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = REPO_ROOT / "conf"


def compose_config(overrides: Sequence[str] = (), return_hydra_config: bool = False) -> DictConfig:
    """Return the config `python -m pipeline <overrides>` would run with (no run folder is made)."""
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="test"):
        return hydra_compose("config", overrides=list(overrides), return_hydra_config=return_hydra_config)


@pytest.fixture
def compose() -> Callable[..., DictConfig]:
    """Yield compose_config: compose(["lora=all", "lora.r=16"]) -> the composed DictConfig."""
    return compose_config


def workdir_config(workdir: Path, *overrides: str) -> DictConfig:
    """The composed config for a folder holding the tiny twin (`tiny/`) and custom-format `train.jsonl` and
    `val.jsonl`, on the CPU, with `overrides` after."""
    return compose_config(
        [
            f"model.path={workdir / 'tiny'}",
            "dataset=custom",
            f"dataset.path={workdir / 'train.jsonl'}",
            f"dataset.val_path={workdir / 'val.jsonl'}",
            "device=cpu",
            *overrides,
        ]
    )


def write_rows(path: Path, rows: list[dict]) -> Path:
    """Return `path` after writing `rows` to it as JSON lines (test data in the custom format)."""
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def run_python(command: Sequence[str], cwd: Path, timeout: int = 240) -> subprocess.CompletedProcess:
    """Run `command` (a fresh interpreter, torchrun, accelerate ...) with this checkout importable, one
    thread per process and Hydra's short error messages; return it finished, output captured."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run(list(command), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def build_varied_twin(family, folder: Path) -> Path:
    """Builds `family`'s tiny twin at `folder` with its matrices redrawn at std 0.2 (seeded), so that greedy
    answers differ from prompt to prompt and are long enough to stream."""
    family.build_tiny(folder)
    model, processor = family.load(folder)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 0.2, generator=generator)
    family.save(model, processor, folder)
    return folder


def free_port() -> int:
    """A TCP port nobody listens on now (for a launcher's rendezvous)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_state(cfg: DictConfig, **fields: Any):
    """Returns the run state the entry point resolves from `cfg`, then `fields` (ckpt, merged, ...) as earlier
    stages of the same run would have left them."""
    from pipeline.stages.state import RunState

    state = RunState.resolve(cfg)
    state.update(fields)
    return state


def run_stage(stage, cfg: DictConfig, run_dir: Path, **fields: Any) -> dict:
    """Runs a stage module's `run` as the entry point would, on run_state(cfg, **fields)."""
    return stage.run(cfg, run_dir, run_state(cfg, **fields))
