"""Readable sweep output: summary.md rounds float overrides, and the Optuna log is plain text without
colour codes or alembic's "setup plugin" lines."""

from __future__ import annotations

import logging

import pytest
from hydra.utils import instantiate

from pipeline import sweep
from tests.entry.test_sweeps import fake_job, read_csv
from tests.helpers import compose_config

LONG_LR = "0.00015751320499779721"


def test_summary_md_rounds_float_overrides_and_the_csv_keeps_them(tmp_path):
    fake_job(tmp_path, 0, [f"optim.lr={LONG_LR}", "lora.r=8", "seed=1"], "ok", 1.2345678901)
    fake_job(tmp_path, 1, ["optim.lr=3e-4", "lora.r=16", "seed=1"], "ok", 0.98765432109)
    _, md_path, _ = sweep.build_summary(tmp_path)
    text = md_path.read_text()
    assert LONG_LR not in text
    assert "| 0 | 0.000157513 | 8 | 1.23457 | ok | 0 |" in text
    assert "| 1 | 3e-4 | 16 | 0.987654 | ok | 1 |" in text  # already short: as typed
    assert "best: job 1 (optim.lr=3e-4 lora.r=16), eval_loss = 0.987654" in text
    assert "common overrides: `seed=1`" in text
    assert read_csv(tmp_path / "summary.csv")[0]["optim.lr"] == LONG_LR  # the exact value stays findable


@pytest.fixture
def optuna_logging():
    optuna = pytest.importorskip("optuna")
    alembic = logging.getLogger("alembic")
    level = alembic.level
    yield optuna
    optuna.logging.disable_propagation()
    optuna.logging.enable_default_handler()
    alembic.setLevel(level)


def test_the_optuna_search_sends_optuna_logs_through_ours_in_plain_text(optuna_logging, caplog, capfd):
    hydra_cfg = compose_config(["+hparams_search=optuna"], return_hydra_config=True).hydra
    callback = instantiate(hydra_cfg.callbacks.quiet_optuna)
    callback.on_multirun_start(config=hydra_cfg)
    with caplog.at_level(logging.INFO):
        optuna_logging.logging.get_logger("optuna.study.study").info("Trial 0 finished with value: 1.5")
    assert "Trial 0 finished with value: 1.5" in caplog.text  # propagated to the pipeline's handlers
    captured = capfd.readouterr()
    assert "\x1b[" not in captured.err + captured.out and "Trial 0" not in captured.err
    assert not logging.getLogger("alembic.runtime.plugins").isEnabledFor(logging.INFO)
