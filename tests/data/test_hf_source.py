"""Hugging Face datasets as a source: parquet and save_to_disk forms built with `datasets`, every row format,
columns, splits, max_rows, images embedded (read on demand) or by path, problems naming split and row."""

from __future__ import annotations

import datasets
import pytest

from pipeline.data import hf_source
from pipeline.data.arrow_images import is_embedded
from pipeline.data.images import ImageFiles
from pipeline.data.prepare import check_dataset
from pipeline.data.rows import DatasetError
from pipeline.data.sources import load_rows
from tests.helpers import colour_image, hf_caption_dataset, write_hf_dataset


@pytest.fixture
def cache(tmp_path) -> str:
    """Where datasets keeps its Arrow copy of parquet files in these tests."""
    return str(tmp_path / "hf-cache")


@pytest.mark.parametrize("form", ["parquet", "disk"])
@pytest.mark.parametrize("image_list", [False, True], ids=["image", "images-list"])
def test_both_file_forms_give_rows_whose_embedded_images_load_on_demand(tmp_path, cache, form, image_list):
    path = write_hf_dataset(hf_caption_dataset(3, image_list=image_list), tmp_path, form)
    rows, problems = load_rows({"name": "hf", "path": str(path), "cache_dir": cache})
    assert problems == []
    assert [row.origin for row in rows] == [f"{path}:train[{k}]" for k in range(3)]
    assert [row.response for row in rows] == ["colour 0", "colour 1", "colour 2"]
    assert all(len(row.images) == 1 and is_embedded(row.images[0]) for row in rows)
    image = ImageFiles().load(rows[2].images[0])
    assert image.size == (40, 30) and image.getpixel((0, 0)) == colour_image(2).getpixel((0, 0))
    assert ImageFiles().size(rows[1].images[0]) == (40, 30)


def test_custom_reads_parquet_and_arrow_files_and_mixes_them_with_jsonl(tmp_path, cache):
    parquet = write_hf_dataset(hf_caption_dataset(2), tmp_path / "p", "parquet")
    arrow = next((write_hf_dataset(hf_caption_dataset(2), tmp_path / "a", "disk")).glob("*.arrow"))
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text('{"query": "q", "response": "r"}\n', encoding="utf-8")
    rows, _ = load_rows(
        {"name": "custom", "path": [str(parquet), str(arrow), str(jsonl)], "cache_dir": cache}
    )
    assert [row.origin for row in rows] == [
        f"{parquet}:train[0]",
        f"{parquet}:train[1]",
        f"{arrow}:train[0]",
        f"{arrow}:train[1]",
        f"{jsonl}:1",
    ]


def test_images_given_by_path_stay_paths_and_resolve_against_the_data_folder(tmp_path, cache):
    colour_image(1).save(tmp_path / "one.png")
    dataset = datasets.Dataset.from_dict(
        {"query": ["q"], "response": ["r"], "image": ["one.png"]},  # plain path strings
    )
    dataset.to_parquet(str(tmp_path / "paths.parquet"))
    rows, _ = load_rows({"name": "hf", "path": str(tmp_path / "paths.parquet"), "cache_dir": cache})
    assert rows[0].images == [str(tmp_path / "one.png")]


ROW_FORMATS = {
    "messages": (
        {
            "messages": [
                [
                    {"role": "system", "content": "be brief"},
                    {"role": "user", "content": "<image>what is it?"},
                    {"role": "assistant", "content": "a square"},
                ]
            ]
        },
        ("what is it?", "a square", "be brief"),
    ),
    "sharegpt": (
        {
            "conversations": [
                [{"from": "human", "value": "<image>and this?"}, {"from": "gpt", "value": "red"}]
            ]
        },
        ("and this?", "red", None),
    ),
    "alpaca": (
        {"instruction": ["describe"], "input": ["briefly"], "output": ["a red square"]},
        ("describe\nbriefly", "a red square", None),
    ),
}


@pytest.mark.parametrize("name", list(ROW_FORMATS))
@pytest.mark.parametrize("form", ["parquet", "disk"])
def test_every_row_format_is_read_with_its_images(tmp_path, cache, name, form):
    columns, (query, response, system) = ROW_FORMATS[name]
    features = datasets.Dataset.from_dict(columns).features
    features["images"] = datasets.List(datasets.Image())
    dataset = datasets.Dataset.from_dict(
        {**columns, "images": [[colour_image(0), colour_image(1, (20, 20))]]}, features=features
    )
    path = write_hf_dataset(dataset, tmp_path, form)
    rows, problems = load_rows({"name": "hf", "path": str(path), "cache_dir": cache}, on_error="skip")
    assert problems == []
    row = rows[0]
    assert (row.query.replace("<image>", ""), row.response, row.system) == (query, response, system)
    assert [ImageFiles().size(ref) for ref in row.images] == [(40, 30), (20, 20)]


def test_columns_rename_and_pick_the_image_column(tmp_path, cache):
    dataset = datasets.Dataset.from_dict(
        {
            "question": ["q0", "q1"],
            "answer": ["a0", "a1"],
            "picture": [colour_image(0), colour_image(1)],
            "id": [7, 8],
        },
        features=datasets.Features(
            {
                "question": datasets.Value("string"),
                "answer": datasets.Value("string"),
                "picture": datasets.Image(),
                "id": datasets.Value("int64"),
            }
        ),
    )
    path = write_hf_dataset(dataset, tmp_path, "disk")
    columns = {"question": "query", "answer": "response", "picture": "images"}
    rows, _ = load_rows({"name": "hf", "path": str(path), "columns": columns})
    assert [(row.query, row.response, len(row.images)) for row in rows] == [("q0", "a0", 1), ("q1", "a1", 1)]


def test_max_rows_and_split_are_honoured_and_a_missing_split_names_the_ones_there(tmp_path, cache):
    both = datasets.DatasetDict({"train": hf_caption_dataset(5), "test": hf_caption_dataset(2)})
    both.save_to_disk(str(tmp_path / "dd"))
    rows, _ = load_rows({"name": "hf", "path": str(tmp_path / "dd"), "max_rows": 3})
    assert [row.origin for row in rows] == [f"{tmp_path / 'dd'}:train[{k}]" for k in range(3)]
    rows, _ = load_rows({"name": "hf", "path": str(tmp_path / "dd"), "split": "test"})
    assert [row.origin for row in rows] == [f"{tmp_path / 'dd'}:test[0]", f"{tmp_path / 'dd'}:test[1]"]
    with pytest.raises(
        DatasetError, match=r"no split 'validation'; it has train, test \(set dataset.split\)"
    ):
        load_rows({"name": "hf", "path": str(tmp_path / "dd"), "split": "validation"})


@pytest.mark.parametrize("form", ["parquet", "disk"])
def test_problems_name_the_split_and_the_row(tmp_path, cache, form):
    dataset = hf_caption_dataset(3)
    rows = dataset.to_dict()
    rows["response"][1] = ""
    rows["image"] = [colour_image(0), colour_image(1), {"bytes": b"not an image", "path": None}]
    broken = datasets.Dataset.from_dict(rows, features=dataset.features)
    path = write_hf_dataset(broken, tmp_path, form)
    kept, problems = load_rows({"name": "hf", "path": str(path), "cache_dir": cache}, on_error="skip")
    assert [row.origin for row in kept] == [f"{path}:train[0]"]
    assert [p.origin for p in problems] == [f"{path}:train[1]", f"{path}:train[2]"]
    assert "'response' is empty" in problems[0].reason
    assert "cannot decode image" in problems[1].reason


def test_a_hub_id_is_downloaded_only_when_trusted(tmp_path, monkeypatch):
    with pytest.raises(
        DatasetError, match=r"downloads are off.*hf download org/set --repo-type dataset.*trust_hub=true"
    ):
        check_dataset({"name": "hf", "path": "org/set", "split": "train"})
    calls = []

    def fake_load_dataset(path, subset, split, cache_dir):
        calls.append((path, subset, split))
        hf_caption_dataset(2).save_to_disk(str(tmp_path / "downloaded"))  # Arrow files, as a download's
        return datasets.load_from_disk(str(tmp_path / "downloaded"))

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    rows, _ = load_rows(
        {"name": "hf", "path": "org/set", "split": "validation", "subset": "en", "trust_hub": True}
    )
    assert calls == [("org/set", "en", "validation")]
    assert [row.origin for row in rows] == ["org/set:validation[0]", "org/set:validation[1]"]


def test_bad_paths_and_types_are_refused_before_any_row_is_read(tmp_path):
    with pytest.raises(DatasetError, match="no_such_folder: not found"):
        check_dataset({"name": "hf", "path": str(tmp_path / "no_such_folder")})
    (tmp_path / "data.csv").write_text("a\n")
    with pytest.raises(DatasetError, match="unsupported data file type '.csv'"):
        check_dataset({"name": "hf", "path": str(tmp_path / "data.csv")})
    with pytest.raises(DatasetError, match="a folder; read a save_to_disk folder .* with dataset=hf"):
        check_dataset({"name": "custom", "path": str(tmp_path)})
    dataset = datasets.Dataset.from_dict({"query": ["q"], "response": ["r"], "image": [3]})
    path = write_hf_dataset(dataset, tmp_path, "disk")
    with pytest.raises(DatasetError, match=r"column 'image' of type int64 holds no images"):
        load_rows({"name": "hf", "path": str(path)})


def test_the_config_group_composes_and_requires_a_path(compose):
    from pipeline.config import ConfigError, validate

    cfg = compose(["dataset=hf", "dataset.path=org/set", "dataset.split=test", "dataset.trust_hub=true"])
    assert (cfg.dataset.name, cfg.dataset.split, cfg.dataset.trust_hub) == ("hf", "test", True)
    with pytest.raises(ConfigError, match="dataset.path is required for dataset=hf"):
        validate(compose(["dataset=hf"]))
    assert hf_source.HF_KEYS == ("path", "split", "subset", "columns", "trust_hub", "cache_dir")


def test_a_feedback_dataset_in_trl_s_columns_reads_as_labelled_rows(tmp_path, cache):
    # TRL's KTO columns (prompt, completion, label) beside an image column
    dataset = datasets.Dataset.from_dict(
        {
            "prompt": ["<image>What colour?", "<image>What colour?"],
            "completion": ["Red.", "Blue."],
            "label": [True, False],
            "image": [colour_image(0), colour_image(1)],
        },
        features=datasets.Features(
            {
                "prompt": datasets.Value("string"),
                "completion": datasets.Value("string"),
                "label": datasets.Value("bool"),
                "image": datasets.Image(),
            }
        ),
    )
    path = write_hf_dataset(dataset, tmp_path, "parquet")
    rows, problems = load_rows({"name": "hf", "path": str(path), "cache_dir": cache})
    assert problems == []
    assert [(row.query, row.response, row.label) for row in rows] == [
        ("<image>What colour?", "Red.", True),
        ("<image>What colour?", "Blue.", False),
    ]
    assert all(len(row.images) == 1 for row in rows)
