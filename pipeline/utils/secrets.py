"""Secrets in the config (the server's API key): the one list of them, and their redaction wherever the
config or the command line is written down (run.json, config.yaml, a checkpoint's config.yaml, a sweep's
result.json and summary, the tracker, Hydra's `.hydra/*.yaml` and `multirun.yaml`).

A run keeps the real value in memory, where the stage that needs it reads it; every copy written to disk
holds REDACTED instead. A key given through the environment (`serve.api_key_env`) is never in the config.

Hydra writes `.hydra/config.yaml`, `hydra.yaml` and `overrides.yaml` itself before the job starts, and a
sweep's `multirun.yaml` before its first job; RedactSecrets (a Hydra callback named in conf/config.yaml's
`hydra.callbacks`) rewrites them redacted as each job starts, before any of the job's own code runs.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict

SECRET_KEYS = ("serve.api_key",)  # dotted config keys whose values are never written down
REDACTED = "REDACTED"  # an override value Hydra parses: a rerun of a recorded command fails in validation
HYDRA_FILES = ("config.yaml", "hydra.yaml", "overrides.yaml")
SWEEP_FILE = "multirun.yaml"


def override_key(override: str) -> str:
    """Returns the dotted key a command-line override sets: `+serve.api_key=x` and `~serve.api_key` give
    serve.api_key; a word without `=` or `~` (a flag, a program path) gives ""."""
    text = override.strip()
    if "=" not in text and not text.startswith("~"):
        return ""
    return text.split("=", 1)[0].lstrip("~+").strip()


def redact_override(override: str) -> str:
    """Returns `override` with its value replaced by REDACTED when it sets a secret key, else unchanged."""
    key = override_key(override)
    if key not in SECRET_KEYS or "=" not in override:
        return override
    return f"{override.split('=', 1)[0]}={REDACTED}"


def redact_overrides(overrides: Iterable[str]) -> list[str]:
    """Returns the overrides (or argv) with the values of secret keys replaced by REDACTED."""
    return [redact_override(str(item)) for item in overrides]


def _redact_tree(tree: DictConfig) -> None:
    """Replaces, in place, every secret key's value that is set (not None) in a config tree."""
    for key in SECRET_KEYS:
        parent_key, _, leaf = key.rpartition(".")
        parent = OmegaConf.select(tree, parent_key) if parent_key else tree
        if not isinstance(parent, DictConfig) or leaf not in parent or OmegaConf.is_missing(parent, leaf):
            continue
        if OmegaConf.to_container(parent, resolve=False)[leaf] is not None:
            with open_dict(parent):
                parent[leaf] = REDACTED


def redact_config(cfg: DictConfig | Mapping) -> Any:
    """Returns a copy of a run's config with each secret that is set replaced by REDACTED: a DictConfig for a
    DictConfig, a plain dict for a plain dict; interpolations elsewhere are kept as they are."""
    copy = OmegaConf.create(cfg if OmegaConf.is_config(cfg) else dict(cfg))
    OmegaConf.set_readonly(copy, False)
    _redact_tree(copy)
    return copy if OmegaConf.is_config(cfg) else OmegaConf.to_container(copy, resolve=False)


def _redact_hydra_node(hydra: DictConfig) -> None:
    """Redacts the command line as Hydra records it: `overrides.task` and `job.override_dirname`."""
    task = OmegaConf.select(hydra, "overrides.task")
    if task is None:
        return
    lines = [str(item) for item in task]
    secret = [line for line in lines if redact_override(line) != line]
    if not secret:
        return
    hydra.overrides.task = redact_overrides(lines)
    dirname = OmegaConf.select(hydra, "job.override_dirname", throw_on_missing=False)
    if isinstance(dirname, str):
        kv_sep = OmegaConf.select(hydra, "job.config.override_dirname.kv_sep") or "="
        for line in secret:
            dirname = dirname.replace(line.replace("=", kv_sep), redact_override(line).replace("=", kv_sep))
        hydra.job.override_dirname = dirname


def redact_yaml_file(path: Path) -> bool:
    """Rewrites a YAML file Hydra wrote (a job config, Hydra's own config, the overrides list, a sweep's
    multirun.yaml) with its secrets redacted; returns True when it changed. Interpolations stay unresolved,
    as Hydra writes them."""
    if not path.is_file():
        return False
    loaded = OmegaConf.load(path)
    before = OmegaConf.to_yaml(loaded)
    if isinstance(loaded, DictConfig):
        with open_dict(loaded):
            _redact_tree(loaded)
            if isinstance(loaded.get("hydra"), DictConfig):
                _redact_hydra_node(loaded.hydra)
        redacted: Any = loaded
    else:  # overrides.yaml: a list of override lines
        redacted = OmegaConf.create(redact_overrides(str(item) for item in loaded))
    after = OmegaConf.to_yaml(redacted)
    if after == before:
        return False
    path.write_text(after, encoding="utf-8")
    return True


def redact_hydra_output(config: DictConfig) -> list[Path]:
    """Returns the files rewritten after redacting what Hydra wrote for the job of `config` (the full config,
    its `hydra` node included): the job's `.hydra/*.yaml` and, in a sweep, the sweep's multirun.yaml."""
    hydra = config.hydra
    files = []
    subdir = OmegaConf.select(hydra, "output_subdir")
    output_dir = OmegaConf.select(hydra, "runtime.output_dir")
    if subdir is not None and output_dir is not None:
        files += [Path(str(output_dir)) / str(subdir) / name for name in HYDRA_FILES]
    if OmegaConf.select(hydra, "mode") == RunMode.MULTIRUN:
        sweep_dir = OmegaConf.select(hydra, "sweep.dir", throw_on_missing=False)
        if sweep_dir is not None:
            files.append(Path(str(sweep_dir)) / SWEEP_FILE)
    return [path for path in files if redact_yaml_file(path)]


class RedactSecrets(Callback):
    """Hydra callback: as each job starts, rewrites the files Hydra has just written for it with the
    secrets (SECRET_KEYS) redacted, so that no copy of them stays in the run folder or the sweep folder."""

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        redact_hydra_output(config)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        redact_hydra_output(config)
