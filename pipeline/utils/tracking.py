"""Experiment tracking behind one small interface: no-op, Weights & Biases or TensorBoard.

The backend is picked by a ``tracking`` config mapping::

    tracking:
      backend: wandb        # none | wandb | tensorboard
      project: minicpm-v-2
      entity: null
      group: null           # sweeps: every job its own run, all in one group
      tags: []
      name: null
      mode: auto            # auto | online | offline | disabled (wandb only)
      log_model: false      # upload checkpoints as W&B artifacts
"""

from __future__ import annotations

import dataclasses
import json
import logging
import netrc
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable
from urllib.parse import urlsplit

from omegaconf import DictConfig, OmegaConf

logger = logging.getLogger(__name__)

TRACKING_BACKENDS = ("none", "wandb", "tensorboard")
WANDB_MODES = ("auto", "online", "offline", "disabled")
# Legacy spellings wandb still accepts in WANDB_MODE.
_WANDB_MODE_ALIASES = {"dryrun": "offline", "run": "online"}
_DEFAULT_WANDB_HOST = "https://api.wandb.ai"


@runtime_checkable
class Tracker(Protocol):
    """Where a run's metrics, final summary and artifacts go."""

    def log(self, metrics: dict[str, float], step: int) -> None: ...

    def summary(self, values: dict) -> None: ...

    def log_artifact(self, path: Path, name: str, type: str) -> None: ...

    def finish(self) -> None: ...


@dataclasses.dataclass(frozen=True)
class TrackingSettings:
    """The ``tracking`` config section, checked."""

    backend: str = "none"
    project: str | None = None
    entity: str | None = None
    group: str | None = None
    tags: tuple[str, ...] = ()
    name: str | None = None
    mode: str = "auto"
    log_model: bool = False


def parse_tracking_settings(tracking_cfg: Any) -> TrackingSettings:
    """Return the checked :class:`TrackingSettings` of a mapping, DictConfig, dataclass or None (no tracking).

    Raises ValueError (TypeError for a non-boolean log_model) naming the key at fault and what is accepted.
    """
    if tracking_cfg is None:
        return TrackingSettings()
    if isinstance(tracking_cfg, TrackingSettings):
        return tracking_cfg
    values = _to_plain_mapping(tracking_cfg)
    accepted = [field.name for field in dataclasses.fields(TrackingSettings)]
    unknown = sorted(set(values) - set(accepted))
    if unknown:
        raise ValueError(f"tracking: unknown key(s) {unknown}; accepted keys are {accepted}")
    defaults = TrackingSettings()
    # A null value means "use the default", so `tags: null` behaves like `tags: []`.
    settings = TrackingSettings(
        **{key: getattr(defaults, key) if value is None else value for key, value in values.items()}
    )
    if settings.backend not in TRACKING_BACKENDS:
        raise ValueError(f"tracking.backend={settings.backend!r}; expected one of {list(TRACKING_BACKENDS)}")
    if settings.mode not in WANDB_MODES:
        raise ValueError(f"tracking.mode={settings.mode!r}; expected one of {list(WANDB_MODES)}")
    if not isinstance(settings.log_model, bool):
        raise TypeError(f"tracking.log_model={settings.log_model!r}; expected true or false")
    tags = settings.tags
    if isinstance(tags, str) or not all(isinstance(tag, str) for tag in tags):
        raise ValueError(f"tracking.tags={tags!r}; expected a list of strings")
    for key in ("project", "entity", "group", "name"):
        value = getattr(settings, key)
        if value is not None and not isinstance(value, str):
            raise ValueError(f"tracking.{key}={value!r}; expected a string or null")
    return dataclasses.replace(settings, tags=tuple(tags))


def _to_plain_mapping(tracking_cfg: Any) -> dict[str, Any]:
    """Return ``tracking_cfg`` as a plain dict with interpolations resolved."""
    if isinstance(tracking_cfg, DictConfig):
        return dict(OmegaConf.to_container(tracking_cfg, resolve=True))
    if dataclasses.is_dataclass(tracking_cfg) and not isinstance(tracking_cfg, type):
        return dataclasses.asdict(tracking_cfg)
    if isinstance(tracking_cfg, Mapping):
        return dict(tracking_cfg)
    raise ValueError(
        f"tracking config is a {type(tracking_cfg).__name__}; expected a mapping, DictConfig, dataclass or null"
    )


def wandb_api_key_available(environ: Mapping[str, str] | None = None) -> bool:
    """Return True when W&B credentials exist: WANDB_API_KEY, WANDB_IDENTITY_TOKEN_FILE or a netrc entry.

    The netrc file is $NETRC or ~/.netrc, looked up for the host of $WANDB_BASE_URL (default api.wandb.ai),
    which is where ``wandb login`` stores the key.
    """
    environ = os.environ if environ is None else environ
    if environ.get("WANDB_API_KEY") or environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    netrc_path = Path(environ.get("NETRC") or Path.home() / ".netrc").expanduser()
    host = urlsplit(environ.get("WANDB_BASE_URL") or _DEFAULT_WANDB_HOST).netloc
    try:
        credentials = netrc.netrc(str(netrc_path)).authenticators(host)
    except FileNotFoundError:
        return False
    except (netrc.NetrcParseError, OSError) as error:
        logger.warning("W&B: could not read %s (%s); treating it as holding no API key", netrc_path, error)
        return False
    return bool(credentials and credentials[2])


def resolve_wandb_mode(mode: str, environ: Mapping[str, str] | None = None) -> tuple[str, str]:
    """Return the wandb mode (online, offline or disabled) to run in and the reason it was chosen.

    ``auto`` follows $WANDB_MODE when set, else goes online when an API key is available and offline
    otherwise; an explicit mode is used as is.
    """
    environ = os.environ if environ is None else environ
    if mode not in WANDB_MODES:
        raise ValueError(f"tracking.mode={mode!r}; expected one of {list(WANDB_MODES)}")
    if mode != "auto":
        return mode, f"tracking.mode={mode}"
    env_mode = environ.get("WANDB_MODE", "").strip().lower()
    if env_mode:
        resolved = _WANDB_MODE_ALIASES.get(env_mode, env_mode)
        if resolved not in WANDB_MODES[1:]:
            raise ValueError(f"WANDB_MODE={env_mode!r}; expected one of {list(WANDB_MODES[1:])}")
        return resolved, f"WANDB_MODE={env_mode}"
    if wandb_api_key_available(environ):
        return "online", "API key found"
    return "offline", "no API key found"


class NoOpTracker:
    """A tracker that records nothing; used for ``backend: none`` and on non-main processes."""

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Return None; nothing is recorded."""

    def summary(self, values: dict) -> None:
        """Return None; nothing is recorded."""

    def log_artifact(self, path: Path, name: str, type: str) -> None:
        """Return None; nothing is recorded."""

    def finish(self) -> None:
        """Return None; there is nothing to close."""


def sanitize_artifact_name(name: str) -> str:
    """Return ``name`` with every character W&B refuses in artifact names replaced by '-'."""
    # Hydra sweep job names such as "lr=1e-4,r=8" would otherwise fail at the end of training.
    cleaned = re.sub(r"[^A-Za-z0-9_.\-]+", "-", name).strip("-")
    if not cleaned:
        raise ValueError(f"artifact name {name!r} has no letters, digits, '_', '-' or '.'; pass a real name")
    return cleaned


class WandbTracker:
    """Logs to one Weights & Biases run."""

    def __init__(self, run: Any, log_model: bool) -> None:
        self._run = run
        self._log_model = log_model
        self._finished = False

    @property
    def run(self) -> Any:
        """Return the underlying ``wandb`` run."""
        return self._run

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Return None after logging ``metrics`` at ``step``."""
        self._run.log(dict(metrics), step=step)

    def summary(self, values: dict) -> None:
        """Return None after merging ``values`` into the run summary."""
        self._run.summary.update(dict(values))

    def log_artifact(self, path: Path, name: str, type: str) -> None:
        """Return None after uploading ``path`` (file or folder) as an artifact, when log_model is on."""
        if not self._log_model:
            logger.debug("W&B: tracking.log_model is false; not uploading %s", path)
            return
        import wandb

        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(
                f"artifact path {path} does not exist; expected a checkpoint file or folder"
            )
        artifact = wandb.Artifact(name=sanitize_artifact_name(name), type=type)
        if path.is_dir():
            artifact.add_dir(str(path))
        else:
            artifact.add_file(str(path))
        self._run.log_artifact(artifact)

    def finish(self) -> None:
        """Return None after closing the run; later calls do nothing."""
        if not self._finished:
            self._finished = True
            self._run.finish()


class TensorBoardTracker:
    """Writes scalars to TensorBoard event files."""

    def __init__(self, writer: Any, log_dir: Path) -> None:
        self._writer = writer
        self.log_dir = log_dir
        self._last_step = 0
        self._finished = False

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Return None after writing each metric as a scalar at ``step``."""
        for key, value in metrics.items():
            self._writer.add_scalar(key, _as_float(key, value), global_step=step)
        self._last_step = max(self._last_step, step)

    def summary(self, values: dict) -> None:
        """Return None after writing numbers as ``summary/<key>`` scalars and anything else as text."""
        for key, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self._writer.add_scalar(f"summary/{key}", float(value), global_step=self._last_step)
            else:
                self._writer.add_text(f"summary/{key}", str(value), global_step=self._last_step)
        self._writer.flush()

    def log_artifact(self, path: Path, name: str, type: str) -> None:
        """Return None; TensorBoard has no artifact store (checkpoints stay in the run folder)."""
        logger.debug("TensorBoard: no artifact store; %s stays at %s", name, path)

    def finish(self) -> None:
        """Return None after flushing and closing the event file; later calls do nothing."""
        if not self._finished:
            self._finished = True
            self._writer.close()


def _as_float(key: str, value: Any) -> float:
    """Return ``value`` as a float, naming ``key`` when it is not a number."""
    try:
        number = float(value)
    except (TypeError, ValueError) as error:
        raise TypeError(f"metric {key!r} is {value!r}; expected a number") from error
    return number


def _build_wandb(settings: TrackingSettings, run_dir: Path, resolved_config: dict) -> Tracker:
    """Return a :class:`WandbTracker` whose files live under ``run_dir/wandb``."""
    try:
        import wandb
    except ImportError as error:
        raise RuntimeError("tracking.backend=wandb needs the `wandb` package: pip install wandb") from error

    mode, reason = resolve_wandb_mode(settings.mode)
    if mode == "disabled":
        logger.info("W&B: disabled (%s); nothing will be logged", reason)
        return NoOpTracker()
    run_dir.mkdir(parents=True, exist_ok=True)
    run = wandb.init(
        dir=str(run_dir),
        project=settings.project,
        entity=settings.entity,
        group=settings.group,
        tags=list(settings.tags),
        name=settings.name,
        config=resolved_config,
        mode=mode,
        # A Hydra multirun calls this once per job in one process: each job gets its own run.
        reinit="finish_previous",
    )
    if mode == "offline":
        sync_dir = run.settings.sync_dir
        # Said loudly when it was not asked for: an offline run is easy to forget to sync.
        level = logging.WARNING if settings.mode == "auto" else logging.INFO
        logger.log(
            level,
            "W&B: %s, logging offline to %s; sync later with `wandb sync %s`",
            reason,
            sync_dir,
            sync_dir,
        )
    else:
        logger.info("W&B: logging online (%s) to %s", reason, run.url)
    return WandbTracker(run, log_model=settings.log_model)


def _build_tensorboard(run_dir: Path, resolved_config: dict) -> Tracker:
    """Return a :class:`TensorBoardTracker` writing to ``run_dir/tensorboard``."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as error:
        raise RuntimeError(
            "tracking.backend=tensorboard needs the `tensorboard` package: pip install tensorboard"
        ) from error
    log_dir = run_dir / "tensorboard"
    writer = SummaryWriter(log_dir=str(log_dir))
    # Markdown code block so the TensorBoard text tab shows the config verbatim.
    config_text = json.dumps(resolved_config, indent=2, sort_keys=True, default=str)
    writer.add_text("config", "```\n" + config_text + "\n```", global_step=0)
    logger.info("TensorBoard: logging to %s; view with `tensorboard --logdir %s`", log_dir, log_dir)
    return TensorBoardTracker(writer, log_dir)


def build_tracker(
    tracking_cfg: Any, run_dir: Path, resolved_config: dict, is_main_process: bool = True
) -> Tracker:
    """Return the tracker chosen by ``tracking_cfg.backend``; non-main processes always get a no-op one.

    ``resolved_config`` is the run's fully resolved config, stored with the run.
    """
    if not is_main_process:
        return NoOpTracker()
    settings = parse_tracking_settings(tracking_cfg)
    run_dir = Path(run_dir)
    if settings.backend == "wandb":
        return _build_wandb(settings, run_dir, resolved_config)
    if settings.backend == "tensorboard":
        return _build_tensorboard(run_dir, resolved_config)
    return NoOpTracker()
