"""Run folders: what a run records about itself, and how a later run finds an earlier one from a checkpoint.

A run folder holds `config.yaml` (the resolved config), `run.json` (command, versions, commit, status) and
`run.log`, next to one sub-folder per stage. Everything needed to rerun it is in there.
"""

from __future__ import annotations

import json
import os
import platform
import random
import shlex
import socket
import subprocess
import sys
from collections.abc import Iterable, Sequence
from datetime import datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from pipeline.utils.io import atomic_write_json, atomic_write_text
from pipeline.utils.secrets import redact_config, redact_overrides

CONFIG_FILE = "config.yaml"
RUN_FILE = "run.json"
LOG_FILE = "run.log"
TRACKED_PACKAGES = ("torch", "transformers", "peft", "accelerate", "timm", "hydra-core", "omegaconf")
REUSED_SECTIONS = ("model", "dataset")  # taken from the earlier run unless overridden on the command line
REPO_ROOT = Path(__file__).resolve().parent.parent


def now_iso() -> str:
    """Return the local time with its UTC offset, to the second."""
    return datetime.now().astimezone().isoformat(timespec="seconds")


def package_versions(names: Iterable[str] = TRACKED_PACKAGES) -> dict[str, str | None]:
    """Return the installed version of each distribution (None when absent), without importing it."""
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_commit(repo: Path = REPO_ROOT) -> dict[str, Any] | None:
    """Return {"commit", "dirty"} for the checkout holding the code; None outside git or before a commit."""

    def git(*args: str) -> str:
        command = ["git", "-C", str(repo), *args]
        done = subprocess.run(command, capture_output=True, text=True, timeout=10, check=False)
        if done.returncode != 0:
            raise RuntimeError(done.stderr)
        return done.stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, RuntimeError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": dirty}


def command_line(overrides: Sequence[str]) -> str:
    """Return the shell line that reruns this job alone (`python -m pipeline <its overrides>`)."""
    return shlex.join(["python", "-m", "pipeline", *overrides])


def collect_run_info(
    cfg: DictConfig, argv: Sequence[str], device: str, overrides: Sequence[str] = ()
) -> dict:
    """Return the facts `run.json` records at the start of a run; status starts as "running". Secrets on the
    command line (utils/secrets.py) are recorded redacted."""
    git = git_commit()
    overrides = redact_overrides(overrides)
    return {
        "status": "running",
        "command": command_line(overrides),  # this job's own overrides, also for one job of a sweep
        "argv": redact_overrides(argv),
        "overrides": list(overrides),
        "python": sys.executable,
        "python_version": platform.python_version(),
        "packages": package_versions(),
        "git_commit": git["commit"] if git else None,
        "git_dirty": git["dirty"] if git else None,
        "seed": int(cfg.seed),
        "device": device,
        "hostname": socket.gethostname(),
        "pid": os.getpid(),
        "cwd": os.getcwd(),
        "start_time": now_iso(),
        "end_time": None,
    }


def write_run_start(run_dir: Path, cfg: DictConfig, info: dict) -> None:
    """Write the resolved `config.yaml` (its secrets redacted) and the initial `run.json` into `run_dir` (both
    atomically).

    Rerunning into an existing run folder (to resume it) keeps the earlier attempts' records in
    run.json's `previous_attempts`; one still "running" died without saying so and is recorded "killed"
    (see ended_attempt).
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    existing = run_dir / RUN_FILE
    if existing.is_file():
        try:
            old = json.loads(existing.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            old = {}
        if old:
            earlier = old.pop("previous_attempts", [])
            info = {**info, "previous_attempts": [ended_attempt(a) for a in [*earlier, old]]}
    atomic_write_text(run_dir / CONFIG_FILE, OmegaConf.to_yaml(redact_config(cfg), resolve=True))
    atomic_write_json(existing, info)


def _process_exists(pid: int) -> bool:
    """Returns True when a process with this id runs on this machine (signal 0 checks without sending)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    except (OSError, ValueError, OverflowError):
        return False
    return True


def ended_attempt(record: dict) -> dict:
    """Returns an earlier attempt's run.json record as that attempt ended.

    An attempt stops at "running" when its process is killed outright (SIGKILL, out of memory, a lost
    machine): nothing in it can record the end. It is marked "killed" when its process is gone from this
    host, or when it ran on another host (the new attempt holds the run folder's lock, which a living
    attempt would hold); the time its death was noticed goes to `killed_noticed`. Other records are kept.
    """
    if not isinstance(record, dict) or record.get("status") != "running":
        return record
    pid = record.get("pid")
    same_host = record.get("hostname") == socket.gethostname()
    if same_host and isinstance(pid, int) and pid != os.getpid() and _process_exists(pid):
        return record
    return {**record, "status": "killed", "killed_noticed": now_iso()}


def update_run_info(run_dir: Path, **fields: Any) -> dict:
    """Return `run.json` after merging `fields` into it (written atomically); a missing file starts empty."""
    path = run_dir / RUN_FILE
    info = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    info.update(fields)
    atomic_write_json(path, info)
    return info


def find_run_dir(path: str | os.PathLike) -> Path | None:
    """Return the nearest folder at or above `path` holding both config.yaml and run.json, else None."""
    here = Path(path).expanduser().resolve()
    for folder in (here, *here.parents):
        if (folder / CONFIG_FILE).is_file() and (folder / RUN_FILE).is_file():
            return folder
    return None


def load_run_config(ckpt_path: str | os.PathLike) -> DictConfig | None:
    """Return the resolved config of the run that produced `ckpt_path` (found by walking up), else None."""
    run_dir = find_run_dir(ckpt_path)
    if run_dir is None:
        return None
    return OmegaConf.load(run_dir / CONFIG_FILE)  # type: ignore[return-value]


def _read_pointer(pointer: Path) -> Path | None:
    """Return where an `sft/last`-style pointer leads: a symlink, a folder, or a file naming a folder."""
    if pointer.is_dir():
        return pointer.resolve()
    if pointer.is_file():
        target = pointer.read_text(encoding="utf-8").strip()
        candidate = Path(target) if Path(target).is_absolute() else pointer.parent / target
        if candidate.is_dir():
            return candidate.resolve()
    return None


def resolve_ckpt(path: str | os.PathLike) -> Path:
    """Return the checkpoint folder meant by `path`: itself, or for a run folder the best (else last)
    checkpoint of its training stage (dpo/, else sft/)."""
    given = Path(path).expanduser()
    if not given.exists():
        raise FileNotFoundError(
            f"checkpoint {given} does not exist; give a checkpoint folder or a run folder"
        )
    stage = next((name for name in ("dpo", "sft") if (given / name).is_dir()), None)
    if stage is not None:
        for name in ("best", "last"):
            target = _read_pointer(given / stage / name)
            if target is not None:
                return target
        raise FileNotFoundError(
            f"run folder {given} has no {stage}/best or {stage}/last checkpoint; "
            f"point ckpt at {given}/{stage}/checkpoint-N"
        )
    return given.resolve()


def overridden_sections(overrides: Iterable[str]) -> set[str]:
    """Return the top-level keys that command-line overrides touch (`dataset=custom` and `dataset.path=x` both
    give "dataset")."""
    touched = set()
    for override in overrides:
        key = override.lstrip("~+").split("=", 1)[0]
        touched.add(key.split(".", 1)[0].split("/", 1)[0])
    return touched


def adopt_earlier_run(
    cfg: DictConfig,
    ckpt: str | os.PathLike,
    overrides: Iterable[str],
    sections: Sequence[str] = REUSED_SECTIONS,
) -> Path | None:
    """Return the earlier run folder of `ckpt` after copying its `sections` (model and dataset) into `cfg`.

    Like ms-swift's --load_dataset_config, a checkpoint evaluated or served on its own keeps the data split
    and base model it was trained with; a section the user overrides on the command line is left as given.
    dpo from an sft run takes that run's model and lora sections (it trains on the sft adapter), not its
    data.
    """
    run_dir = find_run_dir(ckpt)
    if run_dir is None:
        return None
    earlier = OmegaConf.load(run_dir / CONFIG_FILE)
    skip = overridden_sections(overrides)
    for section in sections:
        if section in skip or section not in earlier:
            continue
        try:
            cfg[section] = OmegaConf.merge(cfg[section], earlier[section])
        except Exception as exc:  # an older config with keys this version no longer knows
            raise ValueError(
                f"{run_dir / CONFIG_FILE}: its {section} section does not fit the current schema ({exc}); "
                f"pass {section}=... on the command line to choose it yourself"
            ) from None
    return run_dir


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (all devices) so that a rerun with the same seed repeats the run."""
    import numpy as np
    import torch

    random.seed(seed)
    os.environ["PYTHONHASHSEED"] = str(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
