"""Rows -> encoded samples, lazily: images are decoded, sliced and tokenized in DataLoader workers."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from PIL import Image
from torch.utils.data import Dataset

from pipeline.data.images import ImageLoadError, load_image, local_image_file
from pipeline.data.rows import Row
from pipeline.families.minicpm_v2.collate import Sample, encode_example
from pipeline.families.minicpm_v2.processor import MiniCPMVImageProcessor, choose_grid
from pipeline.families.minicpm_v2.template import render_conversation, truncate
from pipeline.families.minicpm_v2.tokenizer import MiniCPMVTokenizer


def slice_grid_for_size(processor: MiniCPMVImageProcessor, width: int, height: int) -> tuple[int, int] | None:
    """Returns the slice grid (rows, cols) the processor will choose for an image size, None if unsliced."""
    multiple = min(math.ceil(width * height / processor.scale_resolution**2), processor.max_slice_nums)
    if multiple <= 1 or not processor.slice_mode:
        return None
    return choose_grid(width, height, multiple, processor.max_slice_nums)


class TokenCounter:
    """Counts a row's tokens after tokenization, image tokens included, reading only the image header.

    Returns None when the row cannot be kept under the truncation policy.
    """

    def __init__(
        self,
        tokenizer: MiniCPMVTokenizer,
        processor: MiniCPMVImageProcessor,
        max_length: int,
        truncation: str,
    ) -> None:
        self.tokenizer = tokenizer
        self.processor = processor
        self.max_length = max_length
        self.truncation = truncation

    def __call__(self, row: Row) -> int | None:
        placeholder = None
        if row.images:
            # a URL is read from the cache the up-front image check filled
            local = local_image_file(row.images[0])
            if local is not None:
                with Image.open(local) as img:
                    size = img.size
                placeholder = self.processor.placeholder_ids(
                    self.tokenizer, slice_grid_for_size(self.processor, *size)
                )
            else:  # not fetched yet (dataset.check_images=false): sized when it is loaded
                placeholder = self.processor.placeholder_ids(self.tokenizer, None)
        enc = render_conversation(
            self.tokenizer,
            row.query,
            row.response,
            history=row.history,
            system=row.system,
            image_placeholder=placeholder,
        )
        kept = truncate(enc, self.max_length, self.truncation)
        return None if kept is None else len(kept.input_ids)


class SFTDataset(Dataset):
    """Encodes rows on access (in worker processes when the DataLoader has workers)."""

    def __init__(
        self,
        rows: Sequence[Row],
        tokenizer: MiniCPMVTokenizer,
        processor: MiniCPMVImageProcessor,
        max_length: int,
        truncation: str = "delete",
        image_cache: Path | None = None,
        with_response: bool = True,
    ) -> None:
        self.rows = list(rows)
        self.tokenizer = tokenizer
        self.processor = processor
        self.max_length = max_length
        self.truncation = truncation
        self.image_cache = image_cache
        self.with_response = with_response

    def __len__(self) -> int:
        return len(self.rows)

    def token_counts(self) -> list[int]:
        """Returns every row's encoded length (counted by validation, else now from the image header)."""
        counter = TokenCounter(self.tokenizer, self.processor, self.max_length, self.truncation)
        counts = []
        for row in self.rows:
            count = row.num_tokens if row.num_tokens is not None else counter(row)
            counts.append(min(count, self.max_length) if count is not None else self.max_length)
        return counts

    def __getitem__(self, index: int) -> Sample:
        row = self.rows[index]
        try:
            image = load_image(row.images[0], cache_dir=self.image_cache) if row.images else None
        except ImageLoadError as exc:  # the image changed or vanished since it was checked
            raise ImageLoadError(f"{row.origin}: {exc}") from exc
        sample = encode_example(
            self.tokenizer,
            self.processor,
            row.query,
            row.response if self.with_response else None,
            history=row.history,
            system=row.system,
            image=image,
            max_length=self.max_length,
            truncation=self.truncation,
        )
        if sample is None:
            # Validation removed every row that cannot be kept, so this means the file changed since.
            raise ValueError(
                f"{row.origin}: does not fit max_length {self.max_length} under '{self.truncation}'"
            )
        return sample


class FamilyDataset(Dataset):
    """Encodes rows on access through a transformers-native family (its processor and chat template)."""

    def __init__(
        self,
        rows: Sequence[Row],
        family,
        processor,
        max_length: int,
        image_cache: Path | None = None,
        with_response: bool = True,
    ) -> None:
        self.rows = list(rows)
        self.family = family
        self.processor = processor
        self.max_length = max_length
        self.image_cache = image_cache
        self.with_response = with_response

    def __len__(self) -> int:
        return len(self.rows)

    def token_counts(self) -> list[int]:
        """Returns every row's encoded length (counted by validation, else by encoding the row now)."""
        counts = []
        for index, row in enumerate(self.rows):
            count = row.num_tokens if row.num_tokens is not None else len(self[index])
            counts.append(min(count, self.max_length))
        return counts

    def __getitem__(self, index: int):
        row = self.rows[index]
        sample = self.family.encode_row(self.processor, row, self.with_response, self.image_cache)
        if len(sample) > self.max_length:
            # Validation removed every row that does not fit, so this means the file changed since.
            raise ValueError(
                f"{row.origin}: encodes to {len(sample)} tokens, over max_length {self.max_length}"
            )
        return sample
