"""The run state: what the stages of one run share, resolved once by the entry point, read by every stage.

    state = RunState.resolve(cfg)            # the checkpoint given by `ckpt`; the base model's folder on
    state.model_path                         # first use (a tiny twin is built there when asked)
    state.update(get_stage("sft")(cfg, run_dir, state))   # each stage returns what it adds
    state.weights_for("infer", cfg)          # the one rule for which weights a stage reads

The rule: a stage after sft or dpo reads this run's checkpoint of that stage (its best, else its last);
without them, the `ckpt` key (a checkpoint folder, an earlier run folder, or "base"); None means the base
model at model.path. dpo itself starts from the `ckpt` key (an sft checkpoint, or the base model). infer and serve read this run's merged folder when merge ran; `infer.ckpt` overrides the
weights infer reads. merge needs an adapter and refuses the base model by name.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from pipeline.config import BASE_CKPT
from pipeline.runinfo import resolve_ckpt
from pipeline.stage_names import TRAINING_STAGES

log = logging.getLogger(__name__)

# the stages that may read a merged folder of the same run
READS_MERGED = ("infer", "serve")


@dataclass
class RunState:
    """What the stages of one run share (see the module docstring for the rule of the weights)."""

    model: DictConfig  # the run's model section: the base model's folder is resolved from it (model_path)
    ckpt: Path | None = None  # sft's (dpo's) checkpoint, else the `ckpt` key resolved; None = the base model
    ckpt_set: bool = False  # whether `ckpt` was given or training ran (else: the base model, nothing asked)
    merged: Path | None = None  # this run's merged folder
    metrics: dict[str, float] = field(default_factory=dict)  # every stage's metrics, merged key by key
    sft: dict[str, Any] | None = None  # the training stage's summary (sft or dpo)
    tracker: Any = None  # the run-wide tracker (pipeline.utils.tracking), when the entry point opened one
    outputs: dict[str, Any] = field(default_factory=dict)  # what else a stage returned, by key
    _model_path: str | None = field(default=None, repr=False)

    @classmethod
    def resolve(cls, cfg: DictConfig) -> RunState:
        """Returns the state the first stage starts from: when sft does not run, the checkpoint the `ckpt`
        key names (for dpo: the weights it starts from); the base model's folder comes on first use."""
        state = cls(model=cfg.model)
        if "sft" not in cfg.stages and cfg.ckpt is not None:
            state.ckpt_set = True
            state.ckpt = None if cfg.ckpt == BASE_CKPT else resolve_ckpt(cfg.ckpt)
        return state

    @property
    def model_path(self) -> str:
        """The base model: a local folder (the family's tiny twin built there first when
        model.build_if_missing and it is missing) or a hub id. Resolved when a stage first reads it, so a
        run reaches its first stage without loading the model's code."""
        if self._model_path is None:
            from pipeline.families import family_from_config
            from pipeline.training.twin import twin_folder

            family = family_from_config(self.model)
            self._model_path = str(
                twin_folder(family, str(self.model.path), bool(self.model.build_if_missing))
            )
        return self._model_path

    def update(self, result: dict[str, Any] | None) -> None:
        """Takes in what a stage returned: its checkpoint, merged folder, summary and metrics (merged key by
        key with the earlier stages'), anything else under `outputs`."""
        for key, value in (result or {}).items():
            if key == "metrics":
                self.metrics.update(value)
            elif key == "ckpt":
                self.ckpt, self.ckpt_set = value, True
            elif key == "merged":
                self.merged = value
            elif key in TRAINING_STAGES:
                self.sft = value
            else:
                self.outputs[key] = value

    def weights_for(self, stage: str, cfg: DictConfig) -> Path | None:
        """Returns the checkpoint `stage` reads (None: the base model at model.path), by the module's rule."""
        if stage == "infer" and cfg.infer.ckpt is not None:
            return None if cfg.infer.ckpt == BASE_CKPT else resolve_ckpt(cfg.infer.ckpt)
        if stage in READS_MERGED and self.merged is not None:
            return Path(self.merged)
        trained = [s for s in TRAINING_STAGES if s in cfg.stages]
        if stage == "eval" and self.ckpt is None and trained and self.ckpt_set:
            log.warning(
                "%s saved no checkpoint in this run; evaluating the base model %s", trained[0], cfg.model.path
            )
        return self.ckpt
