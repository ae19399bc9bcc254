import json

import pytest
import torch
from PIL import Image

from pipeline.families.minicpm_v2.processor import MiniCPMVImageProcessor, choose_grid
from pipeline.families.minicpm_v2.tokenizer import train_tiny_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return train_tiny_tokenizer(tmp_path_factory.mktemp("tiny_tok"))


@pytest.fixture(scope="module")
def proc():
    return MiniCPMVImageProcessor()


def _image(width, height, mode="RGB"):
    return Image.new(mode, (width, height), color=(10, 200, 90) if mode == "RGB" else None)


@pytest.mark.parametrize(
    "size, source_size, grid, slice_size",
    [
        ((448, 448), (448, 448), None, None),  # exactly 448^2: not sliced
        ((20, 30), (364, 546), None, None),  # tiny: upscaled to about 448^2, sides multiples of 14
        ((1400, 1400), (448, 448), (3, 3), (448, 448)),  # 9.8 -> capped at 9 slices
        ((1344, 336), (896, 224), (1, 4), (448, 448)),  # wide: multiple 3, yet 4x1 fits best
        ((336, 1344), (224, 896), (4, 1), (448, 448)),  # tall
        ((1000, 700), (532, 378), (2, 2), (532, 378)),
        ((449, 448), (448, 448), (1, 2), (322, 630)),  # just above 448^2: 2 slices
    ],
)
def test_slice_sizes_and_grids(proc, tok, size, source_size, grid, slice_size):
    out = proc(_image(*size), tok)
    assert out.grid == grid
    assert tuple(out.pixel_values[0].shape) == (3, source_size[1], source_size[0])
    n = 1 + (grid[0] * grid[1] if grid else 0)
    assert len(out.pixel_values) == n
    for t in out.pixel_values:
        assert t.dtype == torch.float32 and t.shape[0] == 3
        assert t.shape[1] % 14 == 0 and t.shape[2] % 14 == 0
    for t in out.pixel_values[1:]:
        assert tuple(t.shape) == (3, slice_size[1], slice_size[0])
    ids = out.placeholder_ids
    assert ids.count(tok.im_start_id) == n == ids.count(tok.im_end_id)
    assert ids.count(tok.unk_id) == 64 * n


def test_grid_choice_worked_by_hand():
    # 1000x700: area/448^2 = 3.49 -> multiple 4, candidates 3, 4, 5; log(1000/700) = 0.357.
    # (cols, rows) errors: 3x1 0.742, 1x3 1.455, 2x2 0.357, 4x1 1.029, 1x4 1.743, 5x1 1.253, 1x5 1.966.
    assert choose_grid(1000, 700, 4, 9) == (2, 2)
    # 1600x400: log 4 = 1.386 -> 4x1 fits exactly although 3 and 5 slices were candidates too.
    assert choose_grid(1600, 400, 4, 9) == (1, 4)
    # Square with multiple 2: 1x2 and 2x1 tie at log 2; the first enumerated (cols=1, rows=2) wins.
    assert choose_grid(500, 500, 2, 9) == (2, 1)
    # Candidates above max_slice_nums are excluded: 1600x400 with at most 3 slices -> 3x1.
    assert choose_grid(1600, 400, 3, 3) == (1, 3)


def test_placeholder_layout(proc, tok):
    out = proc(_image(1000, 700), tok)  # 2 x 2 grid
    single = [tok.im_start_id] + [tok.unk_id] * 64 + [tok.im_end_id]
    row = single * 2
    expected = single + [tok.slice_start_id] + row + tok.newline_ids + row + [tok.slice_end_id]
    assert out.placeholder_ids == expected
    assert proc(_image(448, 448), tok).placeholder_ids == single


def test_slices_are_the_refined_image_row_major(tok):
    # Left half black, right half white, wide image -> one row of slices, left ones dark, right ones light.
    img = Image.new("RGB", (1344, 336), (0, 0, 0))
    img.paste((255, 255, 255), (672, 0, 1344, 336))
    out = MiniCPMVImageProcessor()(img, tok)
    means = [float(t.mean()) for t in out.pixel_values[1:]]
    assert out.grid == (1, 4)
    assert means[0] == pytest.approx(-1.0, abs=1e-3) and means[3] == pytest.approx(1.0, abs=1e-3)
    assert means == sorted(means)


def test_slice_mode_off_and_max_slice_override(tok):
    img = _image(1344, 336)
    out = MiniCPMVImageProcessor(slice_mode=False)(img, tok)
    assert out.grid is None and len(out.pixel_values) == 1
    # Still resized to about 448^2 (upscale path: int(448/2)=224 high, 896 wide).
    assert tuple(out.pixel_values[0].shape) == (3, 224, 896)
    out = MiniCPMVImageProcessor(max_slice_nums=3)(img, tok)
    assert out.grid == (1, 3) and len(out.pixel_values) == 4
    out = MiniCPMVImageProcessor(max_slice_nums=2)(img, tok)
    assert out.grid == (1, 2) and len(out.pixel_values) == 3
    out = MiniCPMVImageProcessor(max_slice_nums=1)(img, tok)
    assert out.grid is None


def test_normalisation_of_a_constant_image(proc, tok):
    out = proc(Image.new("RGB", (700, 300), (255, 0, 51)), tok)  # sliced: source and slices checked
    assert out.grid is not None
    for t in out.pixel_values:
        assert torch.all(t[0] == 1.0) and torch.all(t[1] == -1.0)
        assert torch.allclose(t[2], torch.full_like(t[2], 51 / 255 * 2 - 1), atol=1e-6)


@pytest.mark.parametrize("mode", ["RGBA", "P", "L", "CMYK", "1"])
def test_any_mode_becomes_rgb(proc, tok, mode):
    out = proc(Image.new(mode, (100, 60)), tok)
    assert out.pixel_values[0].shape[0] == 3


def test_pretrained_round_trip_and_overrides(tmp_path):
    MiniCPMVImageProcessor(max_slice_nums=4, query_num=32).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "preprocessor_config.json").read_text(encoding="utf-8"))
    assert config["image_feature_size"] == 32 and config["max_slice_nums"] == 4
    assert config["im_start"] == "<image>" and config["norm_mean"] == [0.5, 0.5, 0.5]
    loaded = MiniCPMVImageProcessor.from_pretrained(tmp_path)
    assert (loaded.max_slice_nums, loaded.query_num, loaded.scale_resolution) == (4, 32, 448)
    assert (
        MiniCPMVImageProcessor.from_pretrained(tmp_path, max_slice_nums=9, slice_mode=False).slice_mode
        is False
    )
    with pytest.raises(TypeError, match="max_slices"):
        MiniCPMVImageProcessor.from_pretrained(tmp_path, max_slices=2)
    with pytest.raises(FileNotFoundError, match="preprocessor_config.json"):
        MiniCPMVImageProcessor.from_pretrained(tmp_path / "missing")
    config["im_start"] = "<img>"
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config), encoding="utf-8")
    with pytest.raises(ValueError, match="im_start"):
        MiniCPMVImageProcessor.from_pretrained(tmp_path)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="patch_size"):
        MiniCPMVImageProcessor(patch_size=0)
    with pytest.raises(ValueError, match="norm_std"):
        MiniCPMVImageProcessor(norm_std=(0.5, 0.0, 0.5))


def test_a_folder_without_preprocessor_config_reads_the_slicing_settings_from_config_json(tmp_path, caplog):
    # older downloads of MiniCPM-V-2 have config.json (with these keys) but no preprocessor_config.json
    settings = {"query_num": 32, "max_slice_nums": 4, "scale_resolution": 224, "patch_size": 14}
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "minicpmv", "slice_mode": True, **settings})
    )
    with caplog.at_level("INFO", logger="pipeline.families.minicpm_v2.processor"):
        loaded = MiniCPMVImageProcessor.from_pretrained(tmp_path, max_slice_nums=2)
    assert (loaded.query_num, loaded.scale_resolution, loaded.patch_size) == (32, 224, 14)
    assert loaded.max_slice_nums == 2 and loaded.slice_mode is True  # overrides still win
    assert f"{tmp_path} has no preprocessor_config.json: image slicing settings read from config.json" in (
        caplog.text
    )
    assert "query_num=32" in caplog.text
    (tmp_path / "config.json").write_text(json.dumps({"query_num": 0}))
    with pytest.raises(ValueError, match=rf"{tmp_path / 'config.json'}: .*query_num"):
        MiniCPMVImageProcessor.from_pretrained(tmp_path)
