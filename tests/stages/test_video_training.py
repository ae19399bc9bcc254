"""Video through the entry point: each video family's tiny twin trains on rows with a video (`python -m
pipeline`, a fresh interpreter) and answers them, the frames sampled as model.video_* says."""

from __future__ import annotations

import math

import pytest

from tests.helpers import (
    copy_twin,
    log_records,
    read_rows,
    run_entry,
    run_folders,
    write_rows,
    write_test_video,
)

SETTINGS = {
    "qwen2_5_vl": ["model.video_fps=2", "model.video_max_pixels=4096"],
    "qwen3_vl": ["model.video_fps=2", "model.video_max_frames=4"],
    "minicpm_v4_6": ["model.video_max_frames=2"],
}


@pytest.mark.parametrize("family", sorted(SETTINGS))
def test_a_video_family_trains_and_answers_on_rows_with_a_video(family, family_twin, tmp_path):
    twin = copy_twin(family_twin(family), tmp_path / "twin")
    write_test_video(tmp_path / "clip.mp4")
    rows = [
        {"query": "<video>What moves?", "response": "Coloured noise.", "videos": ["clip.mp4"]},
        {"messages": [{"role": "user", "content": "What moves here?"}, {"role": "assistant", "content": "Noise."}],
         "videos": ["clip.mp4"]},  # untagged: the video opens the query
        {"query": "Two plus two?", "response": "Four."},
    ] * 2  # fmt: skip
    data = write_rows(tmp_path / "rows.jsonl", rows)
    out = tmp_path / "out"
    proc = run_entry(
        [
            "+experiment=lora_qkv",
            f"model={family}_tiny",
            f"model.path={twin}",
            *SETTINGS[family],
            "dataset=custom",
            f"dataset.path={data}",
            "dataset.test_ratio=0.34",
            f"infer.input={data}",
            "infer.max_samples=2",
            "infer.max_new_tokens=2",
            "stages=[sft,infer]",
            "device=cpu",
            "tracking=none",
            "trainer.max_steps=2",
            "trainer.batch_size=2",
            "trainer.eval_steps=2",
            "trainer.max_eval_samples=2",
            "trainer.num_workers=0",
            "model.gradient_checkpointing=false",
            f"output_root={out}",
        ],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = run_folders(out)
    losses = [record["loss"] for record in log_records(run_dir / "sft") if "loss" in record]
    assert losses and all(math.isfinite(loss) for loss in losses)
    answered = read_rows(run_dir / "infer" / "results.jsonl")
    assert [r["videos"] for r in answered] == [[str(tmp_path / "clip.mp4")]] * 2
    assert all(isinstance(r["response"], str) for r in answered)
