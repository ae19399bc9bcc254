"""Sweep summaries: every job of a multirun records its result, and the sweep folder gets one table of all.

    python -m pipeline -m +experiment=lora_qkv lora.r=4,8 optim.lr=1e-4,3e-4
    python -m pipeline +hparams_search=optuna +experiment=lora_qkv

Each job writes `result.json` into its own folder (its overrides, objective, status) and then rebuilds
`summary.csv` and `summary.md` in the sweep folder from every job folder found there, under a file lock. The
table is therefore complete after the last job whatever launcher ran the jobs (in this process, in local
subprocesses, or as SLURM jobs on other machines), and a sweep stopped halfway still has a table of what ran.
`SweepSummaryCallback` rebuilds and prints it once more when Hydra ends the sweep (hydra.callbacks).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from pipeline.distributed import is_main_process
from pipeline.runinfo import RUN_FILE
from pipeline.utils.io import atomic_write_json, atomic_write_text
from pipeline.utils.secrets import redact_overrides

RESULT_FILE = "result.json"
SUMMARY_CSV = "summary.csv"
SUMMARY_MD = "summary.md"
LOCK_FILE = ".summary.lock"
STATUSES = ("ok", "failed", "interrupted")


def sweep_group_name(sweep_dir: str | os.PathLike) -> str:
    """Return the tracking group of a sweep's jobs: the sweep folder's name (e.g. multirun-20250101-120000)."""
    return Path(sweep_dir).name


def job_folder_name(sweep_dir: Path, job_dir: Path) -> str:
    """Return the job folder relative to the sweep folder (its absolute path when it lies elsewhere)."""
    try:
        return str(Path(job_dir).resolve().relative_to(Path(sweep_dir).resolve()))
    except ValueError:
        return str(Path(job_dir).resolve())


def write_job_result(
    job_dir: str | os.PathLike,
    *,
    job: int | str,
    overrides: Sequence[str],
    status: str,
    objective: float | None,
    objective_name: str,
    direction: str,
    error: str | None = None,
) -> Path:
    """Return the path of the job's `result.json` after writing it atomically.

    The metrics come from the job's run.json when the pipeline wrote one.
    """
    if status not in STATUSES:
        raise ValueError(f"status={status!r} is not a job status; valid: {', '.join(STATUSES)}")
    job_dir = Path(job_dir)
    metrics: dict[str, Any] = {}
    run_file = job_dir / RUN_FILE
    if run_file.is_file():
        with contextlib.suppress(json.JSONDecodeError, OSError):
            metrics = json.loads(run_file.read_text(encoding="utf-8")).get("metrics") or {}
    record = {
        "job": job,
        "overrides": redact_overrides(overrides),
        "status": status,
        "objective": None if objective is None else float(objective),
        "objective_name": objective_name,
        "direction": direction,
        "metrics": metrics,
        "error": error,
    }
    return atomic_write_json(job_dir / RESULT_FILE, record)


def _job_dirs(sweep_dir: Path) -> Iterator[Path]:
    """Yield every folder under `sweep_dir` holding a result.json, not descending into job folders."""
    for folder, subdirs, files in os.walk(sweep_dir):
        if RESULT_FILE in files:
            yield Path(folder)
        if RESULT_FILE in files or RUN_FILE in files:
            subdirs[:] = []  # a job folder: its checkpoints and stage folders hold no jobs
        else:
            subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))


def _job_sort_key(record: dict) -> tuple:
    job = record.get("job")
    return (0, int(job), "") if isinstance(job, int) or str(job).isdigit() else (1, 0, str(job))


def collect_results(sweep_dir: str | os.PathLike) -> list[dict]:
    """Return the result.json of every job under `sweep_dir`, ordered by job number, with its `folder`."""
    sweep_dir = Path(sweep_dir)
    records = []
    for job_dir in _job_dirs(sweep_dir):
        path = job_dir / RESULT_FILE
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, OSError) as exc:
            record = {"job": job_dir.name, "overrides": [], "status": "failed", "error": f"{path}: {exc}"}
        record["folder"] = job_folder_name(sweep_dir, job_dir)
        records.append(record)
    return sorted(records, key=_job_sort_key)


def split_override(override: str) -> tuple[str, str]:
    """Return (key, value) of a command-line override such as `lora.r=8` or `+experiment=lora_qkv`."""
    key, sep, value = override.partition("=")
    return (key, value) if sep else (override, "")


def _override_table(records: Sequence[dict]) -> tuple[list[str], list[dict[str, str]]]:
    """Return every override key (in first-seen order) and each job's {key: value}."""
    keys: list[str] = []
    rows = []
    for record in records:
        values = dict(split_override(o) for o in record.get("overrides") or [])
        keys += [k for k in values if k not in keys]
        rows.append(values)
    return keys, rows


def _objective_header(records: Sequence[dict]) -> str:
    names = {r.get("objective_name") for r in records if r.get("objective_name")}
    return names.pop() if len(names) == 1 else "objective"


def best_result(records: Sequence[dict]) -> dict | None:
    """Return the finished job with the best objective in its direction, or None when none has one."""
    scored = [
        r
        for r in records
        if r.get("status") == "ok"
        and isinstance(r.get("objective"), (int, float))
        and math.isfinite(r["objective"])
    ]
    if not scored:
        return None
    maximize = scored[0].get("direction") == "maximize"
    return (max if maximize else min)(scored, key=lambda r: r["objective"])


def format_csv(records: Sequence[dict]) -> str:
    """Return the summary as CSV: job, every override key, the objective, status, error, folder."""
    keys, values = _override_table(records)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["job", *keys, _objective_header(records), "status", "error", "folder"])
    for record, row in zip(records, values, strict=True):
        objective = record.get("objective")
        writer.writerow(
            [
                record.get("job"),
                *(row.get(k, "") for k in keys),
                "" if objective is None else repr(float(objective)),
                record.get("status", ""),
                record.get("error") or "",
                record.get("folder", ""),
            ]
        )
    return out.getvalue()


def _md_cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _short_number(value: str) -> str:
    """Return a float-valued override to 6 significant digits when that is shorter (an Optuna lr has 17
    digits; a typed 3e-4 stays as it is); anything else as is."""
    if not any(c in value for c in ".eE"):
        return value
    try:
        rounded = f"{float(value):.6g}"
    except ValueError:
        return value
    return rounded if len(rounded) < len(value) else value


def format_markdown(records: Sequence[dict], title: str) -> str:
    """Return the summary as a markdown table: the overrides that differ between jobs as columns."""
    keys, values = _override_table(records)
    values = [{k: _short_number(v) for k, v in row.items()} for row in values]
    common = [k for k in keys if all(k in row for row in values) and len({row[k] for row in values}) == 1]
    varying = [k for k in keys if k not in common]
    header = _objective_header(records)
    direction = next((r.get("direction") for r in records if r.get("direction")), None)
    counts = {s: sum(r.get("status") == s for r in records) for s in STATUSES}
    lines = [f"# Sweep {title}", ""]
    lines.append(
        f"objective: {header}"
        + (f" ({direction})" if direction else "")
        + f"; {len(records)} job(s): "
        + ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    )
    if common:
        lines.append("common overrides: " + " ".join(f"`{k}={values[0][k]}`" for k in common))
    lines += ["", "| " + " | ".join(["job", *varying, header, "status", "folder"]) + " |"]
    lines.append("|" + "---|" * (len(varying) + 4))
    for record, row in zip(records, values, strict=True):
        objective = record.get("objective")
        status = record.get("status", "")
        if record.get("error"):
            status = f"{status}: {record['error']}"
        cells = [
            record.get("job"),
            *(row.get(k, "") for k in varying),
            "" if objective is None else f"{float(objective):.6g}",
            status,
            record.get("folder", ""),
        ]
        lines.append("| " + " | ".join(_md_cell(c) for c in cells) + " |")
    best = best_result(records)
    if best is not None:
        chosen = " ".join(
            f"{key}={_short_number(value)}"
            for key, value in map(split_override, best.get("overrides") or [])
            if key in varying
        )
        lines += [
            "",
            f"best: job {best.get('job')} ({chosen or 'no varying overrides'}), "
            f"{header} = {best['objective']:.6g}",
        ]
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def _locked(sweep_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on the sweep folder, so concurrent jobs rebuild the summary one at a time."""
    try:
        import fcntl
    except ImportError:  # not POSIX: the last job to finish still leaves a whole (atomically written) table
        yield
        return
    with open(sweep_dir / LOCK_FILE, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def build_summary(sweep_dir: str | os.PathLike) -> tuple[Path, Path, list[dict]]:
    """Return (summary.csv, summary.md, the job records) after rebuilding both files from the job folders."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"sweep folder {sweep_dir} does not exist; give the folder of a multirun")
    with _locked(sweep_dir):
        records = collect_results(sweep_dir)
        csv_path = atomic_write_text(sweep_dir / SUMMARY_CSV, format_csv(records))
        md_path = atomic_write_text(sweep_dir / SUMMARY_MD, format_markdown(records, sweep_dir.name))
    return csv_path, md_path, records


def record_job(sweep_dir: str | os.PathLike, job_dir: str | os.PathLike, **result) -> Path | None:
    """Return summary.md after writing this job's result.json (`result`: write_job_result's keywords)
    and rebuilding the sweep's summary. Only the main process writes (None elsewhere)."""
    if not is_main_process():
        return None
    write_job_result(job_dir, **result)
    return build_summary(sweep_dir)[1]


class SweepSummaryCallback(Callback):
    """Rebuilds the sweep summary when Hydra ends a multirun and prints it.

    hydra:
      callbacks:
        sweep_summary:
          _target_: pipeline.sweep.SweepSummaryCallback
    """

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        if not is_main_process() or not sweep_dir.is_dir():
            return
        _, md_path, records = build_summary(sweep_dir)
        if records:
            print(md_path.read_text(encoding="utf-8"), end="")
            print(f"sweep summary: {md_path} and {md_path.with_name(SUMMARY_CSV).name}")


class QuietOptunaLogging(Callback):
    """Sends Optuna's log through the pipeline's logging (plain text, no colour codes) and silences the
    "setup plugin" lines that alembic (under Optuna's storages) logs at import.

    Runs when Hydra starts the multirun, before the Optuna sweeper loads Optuna:

    hydra:
      callbacks:
        quiet_optuna:
          _target_: pipeline.sweep.QuietOptunaLogging
    """

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        logging.getLogger("alembic").setLevel(logging.WARNING)
        import optuna

        optuna.logging.disable_default_handler()  # its handler colours every line, in files too
        optuna.logging.enable_propagation()
