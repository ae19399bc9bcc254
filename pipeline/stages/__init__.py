"""The stage registry: names, their fixed order, and lazy lookup of each stage's `run` function.

A stage is a module `pipeline.stages.<name>` defining

    def run(cfg: DictConfig, run_dir: Path, state: dict) -> dict

`run_dir` is the run folder; the stage writes its outputs under `run_dir / <name>`. `state` holds what earlier
stages of the same run produced (for example {"ckpt": Path, "merged": Path, "metrics": {...}}); the returned
dict is merged into it ("metrics" dicts are merged key by key) and handed to the next stage.
Modules are imported only when their stage runs, so a run that needs no GPU code never imports it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path

from omegaconf import DictConfig

STAGES: tuple[str, ...] = ("sft", "eval", "merge", "infer")

StageFn = Callable[[DictConfig, Path, dict], dict]


class UnknownStageError(ValueError):
    """A stage name outside STAGES."""


def get_stage(name: str) -> StageFn:
    """Return the `run(cfg, run_dir, state)` function of stage `name`, importing its module on first use."""
    if name not in STAGES:
        raise UnknownStageError(f"unknown stage {name!r}; valid stages, in run order: {', '.join(STAGES)}")
    module = importlib.import_module(f"{__name__}.{name}")
    run = getattr(module, "run", None)
    if not callable(run):
        raise TypeError(f"{module.__file__} defines no function run(cfg, run_dir, state) for stage {name!r}")
    return run
