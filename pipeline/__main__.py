"""Entry point: `python -m pipeline [overrides]` composes the config and runs the stages in one run folder.

    python -m pipeline +experiment=lora_qkv                       # sft -> eval -> merge -> infer
    python -m pipeline +experiment=dpo ckpt=outputs/lora_qkv/<time>  # dpo on pairs -> eval -> merge -> infer
    python -m pipeline -m +experiment=lora_qkv lora.r=8,16        # a sweep: one run folder per job
    python -m pipeline stages=[eval] ckpt=outputs/<exp>/<time>/sft/checkpoint-40

Failures end with a one-line `error: ...` on stderr (the traceback goes to the run folder's run.log) and exit
code 1; Ctrl-C marks the run "interrupted" in run.json and exits with 130 (SIGTERM: 143).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import shutil
import signal
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException, MissingConfigException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException
from tqdm import tqdm

from pipeline.config import (
    BASE_CKPT,
    ConfigError,
    objective_problems,
    register_configs,
    resolve_device,
    validate,
)
from pipeline.distributed import (
    adopt_submitit_tasks,
    is_main_process,
    pin_run_dirs,
    quiet_other_processes,
    runs_here,
)
from pipeline.runinfo import (
    LOG_FILE,
    REUSED_SECTIONS,
    adopt_earlier_run,
    collect_run_info,
    now_iso,
    seed_everything,
    update_run_info,
    write_run_start,
)
from pipeline.stage_names import TRAINING_STAGES
from pipeline.stages import StageFn, get_stage
from pipeline.sweep import record_job, sweep_group_name
from pipeline.utils.lock import LOCK_FILE, FolderBusy, folder_lock
from pipeline.utils.secrets import redact_config
from pipeline.utils.tracking import build_tracker

if TYPE_CHECKING:
    from pipeline.stages.state import RunState

log = logging.getLogger("pipeline")
# Absolute, so the entry also works when imported (a console script, tests) and not only via `python -m`.
CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")

# The job in progress, so that the wrapper can point at its log after Hydra has unwound the job.
_ACTIVE: dict[str, Any] = {"run_dir": None, "traceback_logged": False}
# What Hydra writes into a job folder before our code runs; a folder holding only these has no results.
_HYDRA_ONLY = {".hydra", LOG_FILE, LOCK_FILE}


class JobFailed(BaseException):
    """Carries a single run's failure past Hydra, which would print it itself (it only catches Exception)."""

    def __init__(self, error: Exception):
        super().__init__(str(error))
        self.error = error


register_configs()


def _ensure_file_log(run_dir: Path) -> logging.Handler | None:
    """Return a run.log handler added to the root logger, or None when Hydra's logging already writes it."""
    target = (run_dir / LOG_FILE).resolve()
    root = logging.getLogger()
    for handler in root.handlers:
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).resolve() == target:
            return None
    handler = logging.FileHandler(target, encoding="utf-8")
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    root.addHandler(handler)
    return handler


def _append_traceback(run_dir: Path, exc: BaseException) -> None:
    """Append `exc`'s full traceback to run.log; the console only gets a one-line summary."""
    for handler in logging.getLogger().handlers:
        handler.flush()
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / LOG_FILE, "a", encoding="utf-8") as handle:
        handle.write(f"[{now_iso()}] run failed:\n")
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=handle)
    _ACTIVE["traceback_logged"] = True


def _discard_if_empty(run_dir: Path) -> None:
    """Remove a job folder that holds nothing but Hydra's own files (the job failed before doing anything)."""
    if run_dir.is_dir() and set(os.listdir(run_dir)) <= _HYDRA_ONLY:
        log_file = run_dir / LOG_FILE
        if not log_file.exists() or log_file.stat().st_size == 0:
            shutil.rmtree(run_dir, ignore_errors=True)


def _objective(cfg: DictConfig, state: RunState) -> float | None:
    """Return the metric sweeps optimise (`eval.objective`), or None when eval did not run."""
    if "eval" not in cfg.stages:
        return None
    metrics = state.metrics
    problems = objective_problems(cfg.eval.objective, cfg.eval.generate, written=metrics)
    if problems:
        raise ConfigError(problems)
    return float(metrics[cfg.eval.objective])


def _describe_outputs(result: dict) -> str:
    """Return the artifacts a stage returned, as `key=value` pairs (paths and numbers only)."""
    parts = []
    for key, value in result.items():
        if isinstance(value, (Path, int, float)) and not isinstance(value, bool):
            parts.append(f"{key}={value}")
        elif key == "metrics" and isinstance(value, dict):
            parts += [f"{k}={v:.4g}" for k, v in value.items() if isinstance(v, (int, float))]
    return "  ".join(parts)


def _print_summary(run_dir: Path, results: dict[str, dict], objective: float | None, cfg: DictConfig) -> None:
    """Print where each stage's outputs are (stdout, so it shows whatever the log level)."""
    print(f"run folder: {run_dir}")
    for name, result in results.items():
        where = run_dir / name
        shown = str(where) if where.exists() else "(no folder)"
        print(f"  {name:<6} {shown}  {_describe_outputs(result)}".rstrip())
    if objective is not None:
        print(f"  objective {cfg.eval.objective} = {objective:.6g} ({cfg.eval.direction})")
    comparison = results.get("eval", {}).get("comparison")
    if comparison:
        print(comparison)


def prepare_run(
    cfg: DictConfig, overrides: Sequence[str]
) -> tuple[list[tuple[str, StageFn]], str, Path | None]:
    """Return the stage functions, the device name and the earlier run adopted; raises before any work."""
    earlier = None
    ckpt = cfg.ckpt if cfg.ckpt is not None else cfg.infer.ckpt
    if "sft" not in cfg.stages and ckpt not in (None, BASE_CKPT):
        # dpo trains on the earlier run's weights (its model and tuning), on its own pairs
        sections = ("model", "lora") if "dpo" in cfg.stages else REUSED_SECTIONS
        earlier = adopt_earlier_run(cfg, ckpt, overrides, sections)
    validate(cfg)
    if reads_dataset(cfg):
        from pipeline.data.prepare import check_dataset  # the data code loads only when a run needs it

        try:
            check_dataset(cfg.dataset)
        except ValueError as exc:  # DatasetError: a config problem found before any work
            raise ConfigError(str(exc)) from None
    device = str(resolve_device(cfg))
    stages = [(name, get_stage(name)) for name in cfg.stages]
    return stages, device, earlier


def reads_dataset(cfg: DictConfig) -> bool:
    """Return True when a stage of the run reads the configured dataset (sft, dpo, eval, infer over its
    split)."""
    stages = set(cfg.stages)
    infer_split = "infer" in stages and cfg.infer.input is None and not cfg.infer.interactive
    return bool(stages & {*TRAINING_STAGES, "eval"}) or infer_split


def _run_on_other_process(cfg: DictConfig, run_dir: Path, stages: list[tuple[str, StageFn]]) -> None:
    """Return None after running this process's share of a multi-process run: the distributed stages only.

    Rank 0 writes run.json, config.yaml and the logs, and runs the single-process stages (eval, merge, infer).
    """
    from pipeline.stages.state import RunState  # the model's code: only once a run gets this far

    seed_everything(int(cfg.seed))
    state = RunState.resolve(cfg)
    for name, stage in stages:
        if runs_here(name):
            state.update(stage(cfg, run_dir, state))


def run_pipeline(
    cfg: DictConfig, run_dir: Path, overrides: Sequence[str] = (), argv: Sequence[str] = ()
) -> float | None:
    """Return the eval objective after running cfg.stages in `run_dir` (None when eval did not run).

    The run folder is locked for the whole run (by rank 0 of a multi-process run; the other ranks write
    into it with it), so a second process aimed at the same folder stops at once and names the first.
    """
    _ACTIVE.update(run_dir=None, traceback_logged=False)
    if not is_main_process():
        return _run_in_folder(cfg, run_dir, overrides, argv)
    with folder_lock(run_dir, what="run folder"):
        return _run_in_folder(cfg, run_dir, overrides, argv)


def _run_in_folder(
    cfg: DictConfig, run_dir: Path, overrides: Sequence[str], argv: Sequence[str]
) -> float | None:
    try:
        stages, device, earlier = prepare_run(cfg, overrides)
    except ConfigError:
        _discard_if_empty(run_dir)
        raise
    except Exception as exc:  # not the user's config: keep the traceback
        _ACTIVE["run_dir"] = run_dir
        _append_traceback(run_dir, exc)
        raise
    _ACTIVE["run_dir"] = run_dir
    if not is_main_process():
        return _run_on_other_process(cfg, run_dir, stages)
    info = collect_run_info(cfg, argv or sys.argv, device, overrides)
    if earlier is not None:
        info["reused_config_from"] = str(earlier)
    write_run_start(run_dir, cfg, info)
    handler = _ensure_file_log(run_dir)
    results: dict[str, dict] = {}
    timings: dict[str, float] = {}
    tracker = None
    try:
        log.info("run folder %s, device %s, stages %s", run_dir, device, list(cfg.stages))
        if earlier is not None:
            log.info("model and dataset settings taken from the earlier run %s", earlier)
        from pipeline.stages.state import RunState  # the model's code: only once a run gets this far

        seed_everything(int(cfg.seed))
        state = RunState.resolve(cfg)
        # One tracking run for the whole pipeline: sft's curves and eval's metrics land together.
        tracker = build_tracker(
            cfg.tracking, run_dir, OmegaConf.to_container(redact_config(cfg), resolve=True)
        )
        state.tracker = tracker
        for name, stage in stages:
            log.info("stage %s: writing into %s", name, run_dir / name)
            start = time.perf_counter()
            result = stage(cfg, run_dir, state) or {}
            timings[name] = round(time.perf_counter() - start, 3)
            state.update(result)
            results[name] = result
            update_run_info(run_dir, stages_done=list(results), stage_seconds=timings)
        objective = _objective(cfg, state)
    except KeyboardInterrupt as exc:
        _append_traceback(run_dir, exc)
        update_run_info(run_dir, status="interrupted", end_time=now_iso(), stages_done=list(results))
        raise
    except Exception as exc:
        _append_traceback(run_dir, exc)
        update_run_info(
            run_dir,
            status="failed",
            end_time=now_iso(),
            error=f"{type(exc).__name__}: {exc}",
            stages_done=list(results),
        )
        raise
    finally:
        if tracker is not None:
            tracker.finish()
        if handler is not None:
            logging.getLogger().removeHandler(handler)
            handler.close()
    update_run_info(run_dir, status="ok", end_time=now_iso(), metrics=state.metrics, objective=objective)
    _print_summary(run_dir, results, objective, cfg)
    return objective


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def hydra_main(cfg: DictConfig) -> float | None:
    """Return the eval objective of this job; Hydra's task function (sweepers optimise its value)."""
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    adopt_submitit_tasks()
    quiet_other_processes()
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    if multirun and cfg.tracking.group is None:
        cfg.tracking.group = sweep_group_name(hydra_cfg.sweep.dir)  # one tracking group per sweep
    elif cfg.tracking.group is None:
        cfg.tracking.group = cfg.experiment_name
    try:
        try:
            _check_sweep(cfg, hydra_cfg)
        except ConfigError:
            _discard_if_empty(run_dir)
            raise
        objective = run_pipeline(cfg, run_dir, list(hydra_cfg.overrides.task), sys.argv)
    except BaseException as exc:
        if multirun:
            status = "failed" if isinstance(exc, Exception) else "interrupted"
            _record_sweep_job(cfg, hydra_cfg, run_dir, status, None, describe_error(exc))
        if multirun or not isinstance(exc, Exception):
            raise  # sweepers count failed jobs themselves
        raise JobFailed(exc) from exc
    if multirun:
        _record_sweep_job(cfg, hydra_cfg, run_dir, "ok", objective)
    return objective


def _record_sweep_job(
    cfg: DictConfig,
    hydra_cfg: DictConfig,
    run_dir: Path,
    status: str,
    objective: float | None,
    error: str | None = None,
) -> None:
    """Write this job's result.json and rebuild the sweep's summary table (CSV and markdown)."""
    try:
        summary = record_job(
            hydra_cfg.sweep.dir,
            run_dir,
            job=hydra_cfg.job.num,
            overrides=list(hydra_cfg.overrides.task),
            status=status,
            objective=objective,
            objective_name=str(cfg.eval.objective),
            direction=str(cfg.eval.direction),
            error=error,
        )
    except OSError as exc:  # the job's own result and error matter more than the table
        log.warning("could not update the sweep summary in %s: %s", hydra_cfg.sweep.dir, exc)
        return
    if summary is not None:
        print(f"sweep summary: {summary}")


def _check_sweep(cfg: DictConfig, hydra_cfg: DictConfig) -> None:
    """Raise ConfigError when an optimising sweeper runs jobs that return no objective."""
    sweeper = str(hydra_cfg.sweeper.get("_target_", ""))
    if "optuna" in sweeper.lower() and "eval" not in cfg.stages:
        raise ConfigError(
            f"the optuna sweep optimises eval.objective but stages=[{','.join(cfg.stages)}] "
            "has no eval; add eval"
        )


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else ""


def _missing_config_message(exc: MissingConfigException) -> str:
    """Return Hydra's 'could not find' error on one line, listing the group's real options."""
    text = str(exc)
    head = re.sub(r"^In '[^']*': ", "", _first_line(text))
    match = re.search(r"Available options in '([^']+)':\n(.*?)(?:\nConfig search path|\Z)", text, re.DOTALL)
    if not match:
        return head
    # base_<group> entries are the schemas the yaml files extend, not choices
    listed = [option.strip() for option in match.group(2).splitlines()]
    options = [option for option in listed if option and not option.startswith("base_")]
    return f"{head}; available options in '{match.group(1)}': {', '.join(options)}"


def _omegaconf_message(exc: OmegaConfBaseException) -> str:
    """Return an OmegaConf merge error as `key: problem`, listing the valid keys for an unknown one."""
    key = getattr(exc, "full_key", None) or "?"
    schema = getattr(exc, "object_type", None)
    unknown_key = isinstance(exc, (ConfigKeyError, ConfigAttributeError))
    if unknown_key and schema is not None and dataclasses.is_dataclass(schema):
        valid = ", ".join(f.name for f in dataclasses.fields(schema))
        section = key.rsplit(".", 1)[0] if "." in key else "the top level"
        return f"{key} is not a key of {section}; valid keys: {valid}"
    return f"{key}: {_first_line(str(exc))}"


def describe_error(exc: BaseException) -> str:
    """Return a short, plain description of a failure for the console."""
    if isinstance(exc, (ConfigError, FolderBusy)):
        return str(exc)
    if isinstance(exc, MissingConfigException):
        return _missing_config_message(exc)
    if isinstance(exc, CompactHydraException):
        if isinstance(exc.__cause__, OmegaConfBaseException):
            return _omegaconf_message(exc.__cause__)
        return " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    if isinstance(exc, OmegaConfBaseException):
        return _omegaconf_message(exc)
    message = str(exc).strip()
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def _close_progress_bars() -> None:
    """Close every progress bar still open, so that the error line after it stands on a line of its own.

    A bar left open by a failure would otherwise be followed by the message on the same line and be drawn
    again when the interpreter collects it.
    """
    for bar in list(getattr(tqdm, "_instances", ())):
        with contextlib.suppress(Exception):
            bar.close()


def main() -> int:
    """Return the process exit code after running the Hydra entry with plain error reporting."""
    previous = os.environ.get("HYDRA_FULL_ERROR")
    # With HYDRA_FULL_ERROR=1 Hydra re-raises instead of printing its own traceback, so we can report plainly.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        try:
            # every process of a torchrun / accelerate launch must compose the same run folder
            sys.argv = pin_run_dirs(sys.argv, Path(CONF_DIR) / "config.yaml")
            hydra_main()
        except JobFailed as failed:
            raise failed.error from None
    except KeyboardInterrupt as exc:
        _close_progress_bars()
        run_dir = _ACTIVE["run_dir"]
        where = f"; {run_dir}/run.json is marked interrupted" if run_dir else ""
        # the shell's convention, 128 + the signal: 130 for Ctrl-C, 143 for SIGTERM (a scheduler's stop)
        name = getattr(exc, "signal_name", "SIGINT")
        print(f"interrupted ({name}){where}", file=sys.stderr)
        return 128 + int(signal.Signals[name])
    except Exception as exc:
        _close_progress_bars()
        if previous == "1":
            traceback.print_exc()
        print(f"error: {describe_error(exc)}", file=sys.stderr)
        if _ACTIVE["traceback_logged"]:
            print(f"full traceback in {_ACTIVE['run_dir'] / LOG_FILE}", file=sys.stderr)
        return 1
    finally:
        if previous is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = previous
    return 0


if __name__ == "__main__":
    sys.exit(main())
