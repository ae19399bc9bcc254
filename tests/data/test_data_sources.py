"""The source registry, COCO caption layouts, mixing sources, and the held-out split."""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.data import sources
from pipeline.data.images import load_image
from pipeline.data.rows import DatasetError, Row
from pipeline.data.sources import (
    COCO_QUERY,
    find_coco_files,
    load_mixture,
    load_rows,
    register_source,
    sample_rows,
    source_names,
)
from pipeline.data.split import split_rows, stable_order
from tests.helpers import write_rows

URL = "http://images.cocodataset.org/val2014/COCO_val2014_{:012d}.jpg"
CAPTIONS = {
    42: "A cat on a mat.&&A cat lies on a rug.&& A sleepy cat. ",
    73: "Two dogs run.&&Dogs playing in a park.",
    99: "A red bus.&&A bus on the street.",  # its image is never written: a problem
}


def jpeg_bytes(color: str, size: tuple[int, int] = (20, 16)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="JPEG")
    return buffer.getvalue()


def coco_images(root: Path) -> Path:
    (root / "val2014").mkdir(parents=True)
    (root / "val2014" / "COCO_val2014_000000000042.jpg").write_bytes(jpeg_bytes("red"))
    (root / "COCO_val2014_000000000073.jpg").write_bytes(jpeg_bytes("blue"))  # directly under image_root
    return root


def write_modelscope_csv(path: Path, rows: dict[int, str], *, split_name: str = "validation") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["uniq_id", "image_id", "caption", "image"])
        for uniq, (image_id, caption) in enumerate(rows.items()):
            writer.writerow([f"{split_name}-{uniq}", image_id, caption, URL.format(image_id)])
    return path


def test_registry_refuses_unknown_and_duplicate_names() -> None:
    assert {"coco_en_2_mini", "custom", "demo"} <= set(source_names())
    with pytest.raises(
        DatasetError, match=r"unknown dataset source 'cocoo'; known sources: coco_en_2_mini, custom"
    ):
        load_rows({"name": "cocoo"})
    with pytest.raises(ValueError, match="'custom' is already registered"):
        register_source("custom")(lambda cfg, max_rows: ([], []))
    with pytest.raises(DatasetError, match="needs a 'name'"):
        load_rows({"path": "x.jsonl"})


def test_coco_modelscope_csv_layout_maps_urls_to_the_local_image_root(tmp_path: Path) -> None:
    cache = tmp_path / "modelscope" / "hub" / "datasets" / "downloads" / "extracted" / "abc123"
    write_modelscope_csv(cache / "train.csv", {1: "Only one caption."}, split_name="train")
    write_modelscope_csv(cache / "valid.csv", CAPTIONS)
    root = coco_images(tmp_path / "coco")
    cfg = {"name": "coco_en_2_mini", "path": str(tmp_path / "modelscope"), "image_root": str(root)}
    assert find_coco_files(Path(cfg["path"])) == ("csv", [cache / "valid.csv"])

    rows, problems = load_rows(cfg, on_error="skip")
    assert [(r.query, r.response) for r in rows] == [
        (COCO_QUERY, "A cat on a mat."),
        (COCO_QUERY, "Two dogs run."),
    ]
    assert rows[0].references == ["A cat on a mat.", "A cat lies on a rug.", "A sleepy cat."]
    assert rows[0].images == [str(root / "val2014" / "COCO_val2014_000000000042.jpg")]
    assert rows[1].images == [str(root / "COCO_val2014_000000000073.jpg")]
    assert [r.origin for r in rows] == ["coco:validation:0", "coco:validation:1"]
    assert [p.origin for p in problems] == ["coco:validation:2"]
    assert "'COCO_val2014_000000000099.jpg' not found" in problems[0].reason
    assert str(root / "val2014" / "COCO_val2014_000000000099.jpg") in problems[0].reason

    with pytest.raises(
        DatasetError, match="coco:validation:2: image 'COCO_val2014_000000000099.jpg' not found"
    ):
        load_rows(cfg)
    assert len(load_rows(cfg, on_error="skip", max_rows=1)[0]) == 1


def test_coco_modelscope_arrow_layout_is_preferred_and_read(tmp_path: Path) -> None:
    folder = tmp_path / "datasets" / "modelscope___coco_2014_caption" / "coco_2014_caption" / "0.0.0" / "hash"
    folder.mkdir(parents=True)
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table(
        {
            "uniq_id": ["a", "b"],
            "image_id": [42, 73],
            "caption": [CAPTIONS[42], CAPTIONS[73]],
            "image": pa.array(
                [{"bytes": None, "path": URL.format(42)}, {"bytes": None, "path": URL.format(73)}],
                type=image_type,
            ),
        }
    )
    for split in ("train", "validation"):
        path = str(folder / f"coco_2014_caption-{split}.arrow")
        with pa.OSFile(path, "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table if split == "validation" else table.slice(0, 1))
    write_modelscope_csv(tmp_path / "datasets" / "downloads" / "valid.csv", CAPTIONS)
    root = coco_images(tmp_path / "coco")
    rows, problems = load_rows(
        {"name": "coco_en_2_mini", "path": str(tmp_path / "datasets"), "image_root": str(root)}
    )
    assert problems == []
    assert [r.response for r in rows] == ["A cat on a mat.", "Two dogs run."]
    assert rows[1].references == ["Two dogs run.", "Dogs playing in a park."]


def test_coco_lmms_parquet_layout_caches_embedded_images(tmp_path: Path) -> None:
    data = tmp_path / "COCO-Caption" / "data"
    data.mkdir(parents=True)
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    schema = pa.schema(
        [
            ("question_id", pa.string()),
            ("image", image_type),
            ("answer", pa.list_(pa.string())),
            ("id", pa.int64()),
        ]
    )
    shards = {
        "val-00000-of-00002.parquet": [(42, "red", ["A cat on a mat.", "A cat lies on a rug."])],
        "val-00001-of-00002.parquet": [(73, "blue", ["Two dogs run."])],
        "test-00000-of-00001.parquet": [(5, "green", ["never read"])],
    }
    for name, items in shards.items():
        table = pa.table(
            {
                "question_id": [f"COCO_val2014_{i:012d}.jpg" for i, _, _ in items],
                "image": [{"bytes": jpeg_bytes(color), "path": None} for _, color, _ in items],
                "answer": [answers for _, _, answers in items],
                "id": [i for i, _, _ in items],
            },
            schema=schema,
        )
        pq.write_table(table, data / name)
    cache = tmp_path / "cache"
    cfg = {"name": "coco_en_2_mini", "path": str(tmp_path / "COCO-Caption"), "cache_dir": str(cache)}
    rows, problems = load_rows(cfg)
    assert problems == []
    assert [r.response for r in rows] == ["A cat on a mat.", "Two dogs run."]
    assert rows[0].references == ["A cat on a mat.", "A cat lies on a rug."]
    assert [r.origin for r in rows] == ["coco:val:0", "coco:val:1"]
    assert rows[0].images == [str(cache / "images" / "COCO_val2014_000000000042.jpg")]
    assert load_image(rows[1].images[0]).getpixel((3, 3))[2] > 200  # the blue image, decoded from the cache
    stamp = Path(rows[0].images[0]).stat().st_mtime_ns
    load_rows(cfg)
    assert Path(rows[0].images[0]).stat().st_mtime_ns == stamp  # written once


def test_coco_without_path_says_what_to_download_and_where(tmp_path: Path) -> None:
    with pytest.raises(DatasetError) as caught:
        load_rows({"name": "coco_en_2_mini"})
    message = str(caught.value)
    for needed in (
        "'path' is not set",
        "modelscope/coco_2014_caption",
        "subset_name='coco_2014_caption'",
        "split='validation'",
        "val2014",
        "'image_root'",
        "lmms-lab/COCO-Caption",
        "dataset.path=",
    ):
        assert needed in message
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no COCO caption files under"):
        load_rows({"name": "coco_en_2_mini", "path": str(tmp_path / "empty")})
    with pytest.raises(DatasetError, match="does not exist"):
        load_rows({"name": "coco_en_2_mini", "path": str(tmp_path / "nowhere")})


def test_coco_url_only_layout_needs_image_root(tmp_path: Path) -> None:
    write_modelscope_csv(tmp_path / "ms" / "validation.csv", CAPTIONS)
    with pytest.raises(DatasetError, match="has no embedded image and 'image_root' is not set"):
        load_rows({"name": "coco_en_2_mini", "path": str(tmp_path / "ms")})
    with pytest.raises(DatasetError, match="image_root .* is not a folder"):
        load_rows(
            {"name": "coco_en_2_mini", "path": str(tmp_path / "ms"), "image_root": str(tmp_path / "no")}
        )


def custom_file(tmp_path: Path, name: str, count: int) -> str:
    return str(
        write_rows(
            tmp_path / f"{name}.jsonl", [{"query": f"{name}{i}", "response": "r"} for i in range(count)]
        )
    )


def test_mixture_takes_n_or_ratio_rows_per_source(tmp_path: Path, caplog) -> None:
    a, b, c = custom_file(tmp_path, "a", 10), custom_file(tmp_path, "b", 10), custom_file(tmp_path, "c", 4)
    mix = [
        {"name": "custom", "path": a, "n": 25},
        {"name": "custom", "path": b, "ratio": 0.5},
        {"name": "custom", "path": c},
    ]
    with caplog.at_level(logging.INFO, logger="pipeline.data.sources"):
        rows, problems = load_mixture(mix, seed=7)
    assert problems == []
    names = [r.query[0] for r in rows]
    assert (names.count("a"), names.count("b"), names.count("c")) == (25, 5, 4)
    assert len({r.query for r in rows if r.query[0] == "a"}) == 10  # two full copies plus five more
    assert any("sampling with replacement (2 full copies + 5 rows)" in r.getMessage() for r in caplog.records)
    again, _ = load_mixture(mix, seed=7)
    assert [r.query for r in again] == [r.query for r in rows]
    other, _ = load_mixture(mix, seed=8)
    assert [r.query for r in other] != [r.query for r in rows]


def test_mixture_refuses_bad_entries(tmp_path: Path) -> None:
    a = custom_file(tmp_path, "a", 3)
    with pytest.raises(
        DatasetError, match=r"sources\[0\] \(custom\): unknown key\(s\) paht; accepted: .*path"
    ):
        load_mixture([{"name": "custom", "paht": a}], seed=1)
    with pytest.raises(DatasetError, match="either 'n' or 'ratio', not both"):
        load_mixture([{"name": "custom", "path": a, "n": 2, "ratio": 0.5}], seed=1)
    with pytest.raises(DatasetError, match="n=0 must be a positive integer"):
        load_mixture([{"name": "custom", "path": a, "n": 0}], seed=1)
    with pytest.raises(DatasetError, match="'sources' list is empty"):
        load_mixture([], seed=1)


def test_mixture_defaults_fill_missing_source_keys(tmp_path: Path) -> None:
    write_modelscope_csv(tmp_path / "ms" / "valid.csv", {42: CAPTIONS[42]})
    root = coco_images(tmp_path / "coco")
    defaults = {"image_root": str(root), "test_ratio": 0.01}  # dataset-level keys a source does not read
    rows, _ = load_mixture(
        [{"name": "coco_en_2_mini", "path": str(tmp_path / "ms")}], seed=0, defaults=defaults
    )
    assert rows[0].images == [str(root / "val2014" / "COCO_val2014_000000000042.jpg")]


def test_sample_rows_without_n_or_ratio_keeps_everything() -> None:
    rows = [Row(str(i), "r", [], [], None, f"x:{i}") for i in range(5)]
    assert sample_rows(rows, n=None, ratio=None, seed=1) == rows
    assert [r.query for r in sample_rows(rows, n=3, ratio=None, seed=1)] == sorted(
        r.query for r in sample_rows(rows, n=3, ratio=None, seed=1)
    )


def test_split_is_deterministic_with_a_golden_count() -> None:
    rows = list(range(40504))
    train, val = split_rows(rows)
    assert len(val) == 405 and len(train) == 40504 - 405  # int(1% of 40,504), like ms-swift
    assert split_rows(rows) == (train, val)
    assert sorted(train + val) == rows and not set(train) & set(val)
    assert split_rows(rows, seed=1)[1] != val


def test_split_golden_indices_do_not_depend_on_the_platform() -> None:
    assert stable_order(6, "split", 42) == [5, 0, 1, 3, 4, 2]
    assert split_rows(list("abcdefghij"), test_ratio=0.2)[1] == ["f", "i"]


@pytest.mark.parametrize(
    ("count", "ratio", "expected"),
    [
        (1, 0.01, 0),
        (2, 0.01, 1),
        (240, 0.01, 2),
        (199, 0.01, 1),
        (100, 0.07, 7),
        (100, 0.29, 28),  # int(28.999999999999996), exactly as ms-swift counts
        (10, 0.0, 0),
    ],
)
def test_split_sizes_round_down_like_ms_swift(count: int, ratio: float, expected: int) -> None:
    train, val = split_rows(list(range(count)), test_ratio=ratio)
    assert len(val) == expected and len(train) == count - expected


def test_explicit_validation_rows_are_used_as_given() -> None:
    assert split_rows([1, 2, 3], val_rows=[9]) == ([1, 2, 3], [9])


def test_sources_module_has_one_registry() -> None:
    assert sources.get_source("custom").keys == ("path", "columns", "cache_dir")
    assert sources.source_names() == ("coco_en_2_mini", "custom", "demo", "demo_pairs", "hf")


def test_the_logged_row_count_is_the_one_after_sampling(tmp_path, caplog):
    data = write_rows(tmp_path / "rows.jsonl", [{"query": f"q{i}", "response": "r"} for i in range(12)])
    with caplog.at_level(logging.INFO, logger="pipeline.data.sources"):
        rows, _ = load_mixture(
            [{"name": "custom", "path": str(data), "n": 8}, {"name": "custom", "path": str(data)}], seed=0
        )
    assert len(rows) == 20
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("dataset custom")]
    assert lines == ["dataset custom: 8 rows (n: 8 of its 12)", "dataset custom: 12 rows"]
