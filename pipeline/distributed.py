"""Several processes, one run: which process this is, and one run folder that every process agrees on.

`torchrun` and `accelerate launch` start one interpreter per process, and each composes the config itself.
The run folder's name holds `${now:...}`, which two processes may read a second apart, so before Hydra
starts, every process takes the start time the first of them published in the launcher's key-value store
and pins `hydra.run.dir` / `hydra.sweep.dir` to it. Only the first process (rank 0) writes the run folder's
files and logs; the others train (stages in DISTRIBUTED_STAGES) and stay quiet.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path

from omegaconf import OmegaConf

from pipeline.config import ConfigError
from pipeline.stage_names import TRAINING_STAGES

# stages that run on every process (they synchronise through accelerate); the others run on rank 0 only
DISTRIBUTED_STAGES = frozenset(TRAINING_STAGES)
# the same variables accelerate reads, so both agree on who is who (torchrun, then MPI launchers)
RANK_VARS = ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK")
WORLD_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
PINNED_KEYS = ("hydra.run.dir", "hydra.sweep.dir")
# Hydra flags after which no job runs, so no run folder needs pinning
NO_RUN_FLAGS = {"--cfg", "-c", "--help", "-h", "--hydra-help", "--info", "-i", "--shell-completion", "-sc"}
START_TIME_KEY = "pipeline/start_time"
_NOW = re.compile(r"\$\{now:([^}]*)\}")


def _int_from_env(names: Sequence[str], default: int) -> int:
    for name in names:
        value = os.environ.get(name)
        if value not in (None, ""):
            try:
                return int(value)
            except ValueError:
                raise ConfigError(f"environment variable {name}={value!r} is not an integer") from None
    return default


def process_rank() -> int:
    """Return this process's global rank (0 when not launched as one of several processes)."""
    return _int_from_env(RANK_VARS, 0)


def world_size() -> int:
    """Return the number of processes of this run (1 when not launched by torchrun, accelerate or MPI)."""
    return _int_from_env(WORLD_VARS, 1)


def is_main_process() -> bool:
    """Return True on the process that writes the run folder's files (rank 0)."""
    return process_rank() == 0


def runs_here(stage: str) -> bool:
    """Return True when `stage` runs on this process: every stage on rank 0, DISTRIBUTED_STAGES elsewhere."""
    return is_main_process() or stage in DISTRIBUTED_STAGES


def shared_start_time(timeout_s: float = 120.0) -> datetime:
    """Return the start time of the run, the same on every process (the first to ask sets it).

    Uses the key-value store of the torchrun agent (torchrun, `accelerate launch` on several processes), which
    outlives worker restarts, so a restarted run keeps its folder and resumes there.
    """
    if (
        os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() != "true"
        or "MASTER_PORT" not in os.environ
    ):
        raise ConfigError(
            f"{world_size()} processes were started without torchrun's key-value store (no "
            "TORCHELASTIC_USE_AGENT_STORE), so they cannot agree on a run folder: launch with torchrun or "
            "`accelerate launch`, or pass the folder yourself, e.g. hydra.run.dir=outputs/my_run"
        )
    from torch.distributed import TCPStore

    host = os.environ.get("MASTER_ADDR", "127.0.0.1")
    port = int(os.environ["MASTER_PORT"])
    try:
        store = TCPStore(host, port, is_master=False, timeout=timedelta(seconds=timeout_s))
        # compare_set writes only when the key is absent and returns the stored value: the first writer wins
        value = store.compare_set(START_TIME_KEY, "", f"{time.time():.6f}")
    except (RuntimeError, OSError) as exc:
        raise ConfigError(
            f"could not reach the launcher's key-value store at MASTER_ADDR={host} MASTER_PORT={port} "
            f"({exc}); pass the run folder yourself, e.g. hydra.run.dir=outputs/my_run"
        ) from None
    return datetime.fromtimestamp(float(value.decode() if isinstance(value, bytes) else value))


def _overridden_keys(args: Sequence[str]) -> set[str]:
    """Return the keys the command-line overrides set (`+key=`, `++key=` and `key=` alike)."""
    return {arg.split("=", 1)[0].lstrip("+~") for arg in args if "=" in arg and not arg.startswith("-")}


def _run_dir_patterns(primary_config: Path) -> dict[str, str]:
    """Return the unresolved hydra.run.dir / hydra.sweep.dir of the primary config that hold ${now:...}."""
    tree = OmegaConf.to_container(OmegaConf.load(primary_config), resolve=False)
    patterns = {}
    for key in PINNED_KEYS:
        raw = _raw_value(tree, key)
        if isinstance(raw, str) and _NOW.search(raw):
            patterns[key] = raw
    return patterns


def _raw_value(tree: dict, key: str) -> object:
    """Return the value at dotted `key` of a plain nested dict (None when absent)."""
    current: object = tree
    for part in key.split("."):
        if not isinstance(current, dict) or part not in current:
            return None
        current = current[part]
    return current


def pin_run_dirs(argv: Sequence[str], primary_config: Path) -> list[str]:
    """Return `argv` with hydra.run.dir and hydra.sweep.dir fixed to the run's shared start time.

    A single process, a folder given on the command line or a flag that runs no job leaves `argv` as it is.
    Processes other than rank 0 also get `hydra.output_subdir=null`, so only rank 0 writes `.hydra/`.
    """
    args = list(argv[1:])
    if world_size() <= 1 or NO_RUN_FLAGS & set(args):
        return list(argv)
    given = _overridden_keys(args)
    extra = []
    patterns = {k: v for k, v in _run_dir_patterns(primary_config).items() if k not in given}
    if patterns:
        start = shared_start_time()
        for key, pattern in patterns.items():
            extra.append(f"{key}={_NOW.sub(lambda m: start.strftime(m.group(1)), pattern)}")
    if not is_main_process() and "hydra.output_subdir" not in given:
        extra.append("hydra.output_subdir=null")
    # Before the first override: argparse rejects overrides split in two groups by a flag.
    at = next((i for i, arg in enumerate(args) if "=" in arg and not arg.startswith("-")), len(args))
    return [argv[0], *args[:at], *extra, *args[at:]]


def adopt_submitit_tasks() -> bool:
    """Return True after exporting RANK, WORLD_SIZE, MASTER_ADDR... for a submitit job of several tasks.

    A SLURM (or submitit-local) job with tasks_per_node=N runs the pipeline N times; these variables make
    those N processes one data-parallel run, as torchrun would (one task per GPU).
    """
    if "SUBMITIT_EXECUTOR" not in os.environ or any(
        name in os.environ for name in RANK_VARS[:1] + WORLD_VARS[:1]
    ):
        return False
    import submitit
    from submitit.helpers import TorchDistributedEnvironment

    if submitit.JobEnvironment().num_tasks <= 1:
        return False
    # every GPU stays visible: accelerate picks cuda:LOCAL_RANK itself
    TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    return True


def quiet_other_processes() -> None:
    """Return None after limiting a non-main process's logging to warnings on the console (no run.log)."""
    if is_main_process():
        return
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler):
            root.removeHandler(handler)
            handler.close()
    root.setLevel(logging.WARNING)
