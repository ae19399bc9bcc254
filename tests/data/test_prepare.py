"""From the dataset config to the source entries the loaders read."""

from __future__ import annotations

from pipeline.data.prepare import source_entries


def test_dataset_keys_reach_the_source_that_reads_them(compose):
    cfg = compose(["dataset=custom", "dataset.path=rows.jsonl", "dataset.check_images=false"])
    (entry,) = source_entries(cfg.dataset)
    assert entry == {"name": "custom", "path": "rows.jsonl", "check_images": False}


def test_explicit_sources_are_used_as_given(compose):
    cfg = compose(["dataset.sources=[{name: demo, n: 10}, {name: custom, path: a.jsonl, ratio: 0.5}]"])
    assert source_entries(cfg.dataset) == [
        {"name": "demo", "n": 10},
        {"name": "custom", "path": "a.jsonl", "ratio": 0.5},
    ]
