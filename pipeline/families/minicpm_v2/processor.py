"""MiniCPM-V-2 image preprocessing: slicing, pixel normalisation and the image placeholder ids.

Slicing reproduces the checkpoint's ``slice_image`` step by step (same candidate grids, same tie-breaking,
same Python ``round``, same PIL BICUBIC resizes), because the vision tower and resampler were trained on
exactly those crops. With slicing off (``slice_mode=False``) or an image no larger than
``scale_resolution``², only the source image is used, resized to about ``scale_resolution``² with sides that
are multiples of ``patch_size``.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from PIL import Image

from pipeline.families.checkpoints import MODEL_CONFIG
from pipeline.utils.io import atomic_write_json

log = logging.getLogger(__name__)

PREPROCESSOR_CONFIG = "preprocessor_config.json"
# the slicing settings config.json carries, under the processor's own argument names
_MODEL_CONFIG_KEYS = ("scale_resolution", "patch_size", "max_slice_nums", "query_num", "slice_mode")
# Token strings the checkpoint's preprocessor_config.json names; only these are understood here.
_TOKEN_FIELDS = {
    "im_start": "<image>",
    "im_end": "</image>",
    "slice_start": "<slice>",
    "slice_end": "</slice>",
    "unk": "<unk>",
}


class PlaceholderTokenizer(Protocol):
    """The token ids an image placeholder is made of (``MiniCPMVTokenizer`` provides them)."""

    unk_id: int
    im_start_id: int
    im_end_id: int
    slice_start_id: int
    slice_end_id: int
    newline_ids: list[int]


@dataclass
class ProcessedImage:
    """One image ready for the model: pixel tensors (source first, then slices row-major) and placeholder ids."""

    pixel_values: list[torch.Tensor]
    grid: tuple[int, int] | None  # (rows, cols) of the slices, None when not sliced
    placeholder_ids: list[int]


def _ensure_divide(length: float, multiple: int) -> int:
    """Returns ``length`` rounded (Python round, half to even) to a positive multiple of ``multiple``."""
    return max(round(length / multiple) * multiple, multiple)


def _best_resize(
    size: tuple[float, float], scale_resolution: int, patch_size: int, allow_upscale: bool = False
) -> tuple[int, int]:
    """Returns (width, height) of about ``scale_resolution``² area keeping the aspect, sides multiples of patch."""
    width, height = size
    if width * height > scale_resolution * scale_resolution or allow_upscale:
        ratio = width / height
        height = int(scale_resolution / math.sqrt(ratio))
        width = int(height * ratio)
    return _ensure_divide(width, patch_size), _ensure_divide(height, patch_size)


def _refine_size(
    size: tuple[int, int], cols: int, rows: int, scale_resolution: int, patch_size: int
) -> tuple[int, int]:
    """Returns (width, height) of the image the slices are cut from: a (cols x rows) grid of equal cells."""
    width, height = size
    cell_width = _ensure_divide(width, cols) / cols
    cell_height = _ensure_divide(height, rows) / rows
    cell = _best_resize((cell_width, cell_height), scale_resolution, patch_size, allow_upscale=True)
    return cell[0] * cols, cell[1] * rows


def choose_grid(width: int, height: int, multiple: int, max_slice_nums: int) -> tuple[int, int]:
    """Returns the (rows, cols) slice grid whose aspect is closest (in log) to the image's; first minimum wins."""
    counts = [n for n in (multiple - 1, multiple, multiple + 1) if n != 1 and n <= max_slice_nums]
    log_ratio = math.log(width / height)
    best: tuple[int, int] | None = None
    best_error = float("inf")
    for n in counts:
        for cols in range(1, n + 1):  # the official loop enumerates (cols, rows) with cols ascending
            if n % cols:
                continue
            rows = n // cols
            error = abs(log_ratio - math.log(cols / rows))
            if error < best_error:
                best, best_error = (rows, cols), error
    if best is None:
        raise ValueError(f"no slice grid for multiple={multiple}, max_slice_nums={max_slice_nums}")
    return best


def _read_json(path: Path) -> dict:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(config).__name__}")
    return config


def _settings_from_preprocessor_config(path: Path) -> dict[str, object]:
    """Returns the processor's arguments from a checkpoint's preprocessor_config.json."""
    config = _read_json(path)
    for key, expected in _TOKEN_FIELDS.items():
        if key in config and config[key] != expected:
            raise ValueError(
                f"{path}: {key} must be {expected!r} (the checkpoint's token), got {config[key]!r}"
            )
    kwargs: dict[str, object] = {}
    for key, arg in (
        ("scale_resolution", "scale_resolution"),
        ("patch_size", "patch_size"),
        ("max_slice_nums", "max_slice_nums"),
        ("image_feature_size", "query_num"),
        ("slice_mode", "slice_mode"),
    ):
        if key in config:
            kwargs[arg] = config[key]
    for key in ("norm_mean", "norm_std"):
        if key in config:
            kwargs[key] = tuple(config[key])
    return kwargs


def _settings_from_model_config(folder: Path) -> dict[str, object]:
    """Returns the processor's arguments from config.json, for folders without preprocessor_config.json.

    Older downloads of MiniCPM-V-2 lack that file; config.json holds the same slicing settings (its
    query_num is the preprocessor's image_feature_size), and the normalisation is the fixed 0.5/0.5.
    """
    path = folder / MODEL_CONFIG
    if not path.is_file():
        raise FileNotFoundError(
            f"{folder / PREPROCESSOR_CONFIG} is missing, and so is {MODEL_CONFIG}: expected a MiniCPM-V-2 "
            "checkpoint folder"
        )
    config = _read_json(path)
    kwargs = {key: config[key] for key in _MODEL_CONFIG_KEYS if key in config}
    log.info(
        "%s has no %s: image slicing settings read from %s (%s)",
        folder,
        PREPROCESSOR_CONFIG,
        MODEL_CONFIG,
        ", ".join(f"{k}={v}" for k, v in kwargs.items()) or "none there: the defaults",
    )
    return kwargs


class MiniCPMVImageProcessor:
    """Turns a PIL image into MiniCPM-V-2's normalised source image and slices, plus its placeholder ids."""

    def __init__(
        self,
        scale_resolution: int = 448,
        patch_size: int = 14,
        max_slice_nums: int = 9,
        slice_mode: bool = True,
        query_num: int = 64,
        norm_mean: tuple[float, float, float] = (0.5, 0.5, 0.5),
        norm_std: tuple[float, float, float] = (0.5, 0.5, 0.5),
    ):
        for name, value in (
            ("scale_resolution", scale_resolution),
            ("patch_size", patch_size),
            ("max_slice_nums", max_slice_nums),
            ("query_num", query_num),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"MiniCPMVImageProcessor: {name} must be a positive integer, got {value!r}")
        if len(norm_mean) != 3 or len(norm_std) != 3 or any(s == 0 for s in norm_std):
            raise ValueError(
                f"MiniCPMVImageProcessor: norm_mean and norm_std need 3 values each (std non-zero), "
                f"got {norm_mean!r} and {norm_std!r}"
            )
        self.scale_resolution = scale_resolution
        self.patch_size = patch_size
        self.max_slice_nums = max_slice_nums
        self.slice_mode = bool(slice_mode)
        self.query_num = query_num
        self.norm_mean = tuple(float(x) for x in norm_mean)
        self.norm_std = tuple(float(x) for x in norm_std)

    @classmethod
    def from_pretrained(cls, folder: str | Path, **overrides: object) -> MiniCPMVImageProcessor:
        """Returns the processor of ``folder`` (its preprocessor_config.json, else the slicing settings in its
        config.json), with ``overrides`` applied."""
        path = Path(folder) / PREPROCESSOR_CONFIG
        if not path.is_file():
            kwargs = _settings_from_model_config(Path(folder))
            path = Path(folder) / MODEL_CONFIG
        else:
            kwargs = _settings_from_preprocessor_config(path)
        accepted = {"scale_resolution", "patch_size", "max_slice_nums", "slice_mode", "query_num"}
        accepted |= {"norm_mean", "norm_std"}
        unknown = sorted(set(overrides) - accepted)
        if unknown:
            raise TypeError(
                f"MiniCPMVImageProcessor.from_pretrained: unknown override(s) {unknown}; "
                f"accepted: {sorted(accepted)}"
            )
        kwargs.update(overrides)
        try:
            return cls(**kwargs)  # type: ignore[arg-type]
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from e

    def to_config(self) -> dict[str, object]:
        """Returns preprocessor_config.json's content in the checkpoint's format (plus slice_mode)."""
        return {
            "image_processor_type": "MiniCPMVImageProcessor",
            "auto_map": {
                "AutoProcessor": "processing_minicpmv.MiniCPMVProcessor",
                "AutoImageProcessor": "image_processing_minicpmv.MiniCPMVImageProcessor",
            },
            "processor_class": "MiniCPMVProcessor",
            "max_slice_nums": self.max_slice_nums,
            "scale_resolution": self.scale_resolution,
            "patch_size": self.patch_size,
            "image_feature_size": self.query_num,
            **_TOKEN_FIELDS,
            "norm_mean": list(self.norm_mean),
            "norm_std": list(self.norm_std),
            "slice_mode": self.slice_mode,
        }

    def save_pretrained(self, folder: str | Path) -> None:
        """Returns nothing; writes ``folder``/preprocessor_config.json atomically."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_json(folder / PREPROCESSOR_CONFIG, self.to_config())

    def slice_image(self, image: Image.Image) -> tuple[Image.Image, list[list[Image.Image]] | None]:
        """Returns the resized source image and the slices as rows of crops (None when not sliced)."""
        width, height = image.size
        if width < 1 or height < 1:
            raise ValueError(f"image has an empty size {image.size}")
        ratio = width * height / (self.scale_resolution * self.scale_resolution)
        multiple = min(math.ceil(ratio), self.max_slice_nums)
        if multiple <= 1 or not self.slice_mode:
            size = _best_resize((width, height), self.scale_resolution, self.patch_size, allow_upscale=True)
            return image.resize(size, Image.Resampling.BICUBIC), None

        source_size = _best_resize((width, height), self.scale_resolution, self.patch_size)
        source = image.resize(source_size, Image.Resampling.BICUBIC)
        rows, cols = choose_grid(width, height, multiple, self.max_slice_nums)
        refine = image.resize(
            _refine_size((width, height), cols, rows, self.scale_resolution, self.patch_size),
            Image.Resampling.BICUBIC,
        )
        cell_width, cell_height = refine.width // cols, refine.height // rows
        slices = [
            [
                refine.crop((c * cell_width, r * cell_height, (c + 1) * cell_width, (r + 1) * cell_height))
                for c in range(cols)
            ]
            for r in range(rows)
        ]
        return source, slices

    def to_tensor(self, image: Image.Image) -> torch.Tensor:
        """Returns the float32 [3, H, W] tensor of an RGB image scaled to [0, 1] then normalised."""
        # numpy for the arithmetic: torch's per-op overhead dominates on images this small (same values as
        # torchvision's to_tensor + normalize, which compute in float32 too).
        pixels = np.asarray(image, dtype=np.float32) / 255.0
        pixels = (pixels - np.asarray(self.norm_mean, dtype=np.float32)) / np.asarray(
            self.norm_std, dtype=np.float32
        )
        return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))

    def placeholder_ids(self, tokenizer: PlaceholderTokenizer, grid: tuple[int, int] | None) -> list[int]:
        """Returns the ids standing for one image: the source placeholder, then the slice grid's if sliced."""
        single = [tokenizer.im_start_id] + [tokenizer.unk_id] * self.query_num + [tokenizer.im_end_id]
        ids = list(single)
        if grid is not None:
            rows, cols = grid
            ids.append(tokenizer.slice_start_id)
            for r in range(rows):
                if r:
                    ids.extend(tokenizer.newline_ids)
                ids.extend(single * cols)
            ids.append(tokenizer.slice_end_id)
        return ids

    def __call__(self, image: Image.Image, tokenizer: PlaceholderTokenizer) -> ProcessedImage:
        """Returns the pixel tensors, slice grid and placeholder ids of ``image`` (any PIL mode)."""
        if image.mode != "RGB":
            image = image.convert("RGB")
        source, slices = self.slice_image(image)
        crops = [source] + [crop for row in slices or [] for crop in row]
        grid = (len(slices), len(slices[0])) if slices else None
        return ProcessedImage(
            pixel_values=[self.to_tensor(crop) for crop in crops],
            grid=grid,
            placeholder_ids=self.placeholder_ids(tokenizer, grid),
        )
