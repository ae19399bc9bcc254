"""MiniCPM-V-2's rows -> encoded samples, lazily: images are decoded, sliced and tokenized in DataLoader
workers; rows are counted (image tokens included) from the image header alone."""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch.utils.data import Dataset

from pipeline.families.base import ImageSource, RowLike

from .collate import Sample, encode_example
from .processor import MiniCPMVImageProcessor, choose_grid
from .template import render_conversation, truncate
from .tokenizer import MiniCPMVTokenizer


def slice_grid_for_size(processor: MiniCPMVImageProcessor, width: int, height: int) -> tuple[int, int] | None:
    """Returns the slice grid (rows, cols) the processor will choose for an image size, None if unsliced."""
    multiple = min(math.ceil(width * height / processor.scale_resolution**2), processor.max_slice_nums)
    if multiple <= 1 or not processor.slice_mode:
        return None
    return choose_grid(width, height, multiple, processor.max_slice_nums)


class TokenCounter:
    """Counts a row's tokens after tokenization, image tokens included, reading only the image header.

    Returns the kept length under the truncation policy, or the full length (over max_length) when the row
    cannot be kept.
    """

    def __init__(
        self,
        tokenizer: MiniCPMVTokenizer,
        processor: MiniCPMVImageProcessor,
        max_length: int,
        truncation: str,
        images: ImageSource,
        last_round: bool = False,
    ) -> None:
        self.images = images
        self.last_round = last_round  # labels on the final answer alone: a cut must leave it a token
        self.tokenizer = tokenizer
        self.processor = processor
        self.max_length = max_length
        self.truncation = truncation

    def __call__(self, row: RowLike) -> int | None:
        placeholder = None
        if row.images:
            # a URL is read from the cache the up-front image check filled
            size = self.images.size(row.images[0])
            if size is not None:
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
            last_round=self.last_round,
        )
        kept = truncate(enc, self.max_length, self.truncation)
        return len(enc.input_ids) if kept is None else len(kept.input_ids)


class SFTDataset(Dataset):
    """Encodes rows on access (in worker processes when the DataLoader has workers)."""

    def __init__(
        self,
        rows: Sequence[RowLike],
        tokenizer: MiniCPMVTokenizer,
        processor: MiniCPMVImageProcessor,
        max_length: int,
        truncation: str,
        images: ImageSource,
        with_response: bool = True,
        last_round: bool = False,
    ) -> None:
        self.rows = list(rows)
        self.last_round = last_round  # labels on each row's final response alone
        self.tokenizer = tokenizer
        self.processor = processor
        self.max_length = max_length
        self.truncation = truncation
        self.images = images
        self.with_response = with_response

    def __len__(self) -> int:
        return len(self.rows)

    def token_counts(self) -> list[int]:
        """Returns every row's encoded length (counted by validation, else now from the image header)."""
        counter = TokenCounter(
            self.tokenizer, self.processor, self.max_length, self.truncation, self.images, self.last_round
        )
        counts = []
        for row in self.rows:
            count = row.num_tokens if row.num_tokens is not None else counter(row)
            counts.append(min(count, self.max_length) if count is not None else self.max_length)
        return counts

    def __getitem__(self, index: int) -> Sample:
        row = self.rows[index]
        try:
            image = self.images.load(row.images[0]) if row.images else None
        except OSError as exc:  # the image changed or vanished since it was checked
            raise type(exc)(f"{row.origin}: {exc}") from exc
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
            last_round=self.last_round,
        )
        if sample is None:
            # Validation removed every row that cannot be kept, so this means the file changed since.
            raise ValueError(
                f"{row.origin}: does not fit max_length {self.max_length} under '{self.truncation}'"
            )
        return sample
