"""Custom-format parsing, row validation (structure, images, lengths), the error policy and image loading."""

from __future__ import annotations

import json
import logging
import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image

from pipeline.data.images import ImageLoadError, load_image, url_cache_path
from pipeline.data.rows import DatasetError, Problem, Row
from pipeline.data.sources import load_rows, read_custom_file
from pipeline.data.validate import format_problems, validate_rows, write_problems
from pipeline.families import get_family
from tests.helpers import FileServer, write_rows

# what MiniCPM-V-2 (the default model) reads: the stages pass the running family's limit
V2_LIMIT = (get_family("minicpm_v2").max_images, get_family("minicpm_v2").capabilities.display_name)


def make_png(path: Path, size: tuple[int, int] = (32, 24), color: str = "red") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def make_truncated_png(path: Path) -> Path:
    noise = Image.frombytes("RGB", (64, 64), bytes((i * 37) % 251 for i in range(64 * 64 * 3)))
    noise.save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def make_bomb_png(path: Path, width: int = 10_000, height: int = 10_000) -> Path:
    """A valid 1x1 PNG whose header claims width x height pixels (no memory is needed to write it)."""
    make_png(path, (1, 1))
    data = bytearray(path.read_bytes())
    ihdr = 8 + 8  # signature, then the IHDR chunk's length and type
    data[ihdr : ihdr + 8] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr - 4 : ihdr + 13]))
    data[ihdr + 13 : ihdr + 17] = struct.pack(">I", crc)
    path.write_bytes(bytes(data))
    return path


def test_seed_guide_rows_parse_with_every_history_variant(tmp_path: Path) -> None:
    image = make_png(tmp_path / "image_path.png")
    data = write_rows(
        tmp_path / "train.jsonl",
        [
            {"query": "55555", "response": "66666", "images": ["image_path.png"]},
            {"query": "eeeee", "response": "fffff", "history": [], "images": ["image_path.png"]},
            {
                "query": "EEEEE",
                "response": "FFFFF",
                "history": [["AAAAA", "BBBBB"], ["CCCCC", "DDDDD"]],
                "images": ["image_path.png"],
            },
        ],
    )
    rows, problems = load_rows({"name": "custom", "path": str(data)})
    assert problems == []
    assert [(r.query, r.response) for r in rows] == [
        ("55555", "66666"),
        ("eeeee", "fffff"),
        ("EEEEE", "FFFFF"),
    ]
    assert [r.history for r in rows] == [[], [], [("AAAAA", "BBBBB"), ("CCCCC", "DDDDD")]]
    assert all(r.images == [str(image)] and r.system is None for r in rows)
    assert [r.origin for r in rows] == [f"{data}:1", f"{data}:2", f"{data}:3"]


def test_relative_image_paths_resolve_against_the_data_file_folder(tmp_path: Path, monkeypatch) -> None:
    image = make_png(tmp_path / "set" / "imgs" / "a.png")
    data = write_rows(
        tmp_path / "set" / "train.jsonl", [{"query": "q", "response": "r", "images": ["imgs/a.png"]}]
    )
    monkeypatch.chdir(tmp_path)  # the working folder must not matter
    rows, _ = load_rows({"name": "custom", "path": "set/train.jsonl"})
    assert rows[0].images == [str(image)]
    assert data.exists()


def test_text_only_rows_and_system_are_accepted(tmp_path: Path) -> None:
    data = write_rows(
        tmp_path / "t.jsonl",
        [
            {"query": "hi", "response": "hello"},
            {"query": "a", "response": "b", "images": [], "system": "Be brief."},
        ],
    )
    rows, problems = load_rows({"name": "custom", "path": str(data)})
    assert problems == []
    assert [r.images for r in rows] == [[], []]
    assert rows[1].system == "Be brief."


def test_json_list_files_are_read_with_item_origins(tmp_path: Path) -> None:
    data = tmp_path / "rows.json"
    data.write_text(json.dumps([{"query": "q", "response": "r"}, {"query": "q2", "response": ""}]))
    rows, problems = load_rows({"name": "custom", "path": str(data)}, on_error="skip")
    assert [r.query for r in rows] == ["q"]
    assert [str(p) for p in problems] == [
        f"{data}:item 2: 'response' is empty; it must be a non-empty string"
    ]


BAD_ROWS = [
    ('{"query": "q", "response": ', "invalid JSON"),
    ('["q", "r"]', "row is a JSON array, expected an object with 'query' and 'response'"),
    ({"response": "r"}, "missing key 'query' (a non-empty string)"),
    ({"query": "q", "response": ""}, "'response' is empty; it must be a non-empty string"),
    ({"query": 3, "response": "r"}, "'query' must be a non-empty string, got number"),
    ({"query": "q", "response": "r", "history": "AB"}, "'history' must be a list of [query, response] pairs"),
    ({"query": "q", "response": "r", "history": [["A"]]}, "history[0] must be a [query, response] pair"),
    (
        {"query": "q", "response": "r", "images": ["ok.png", "ok.png"]},
        "2 images; MiniCPM-V-2 takes at most one image per conversation",
    ),
    ({"query": "q", "response": "r", "images": "a.png"}, "'images' must be a list of path or URL strings"),
    ({"query": "q", "response": "r", "images": ["ok.png", 3]}, "images[1] must be a non-empty path or URL"),
    ({"query": "q", "response": "r", "system": 5}, "'system' must be a string or null, got number"),
    ({"query": "q", "response": "r", "images": ["missing.png"]}, "missing.png: file not found"),
    ({"query": "q", "response": "r", "images": ["cut.png"]}, "cut.png: cannot decode image"),
    ({"query": "q", "response": "r", "images": ["bomb.png"]}, "possible decompression bomb"),
]


@pytest.mark.parametrize(("line", "reason"), BAD_ROWS, ids=[reason[:30] for _, reason in BAD_ROWS])
def test_each_problem_names_file_line_and_reason(tmp_path: Path, line: object, reason: str) -> None:
    make_png(tmp_path / "ok.png")
    make_truncated_png(tmp_path / "cut.png")
    make_bomb_png(tmp_path / "bomb.png")
    good = {"query": "q", "response": "r", "images": ["ok.png"]}
    data = write_rows(tmp_path / "d.jsonl", [good, good, line, good])
    rows, problems = load_rows({"name": "custom", "path": str(data)}, on_error="skip", image_limit=V2_LIMIT)
    assert len(rows) == 3
    assert len(problems) == 1
    assert str(problems[0]).startswith(f"{data}:3: ")
    assert reason in problems[0].reason


def test_the_image_limit_is_the_reading_familys(tmp_path: Path) -> None:
    make_png(tmp_path / "a.png")
    make_png(tmp_path / "b.png")
    two = {"query": "<image>compare with <image>", "response": "r", "images": ["a.png", "b.png"]}
    three = {"query": "q", "response": "r", "images": ["a.png", "b.png", "a.png"]}
    data = write_rows(tmp_path / "d.jsonl", [two, three])
    rows, problems = load_rows(
        {"name": "custom", "path": str(data)}, image_limit=(2, "model.family=qwen2_5_vl"), on_error="skip"
    )
    assert [r.images for r in rows] == [[str(tmp_path / "a.png"), str(tmp_path / "b.png")]]
    assert [str(p) for p in problems] == [
        f"{data}:2: 3 images; model.family=qwen2_5_vl takes at most 2 images per conversation"
    ]
    with pytest.raises(DatasetError, match=f"{data}:1: 2 images; MiniCPM-V-2 takes at most one image"):
        load_rows({"name": "custom", "path": str(data)}, image_limit=V2_LIMIT)


def test_raise_lists_the_first_twenty_problems_and_the_total(tmp_path: Path) -> None:
    lines = [{"query": "q", "response": ""} for _ in range(25)] + [{"query": "q", "response": "r"}]
    data = write_rows(tmp_path / "d.jsonl", lines)
    with pytest.raises(DatasetError) as caught:
        load_rows({"name": "custom", "path": str(data)})
    message = str(caught.value)
    assert message.startswith("25 problem(s) in the dataset:")
    assert f"{data}:1: 'response' is empty" in message
    assert f"{data}:20: " in message and f"{data}:21: " not in message
    assert "... and 5 more" in message
    assert "on_error: skip" in message


def test_skip_drops_bad_rows_without_substituting_others(tmp_path: Path) -> None:
    lines = [{"query": f"q{i}", "response": "" if i % 2 else f"r{i}"} for i in range(6)]
    data = write_rows(tmp_path / "d.jsonl", lines)
    rows, problems = load_rows({"name": "custom", "path": str(data)}, on_error="skip")
    assert [r.query for r in rows] == ["q0", "q2", "q4"]
    assert [p.origin for p in problems] == [f"{data}:2", f"{data}:4", f"{data}:6"]


def test_a_source_with_no_usable_rows_is_an_error_even_when_skipping(tmp_path: Path) -> None:
    data = write_rows(tmp_path / "d.jsonl", [{"query": "q"}])
    with pytest.raises(DatasetError, match="no usable rows"):
        load_rows({"name": "custom", "path": str(data)}, on_error="skip")


def test_invalid_on_error_value_is_refused(tmp_path: Path) -> None:
    data = write_rows(tmp_path / "d.jsonl", [{"query": "q", "response": "r"}])
    with pytest.raises(ValueError, match="use one of raise, skip"):
        load_rows({"name": "custom", "path": str(data)}, on_error="ignore")


def test_missing_data_file_and_wrong_suffix_are_named(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="nope.jsonl: data file not found"):
        load_rows({"name": "custom", "path": str(tmp_path / "nope.jsonl")})
    (tmp_path / "rows.txt").write_text("")
    with pytest.raises(DatasetError, match="use .jsonl, .json, .parquet or .arrow"):
        load_rows({"name": "custom", "path": str(tmp_path / "rows.txt")})
    with pytest.raises(DatasetError, match="needs 'path'"):
        load_rows({"name": "custom"})


def test_unknown_keys_are_warned_about_once_per_file(tmp_path: Path, caplog) -> None:
    lines = [{"query": "q", "response": "r", "image": "x.png", "lang": "en"} for _ in range(3)]
    data = write_rows(tmp_path / "d.jsonl", lines)
    with caplog.at_level(logging.WARNING, logger="pipeline.data.sources"):
        rows, problems = read_custom_file(data)
    assert len(rows) == 3 and problems == []
    warnings = [r.getMessage() for r in caplog.records if "unknown keys" in r.getMessage()]
    assert len(warnings) == 1
    assert "'image' (3 rows, did you mean 'images'?)" in warnings[0] and "'lang' (3 rows)" in warnings[0]


def test_token_lengths_are_checked_through_the_injected_counter(tmp_path: Path) -> None:
    ok = make_png(tmp_path / "ok.png")
    rows = [
        Row("short", "r", [], [str(ok)], None, "f:1"),
        Row("long " * 50, "r", [], [], None, "f:2"),
        Row("odd", "r", [], [], None, "f:3"),
        Row("broken image", "r", [], [str(tmp_path / "gone.png")], None, "f:4"),
    ]
    seen = []

    def count_tokens(row: Row) -> int | None:
        seen.append(row.origin)
        return None if row.query == "odd" else len(row.query.split())

    kept, problems = validate_rows(rows, count_tokens=count_tokens, max_length=10, on_error="skip")
    assert [r.origin for r in kept] == ["f:1"]
    assert [str(p) for p in problems] == [
        "f:2: 50 tokens is over dataset.max_length=10; raise it or shorten the row",
        "f:3: row cannot be encoded with this model's template",
        f"f:4: image {tmp_path / 'gone.png'}: file not found",
    ]  # in row order, whichever check found them
    assert seen == ["f:1", "f:2", "f:3"]  # a row with a broken image is never tokenized


def test_urls_are_checked_like_local_files(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr("pipeline.data.images.RETRIES", 0)
    rows = [Row("q", "r", [], ["http://127.0.0.1:9/none.png"], None, "f:1")]
    with pytest.raises(DatasetError, match=r"f:1: image http://127.0.0.1:9/none.png: download failed"):
        validate_rows(rows, cache_dir=tmp_path / "c", on_error="raise")


def test_write_problems_writes_jsonl_atomically(tmp_path: Path) -> None:
    out = write_problems(
        [Problem("a.jsonl:3", "bad"), Problem("b.jsonl:1", "worse")], tmp_path / "run" / "p.jsonl"
    )
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert lines == [{"origin": "a.jsonl:3", "reason": "bad"}, {"origin": "b.jsonl:1", "reason": "worse"}]
    assert [p.name for p in out.parent.iterdir()] == ["p.jsonl"]


def test_format_problems_short_list_has_no_more_line() -> None:
    message = format_problems([Problem("x:1", "bad")])
    assert "x:1: bad" in message and "more" not in message


def test_load_image_converts_modes_to_rgb(tmp_path: Path) -> None:
    path = tmp_path / "p.png"
    Image.new("P", (5, 4), 3).save(path)
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (5, 4)
    with pytest.raises(ImageLoadError, match="is a folder"):
        load_image(tmp_path)


@pytest.fixture
def files_server(tmp_path: Path):
    png = make_png(tmp_path / "served.png", (7, 3)).read_bytes()
    served = FileServer({"/img.png": png, "/big.png": b"x" * 2048})
    yield served
    served.close()


@pytest.fixture
def image_server(files_server) -> str:
    return files_server.url


def test_urls_are_downloaded_once_into_the_cache(files_server, tmp_path: Path, image_server: str) -> None:
    url = f"{image_server}/img.png"
    cache = tmp_path / "cache"
    assert load_image(url, cache_dir=cache).size == (7, 3)
    assert load_image(url, cache_dir=cache).size == (7, 3)
    assert files_server.hits == ["/img.png"]
    assert url_cache_path(url, cache).is_file()


def test_url_errors_name_the_url_and_the_reason(tmp_path: Path, image_server: str) -> None:
    with pytest.raises(ImageLoadError, match=r"/missing.png: download failed after 1 attempt\(s\).*404"):
        load_image(f"{image_server}/missing.png", retries=2)
    with pytest.raises(ImageLoadError, match="over the 1024-byte limit"):
        load_image(f"{image_server}/big.png", max_bytes=1024)
    rows = [Row("q", "r", [], [f"{image_server}/missing.png"], None, "f:1")]
    _, problems = validate_rows(rows, cache_dir=tmp_path / "c", on_error="skip")
    assert problems[0].origin == "f:1" and "404" in problems[0].reason


def test_coco_allow_download_fetches_missing_images_once(
    files_server, tmp_path: Path, image_server: str
) -> None:
    data = tmp_path / "ms" / "validation.csv"
    data.parent.mkdir()
    data.write_text(
        "uniq_id,image_id,caption,image\n"
        f"a,1,A small image.&&Tiny.,{image_server}/img.png\n"
        f"b,2,Gone.,{image_server}/missing.png\n"
    )
    cfg = {
        "name": "coco_en_2_mini",
        "path": str(data),
        "allow_download": True,
        "cache_dir": str(tmp_path / "c"),
    }
    rows, problems = load_rows(cfg, on_error="skip")
    assert [r.response for r in rows] == ["A small image."]
    assert rows[0].images == [str(url_cache_path(f"{image_server}/img.png", tmp_path / "c" / "urls"))]
    assert [p.origin for p in problems] == ["coco:validation:1"]
    assert "download failed" in problems[0].reason and "404" in problems[0].reason
    load_rows(cfg, on_error="skip")
    assert files_server.hits.count("/img.png") == 1


def test_max_rows_caps_records_across_files(tmp_path: Path) -> None:
    first = write_rows(
        tmp_path / "a.jsonl", [{"query": "q", "response": ""}, {"query": "q", "response": "r"}]
    )
    second = write_rows(tmp_path / "b.jsonl", [{"query": f"b{i}", "response": "r"} for i in range(5)])
    rows, problems = load_rows(
        {"name": "custom", "path": [str(first), str(second)]}, on_error="skip", max_rows=4
    )
    assert [r.query for r in rows] == ["q", "b0", "b1"] and len(problems) == 1
    empty = write_rows(tmp_path / "empty.jsonl", [])
    with pytest.raises(DatasetError, match=f"'custom' at {empty} has no usable rows"):
        load_rows({"name": "custom", "path": str(empty)})
