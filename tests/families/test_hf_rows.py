"""Every family reads rows of a Hugging Face dataset: images embedded in its Arrow files are decoded when a
sample is built, and the dataset summary's image tokens and resolution setting come from the family."""

from __future__ import annotations

import pytest
import torch

from pipeline.data.arrow_images import is_embedded
from pipeline.data.images import ImageFiles
from pipeline.data.sources import load_rows
from pipeline.data.summary import describe_summary, summarize_dataset
from pipeline.families import FAMILIES, get_family
from tests.helpers import hf_caption_dataset, write_hf_dataset


def tensors(value: object) -> list[torch.Tensor]:
    """Returns the tensors in a batch entry: a tensor, or lists of them (MiniCPM-V-2's slices per row)."""
    if isinstance(value, torch.Tensor):
        return [value]
    return [t for item in value for t in tensors(item)] if isinstance(value, list | tuple) else []


@pytest.mark.parametrize("name", list(FAMILIES))
def test_the_collate_builds_a_batch_from_embedded_images(name, family_twin, tmp_path):
    family = get_family(name)
    bundle = family.load_bundle(family_twin(name))
    path = write_hf_dataset(hf_caption_dataset(2, image_list=True), tmp_path, "parquet")
    rows, _ = load_rows({"name": "hf", "path": str(path), "cache_dir": str(tmp_path / "cache")})
    assert all(is_embedded(row.images[0]) for row in rows)
    images = ImageFiles()
    counter = family.token_counter(bundle, 512, "delete", images)
    for row in rows:
        row.num_tokens = counter(row)
    dataset = family.dataset(bundle, rows, 512, "delete", images)
    batch = family.training_collate(bundle)([dataset[0], dataset[1]])
    pixels = [tensor for key, value in batch.items() if "pixel" in key for tensor in tensors(value)]
    assert pixels and all(p.numel() > 0 and torch.isfinite(p).all() for p in pixels)
    assert batch["input_ids"].shape[0] in (1, 2)  # padded rows, or one packed row

    summary = summarize_dataset(
        rows,
        rows,
        [],
        max_length=512,
        skipped=0,
        image_tokens=family.image_token_counter(bundle, images),
        resolution_setting=family.resolution_setting,
    )
    assert summary["images_per_row"] == {"mean": 1.0, "max": 1, "rows_with_images": 2}
    assert summary["tokens_per_row"]["max"] == max(row.num_tokens for row in rows)
    if summary["image_tokens_per_row"] is not None:
        assert 0 < summary["image_tokens_per_row"]["max"] < summary["tokens_per_row"]["max"]
    assert family.resolution_setting.startswith("model.")
    assert f"memory tight? lower {family.resolution_setting}" in describe_summary(summary)
