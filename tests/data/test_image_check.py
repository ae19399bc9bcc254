"""The up-front image check: headers only, every distinct image once, remembered by file identity."""

from __future__ import annotations

import json
import os

import pytest
from PIL import Image

from pipeline.data import image_check
from pipeline.data.image_check import check_image_refs
from pipeline.data.sources import load_rows
from tests.data.test_data_validate import make_bomb_png, make_png
from tests.helpers import hf_caption_dataset, write_hf_dataset


@pytest.fixture
def counted(monkeypatch) -> list[str]:
    """The references whose header the check reads, in the order it reads them."""
    seen: list[str] = []
    real = image_check.read_image_header

    def counting(ref, **kwargs):
        seen.append(ref)
        return real(ref, **kwargs)

    monkeypatch.setattr(image_check, "read_image_header", counting)
    return seen


def test_headers_catch_cut_files_and_bombs_without_decoding(tmp_path):
    good = make_png(tmp_path / "ok.png")
    noise = Image.frombytes("RGB", (96, 64), bytes((i * 37) % 251 for i in range(96 * 64 * 3)))
    noise.save(tmp_path / "ok.jpg", quality=90)
    cut = tmp_path / "cut.jpg"
    cut.write_bytes((tmp_path / "ok.jpg").read_bytes()[:-2000])  # cut inside the scan data
    bomb = make_bomb_png(tmp_path / "bomb.png")
    reasons = check_image_refs(map(str, [good, tmp_path / "ok.jpg", cut, bomb]), check_cache=tmp_path / "c")
    assert reasons[str(good)] is None and reasons[str(tmp_path / "ok.jpg")] is None
    assert (
        reasons[str(cut)] == f"image {cut}: cannot decode image (truncated: the JPEG end marker is missing)"
    )
    assert "possible decompression bomb" in reasons[str(bomb)]


def test_a_second_run_checks_nothing_and_a_changed_file_is_checked_again(tmp_path, counted):
    refs = [str(make_png(tmp_path / f"{k}.png", color=c)) for k, c in enumerate(["red", "green", "blue"])]
    cache = tmp_path / "checks"
    first = check_image_refs(refs + refs, check_cache=cache)  # a shared image is checked once
    assert sorted(counted) == sorted(refs) and set(first.values()) == {None}
    counted.clear()
    assert check_image_refs(refs, check_cache=cache) == first
    assert counted == []
    (tmp_path / "1.png").write_bytes(b"no longer an image")
    again = check_image_refs(refs, check_cache=cache)
    assert counted == [refs[1]]
    assert "cannot decode image" in again[refs[1]]
    counted.clear()
    assert check_image_refs(refs, check_cache=cache) == again and counted == []  # the failure is kept too


def test_embedded_images_are_remembered_by_their_arrow_file(tmp_path, counted, monkeypatch):
    monkeypatch.setattr(image_check, "CHECK_CACHE_DIR", tmp_path / "checks")
    path = write_hf_dataset(hf_caption_dataset(4), tmp_path, "disk")
    load_rows({"name": "hf", "path": str(path)})
    assert len(counted) == 4
    counted.clear()
    load_rows({"name": "hf", "path": str(path)})
    assert counted == []


def test_the_cache_is_never_half_written(tmp_path, monkeypatch):
    import pipeline.utils.io as io_module

    cache = tmp_path / "checks"
    first = str(make_png(tmp_path / "a.png"))
    check_image_refs([first], check_cache=cache)
    before = {p.name: p.read_bytes() for p in cache.iterdir()}

    def disk_fails(fd):
        raise OSError("I/O error while writing")

    more = [str(make_png(tmp_path / f"{k}.png")) for k in range(40)]  # lands in every shard
    with monkeypatch.context() as patch:
        patch.setattr(io_module.os, "fsync", disk_fails)
        reasons = check_image_refs([first, *more], check_cache=cache)
    assert set(reasons.values()) == {None}  # the check itself is unaffected
    assert {p.name: p.read_bytes() for p in cache.iterdir()} == before  # no temp file, no torn shard
    for shard in cache.iterdir():
        assert json.loads(shard.read_text())["version"] == image_check.VERSION
    assert os.listdir(cache) == list(before)
