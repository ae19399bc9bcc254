"""The conversation row every dataset source produces, and the problem records validation emits."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Row:
    """One training conversation in ms-swift's custom layout, after parsing and path resolution."""

    query: str
    response: str
    history: list[tuple[str, str]]
    images: list[str]  # absolute local paths or http(s) URLs, as many as the family takes
    system: str | None
    origin: str  # "path/to/file.jsonl:17" (1-based line), "coco:validation:3", ... used in every message
    references: list[str] | None = None  # every reference answer when a source has several (COCO captions)
    num_tokens: int | None = None  # encoded length, image tokens included; set by validation
    # the vision tower's patches, where validation encoded the row to count its tokens: the token budget
    # reads them instead of encoding the row a second time
    num_patches: int | None = None
    # a preference pair's rejected answer (pipeline/data/pairs.py); `response` is then the chosen one, which
    # sft trains on and eval scores against
    rejected: str | None = None
    videos: list[str] = field(default_factory=list)  # absolute local paths or http(s) URLs (<video> tags)
    # binary feedback (KTO): whether `response` is a desirable answer (pipeline/data/pairs.py); None for a row
    # without a label
    label: bool | None = None


@dataclass
class Problem:
    """Why one row (named by its origin) cannot be used."""

    origin: str
    reason: str

    def __str__(self) -> str:
        return f"{self.origin}: {self.reason}"


class DatasetError(ValueError):
    """A dataset cannot be used as configured; the message says which file, row or key and why."""


def is_url(ref: str) -> bool:
    """Return True when an image reference is an http(s) URL rather than a local path."""
    return ref.startswith(("http://", "https://"))
