"""Training through the entry point on a Hugging Face dataset (both file forms), with the images decoded in
the DataLoader's worker and the dataset summary written before the first step."""

from __future__ import annotations

import json
import math
import os

import pytest

from pipeline.__main__ import run_pipeline
from pipeline.data import images as images_module
from tests.helpers import compose_config, hf_caption_dataset, log_records, write_hf_dataset


@pytest.mark.parametrize(("form", "source"), [("disk", "hf"), ("parquet", "custom")])
def test_sft_trains_on_a_hf_dataset_decoding_images_in_the_workers(
    form, source, tiny_twin, tmp_path, monkeypatch
):
    path = write_hf_dataset(hf_caption_dataset(12), tmp_path / "data", form)
    main = os.getpid()
    decoded_here: list[str] = []
    real = images_module.decode_image

    def decode(source_, *, name, **kwargs):
        if os.getpid() == main:
            decoded_here.append(name)
        return real(source_, name=name, **kwargs)

    monkeypatch.setattr(images_module, "decode_image", decode)
    run_dir = tmp_path / "run"
    cfg = compose_config(
        [
            "+experiment=lora_qkv",
            "stages=[sft]",
            f"model.path={tiny_twin}",
            f"dataset={source}",
            f"dataset.path={path}",
            f"dataset.cache_dir={tmp_path / 'hf-cache'}",
            "dataset.test_ratio=0.25",
            "device=cpu",
            "tracking=none",
            "trainer.max_steps=2",
            "trainer.batch_size=2",
            "trainer.eval_steps=2",
            "trainer.max_eval_samples=2",
            "trainer.num_workers=1",
            f"output_root={tmp_path}",
        ]
    )
    run_pipeline(cfg, run_dir)
    losses = [record["loss"] for record in log_records(run_dir / "sft") if "loss" in record]
    assert losses and all(math.isfinite(loss) for loss in losses)
    assert decoded_here == []  # every image was decoded in the DataLoader's worker
    summary = json.loads((run_dir / "sft" / "dataset_summary.json").read_text())
    assert summary["rows"] == {"train": 9, "validation": 3, "skipped": 0}
    assert summary["images_per_row"]["rows_with_images"] == 12
    assert summary["image_tokens_per_row"]["p50"] > 0
    assert summary["resolution_setting"].startswith("model.max_slice_nums")
