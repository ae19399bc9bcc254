"""Broken, mismatched or older checkpoint folders: every error names the file and what is wrong, before any
weight loads; a folder without preprocessor_config.json still loads."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch
from PIL import Image

from pipeline.families.checkpoints import CheckpointError
from pipeline.families.minicpm_v2.bundle import load_bundle
from pipeline.families.minicpm_v2.checkpoint import load_model
from pipeline.families.minicpm_v2.family import MiniCPMV2
from pipeline.families.minicpm_v2.tiny import build_tiny_twin
from pipeline.stages import sft
from pipeline.training.checkpoints import CheckpointWriteError
from tests.helpers import run_stage, workdir_config, write_rows

UMASK = 0o027
STEPS = ("trainer.max_steps=2", "trainer.save_steps=1", "trainer.save_total_limit=null")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ckpt-errors")
    previous = os.umask(UMASK)  # not the usual 022, so that modes show whose rule made them
    try:
        # this module's own twin, not a copy of the session's: the modes of the files the builder writes
        # under this umask are checked below
        build_tiny_twin(root / "tiny")
        Image.new("RGB", (40, 30), "red").save(root / "red.png")
        rows = [{"query": f"colour {i}?", "response": "red", "images": ["red.png"]} for i in range(4)]
        write_rows(root / "train.jsonl", rows)
        write_rows(root / "val.jsonl", rows[:1])
        run_stage(sft, _cfg(root), root / "run")
    finally:
        os.umask(previous)
    return root


def _cfg(workdir: Path, *overrides: str):
    return workdir_config(
        workdir,
        "stages=[sft]",
        *STEPS,
        "trainer.batch_size=2",
        "trainer.eval_steps=100",
        "trainer.max_eval_samples=1",
        "model.gradient_checkpointing=false",
        *overrides,
    )


def _copy_run(workdir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(workdir / "run", tmp_path / "run", symlinks=True))


def _copy_checkpoint(workdir: Path, tmp_path: Path, step: int = 2) -> Path:
    return Path(
        shutil.copytree(workdir / "run" / "sft" / f"checkpoint-{step}", tmp_path / f"checkpoint-{step}")
    )


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_a_truncated_adapter_is_named_when_loading_and_when_resuming(workdir, tmp_path):
    ckpt = _copy_checkpoint(workdir, tmp_path)
    _truncate(ckpt / "adapter_model.safetensors")
    with pytest.raises(CheckpointError, match=rf"{ckpt / 'adapter_model.safetensors'}: truncated: \d+ bytes"):
        load_bundle(str(workdir / "tiny"), ckpt=ckpt)
    run = _copy_run(workdir, tmp_path)
    _truncate(run / "sft" / "checkpoint-2" / "adapter_model.safetensors")
    with pytest.raises(CheckpointError, match="checkpoint-2/adapter_model.safetensors: truncated"):
        run_stage(sft, _cfg(workdir), run)


def test_a_header_cut_short_is_named_too(workdir, tmp_path):
    ckpt = _copy_checkpoint(workdir, tmp_path)
    (ckpt / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(CheckpointError, match=r"truncated: 10 bytes, but its header alone claims 16"):
        load_bundle(str(workdir / "tiny"), ckpt=ckpt)


def test_a_missing_adapter_file_is_not_taken_for_a_hub_id(workdir, tmp_path):
    ckpt = _copy_checkpoint(workdir, tmp_path)
    (ckpt / "adapter_model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=rf"{ckpt}: adapter_model.safetensors is missing"):
        load_bundle(str(workdir / "tiny"), ckpt=ckpt)


def test_a_broken_adapter_config_names_the_file_and_the_line(workdir, tmp_path):
    ckpt = _copy_checkpoint(workdir, tmp_path)
    (ckpt / "adapter_config.json").write_text('{\n  "r": 8,\n')
    with pytest.raises(CheckpointError, match=rf"{ckpt / 'adapter_config.json'}: invalid JSON at line 3"):
        load_bundle(str(workdir / "tiny"), ckpt=ckpt)


def test_a_truncated_model_shard_is_named(workdir, twin_copy):
    model = twin_copy(workdir / "tiny")
    shard = sorted(model.glob("model-*.safetensors"))[-1]
    _truncate(shard)
    with pytest.raises(CheckpointError, match=rf"{shard}: truncated"):
        load_model(model)


def test_resuming_with_another_rank_says_both_ranks_before_the_model_loads(workdir, tmp_path, monkeypatch):
    run = _copy_run(workdir, tmp_path)

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the settings were checked")

    monkeypatch.setattr(MiniCPMV2, "load_bundle", no_loading)
    with pytest.raises(CheckpointError) as caught:
        run_stage(sft, _cfg(workdir, "lora.r=4"), run)
    assert "the checkpoint has r=8, the config asks r=4 (lora.r)" in str(caught.value)
    assert str(run / "sft" / "checkpoint-2") in str(caught.value)


def test_resuming_with_another_preset_names_the_targets(workdir, tmp_path):
    run = _copy_run(workdir, tmp_path)
    with pytest.raises(CheckpointError, match=r"the checkpoint's target_modules differ from the config's"):
        run_stage(sft, _cfg(workdir, "lora=all"), run)
    with pytest.raises(CheckpointError, match=r"is a LoRA checkpoint, the config asks for full fine-tuning"):
        run_stage(sft, _cfg(workdir, "lora=none"), run)


def test_a_damaged_optimizer_state_is_named(workdir, tmp_path):
    run = _copy_run(workdir, tmp_path)
    _truncate(run / "sft" / "checkpoint-2" / "optimizer.pt")
    with pytest.raises(CheckpointError, match=r"checkpoint-2/optimizer.pt: cannot be read .*damaged"):
        run_stage(sft, _cfg(workdir), run)


def test_a_finished_run_is_not_resumed_with_more_steps(workdir, tmp_path):
    run = _copy_run(workdir, tmp_path)
    with pytest.raises(CheckpointError) as caught:
        run_stage(sft, _cfg(workdir, "trainer.max_steps=4"), run)
    message = str(caught.value)
    assert f"{run / 'sft' / 'checkpoint-2'} ends a finished run of 2 steps" in message
    assert "this config plans 4 steps" in message and "trainer.resume=never" in message


def test_an_unfinished_run_resumed_with_another_plan_says_what_happens(workdir, tmp_path, caplog):
    run = _copy_run(workdir, tmp_path)
    ckpt = run / "sft" / "checkpoint-1"
    with caplog.at_level(logging.WARNING, logger="pipeline.training.checkpoints"):
        out = run_stage(sft, _cfg(workdir, "trainer.max_steps=3", f"trainer.resume={ckpt}"), run)
    assert out["sft"]["global_step"] == 3
    assert (
        f"{ckpt} was saved by a run planned for 2 steps; this config plans 3: training continues at step 2 "
        "on the learning-rate schedule of a 3-step run"
    ) in caplog.text


def test_a_model_folder_without_preprocessor_config_loads_with_the_same_slicing(workdir, twin_copy):
    full = load_bundle(str(workdir / "tiny")).processor
    older = twin_copy(workdir / "tiny", "older-download")
    (older / "preprocessor_config.json").unlink()
    processor = load_bundle(str(older)).processor
    assert processor.to_config() == full.to_config()


def test_checkpoint_and_model_files_get_their_mode_from_the_umask(workdir):
    # as save_pretrained writes them: 0666 less the umask (never the 0600 of a temp file)
    for folder in (workdir / "tiny", workdir / "run" / "sft" / "checkpoint-2", workdir / "run" / "sft"):
        for path in folder.iterdir():
            if path.is_file() and not path.is_symlink():
                assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~UMASK, path


def test_a_checkpoint_that_cannot_be_written_leaves_no_partial_folder_and_names_where_to_resume(
    workdir, tmp_path, monkeypatch
):
    run = tmp_path / "run"
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        target = Path(f)
        if target.parent.name == ".tmp-checkpoint-2" and target.name == "optimizer.pt":
            target.write_bytes(b"\0" * 4096)  # what a disk that fills up mid-write leaves
            raise OSError(errno.ENOSPC, "No space left on device", str(target))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CheckpointWriteError) as caught:
        run_stage(sft, _cfg(workdir), run)
    message = str(caught.value)
    sft_dir = run / "sft"
    assert message.startswith(f"{sft_dir / 'checkpoint-2'}: the checkpoint could not be written (OSError: ")
    assert "No space left on device" in message and "GB are free on its disk" in message
    assert f"the newest complete checkpoint, {sft_dir / 'checkpoint-1'}, is kept" in message
    assert not (sft_dir / ".tmp-checkpoint-2").exists() and not (sft_dir / "checkpoint-2").exists()
    assert (sft_dir / "checkpoint-1" / "trainer_state.json").is_file()

    # a save killed outright (no exception handler ran) leaves its temporary folder: the next attempt
    # removes it, resumes from checkpoint-1 and finishes
    monkeypatch.undo()
    stale = sft_dir / ".tmp-checkpoint-2"
    stale.mkdir()
    (stale / "adapter_model.safetensors").write_bytes(b"\0" * 4096)
    out = run_stage(sft, _cfg(workdir), run)
    assert out["sft"]["global_step"] == 2 and out["sft"]["resumed_from"] == str(sft_dir / "checkpoint-1")
    assert not stale.exists() and (sft_dir / "checkpoint-2" / "trainer_state.json").is_file()
