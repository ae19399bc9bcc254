"""The stage registry: lazy lookup of each stage's `run` function (names and order: pipeline.stage_names).

A stage is a module `pipeline.stages.<name>` defining

    def run(cfg: DictConfig, run_dir: Path, state: RunState) -> dict

`run_dir` is the run folder; the stage writes its outputs under `run_dir / <name>`. `state`
(pipeline.stages.state.RunState) is resolved once by the entry point: the base model's folder and the
checkpoint each stage reads (`state.weights_for(stage, cfg)`, the one rule), plus what earlier stages of the
same run produced; the returned dict ({"ckpt": Path, "merged": Path, "metrics": {...}, ...}) is taken into it
by `state.update` and handed to the next stage. Stages read it rather than `cfg.ckpt` or `cfg.model.path`.
Only the modules of the stages a run lists are imported (all before the first stage starts, so a broken
one fails early).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import DictConfig

from pipeline.stage_names import STAGES

if TYPE_CHECKING:
    from pipeline.stages.state import RunState

__all__ = ["STAGES", "StageFn", "UnknownStageError", "get_stage"]

StageFn = Callable[[DictConfig, Path, "RunState"], dict]


class UnknownStageError(ValueError):
    """A stage name outside STAGES."""


def get_stage(name: str) -> StageFn:
    """Return the `run(cfg, run_dir, state)` function of stage `name`, importing its module on first use."""
    if name not in STAGES:
        raise UnknownStageError(f"unknown stage {name!r}; valid stages, in run order: {', '.join(STAGES)}")
    module_name = f"{__name__}.{name}"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            raise  # a dependency of the stage is missing: its own message says which
        folder = Path(__file__).parent
        raise ModuleNotFoundError(f"stage {name!r} is not available: {folder / name}.py is missing") from None
    run = getattr(module, "run", None)
    if not callable(run):
        where = getattr(module, "__file__", None) or module_name
        raise TypeError(f"{where} defines no function run(cfg, run_dir, state) for stage {name!r}")
    return run
