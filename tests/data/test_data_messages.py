"""Data-side errors say what is actually wrong, with the key that fixes it: a row over max_length, a
symlink loop, an image over the pixel limit, a COCO source pointed at another data set's parquet."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.apps.generation import load_inference_bundle
from pipeline.data.images import MAX_PIXELS, ImageFiles, ImageLoadError, load_image
from pipeline.data.rows import DatasetError, Row
from pipeline.data.sources import load_rows
from pipeline.data.validate import validate_rows

LONG_ANSWER = " ".join(f"word{i}" for i in range(3000))


def png_header(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims width x height, with one row of pixel data (never decoded that far)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" + b"\x00" * 3 * min(width, 64))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


# ----- a row over max_length
@pytest.mark.parametrize("name", ["minicpm_v2", "qwen2_5_vl"])
def test_a_row_over_max_length_is_reported_with_both_numbers(family_twin, name):
    bundle, family = load_inference_bundle(str(family_twin(name)), device="cpu")
    counter = family.token_counter(bundle, 64, "delete", ImageFiles())
    rows = [
        Row("Describe it.", "Short.", [], [], None, "f:1"),
        Row("Describe it.", LONG_ANSWER, [], [], None, "f:2"),
    ]
    kept, problems = validate_rows(
        rows, check_image_files=False, count_tokens=counter, max_length=64, on_error="skip"
    )
    assert [r.origin for r in kept] == ["f:1"] and kept[0].num_tokens <= 64
    (problem,) = problems
    count = int(problem.reason.split()[0])
    assert count > 3000
    assert str(problem) == f"f:2: {count} tokens is over dataset.max_length=64; raise it or shorten the row"
    with pytest.raises(DatasetError, match=r"f:2: \d+ tokens is over dataset.max_length=64"):
        validate_rows(rows, check_image_files=False, count_tokens=counter, max_length=64)


def test_truncation_still_cuts_what_it_can_and_reports_what_it_cannot(tiny_twin):
    bundle, family = load_inference_bundle(str(tiny_twin), device="cpu")
    counter = family.token_counter(bundle, 64, "truncate", ImageFiles())
    long_answer = Row("Describe it.", LONG_ANSWER, [], [], None, "f:1")  # cut after 64 tokens: kept
    long_question = Row(LONG_ANSWER, "Fine.", [], [], None, "f:2")  # a cut leaves no answer token: refused
    kept, problems = validate_rows(
        [long_answer, long_question],
        check_image_files=False,
        count_tokens=counter,
        max_length=64,
        on_error="skip",
    )
    assert [(r.origin, r.num_tokens) for r in kept] == [("f:1", 64)]
    assert [p.origin for p in problems] == ["f:2"] and "is over dataset.max_length=64" in problems[0].reason


# ----- images
def test_a_symlink_loop_is_reported_as_one(tmp_path):
    (tmp_path / "a.png").symlink_to(tmp_path / "b.png")
    (tmp_path / "b.png").symlink_to(tmp_path / "a.png")
    (tmp_path / "dangling.png").symlink_to(tmp_path / "gone.png")
    with pytest.raises(ImageLoadError, match=r"a.png: is a symlink loop"):
        load_image(tmp_path / "a.png")
    with pytest.raises(
        ImageLoadError, match=r"dangling.png: is a symbolic link to .*gone.png, which does not exist"
    ):
        load_image(tmp_path / "dangling.png")
    with pytest.raises(ImageLoadError, match=r"nothing.png: file not found"):
        load_image(tmp_path / "nothing.png")
    rows = [Row("q", "r", [], [str(tmp_path / "a.png")], None, "f:1")]
    _, problems = validate_rows(rows, on_error="skip")
    assert "is a symlink loop" in str(problems[0]) and "not found" not in str(problems[0])


@pytest.mark.parametrize("size", [(9_000, 9_000), (20_000, 20_000)])  # over ours; over PIL's own cap too
def test_the_pixel_limit_message_quotes_the_projects_limit(tmp_path, size):
    path = png_header(tmp_path / "bomb.png", *size)
    with pytest.raises(ImageLoadError) as caught:
        load_image(path)
    message = str(caught.value)
    assert f"{size[0] * size[1]} pixels is over the {MAX_PIXELS}-pixel limit (MAX_PIXELS in" in message
    assert "decompression bomb" in message and str(Image.MAX_IMAGE_PIXELS * 2) not in message


# ----- a COCO source pointed at another data set
def test_coco_on_a_parquet_of_another_data_set_names_the_columns(tmp_path):
    folder = tmp_path / "other"
    folder.mkdir()
    table = pa.table({"question": [f"q{i}" for i in range(40)], "label": list(range(40))})
    pq.write_table(table, folder / "val-00000-of-00001.parquet")
    with pytest.raises(DatasetError) as caught:
        load_rows({"name": "coco_en_2_mini", "path": str(folder)})
    message = str(caught.value)
    assert "val-00000-of-00001.parquet is not a COCO caption parquet file" in message
    assert "expected 'image', 'answer'; found 'question', 'label'" in message
    assert "dataset.path" in message and "dataset=custom" in message and "empty caption" not in message
