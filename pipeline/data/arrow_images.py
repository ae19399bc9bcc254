"""Images embedded in Arrow files (Hugging Face datasets), referred to by a string and read on demand.

A row's image is a string everywhere (pipeline.data.rows.Row.images). An image whose bytes live in a cell of
an Arrow file, as `datasets` writes them (an `Image` feature: a struct of `bytes` and `path`, alone or in a
list), is referred to as

    arrow:/abs/path/data-00000-of-00001.arrow#row=17&column=image&item=0

(`item` only for a list column). The file is memory-mapped once per process and only that cell's bytes are
read when the image is loaded, in the DataLoader worker that builds the sample: the data set's images are
never all in memory, however large it is.
"""

from __future__ import annotations

import functools
import os
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pyarrow as pa

PREFIX = "arrow:"


class EmbeddedImageError(OSError):
    """An embedded image reference cannot be read; the message names the file, row and column."""


@dataclass(frozen=True)
class EmbeddedImage:
    """Where one embedded image is: the Arrow file, the row in that file, the column and the list item."""

    path: str
    row: int
    column: str
    item: int | None = None

    def ref(self) -> str:
        """Returns the reference string of this image (see the module docstring)."""
        query = {"row": self.row, "column": self.column}
        if self.item is not None:
            query["item"] = self.item
        return f"{PREFIX}{self.path}#{urllib.parse.urlencode(query)}"


def is_embedded(ref: str) -> bool:
    """Returns whether an image reference names an image embedded in an Arrow file."""
    return ref.startswith(PREFIX)


def parse_ref(ref: str) -> EmbeddedImage:
    """Returns the location an embedded reference names; raises EmbeddedImageError for a malformed one."""
    path, _, fragment = ref[len(PREFIX) :].rpartition("#")
    fields = dict(urllib.parse.parse_qsl(fragment))
    try:
        item = fields.get("item")
        return EmbeddedImage(path, int(fields["row"]), fields["column"], None if item is None else int(item))
    except (KeyError, ValueError):
        raise EmbeddedImageError(
            f"{ref}: not an embedded image reference (arrow:FILE#row=N&column=C)"
        ) from None


def file_of(ref: str) -> Path:
    """Returns the Arrow file an embedded reference reads from."""
    return Path(parse_ref(ref).path)


@functools.lru_cache(maxsize=64)
def open_arrow_table(path: str) -> pa.Table:
    """Returns the table of an Arrow file, memory-mapped (no copy: pages are read when touched).

    Reads both the stream format `datasets` writes and the random-access file format. Cached per process, so
    a DataLoader worker maps each file once.
    """
    import pyarrow as pa  # installed with datasets; imported here so other sources do not pay for it

    source = pa.memory_map(os.fspath(path))
    try:
        return pa.ipc.open_stream(source).read_all()
    except pa.ArrowInvalid:
        source.seek(0)
        return pa.ipc.open_file(source).read_all()


def arrow_file_columns(path: Path) -> list[str]:
    """Returns the column names of an Arrow file (its schema; no row is read)."""
    return list(open_arrow_table(os.fspath(path)).schema.names)


def read_embedded(ref: str) -> tuple[bytes | None, str | None]:
    """Returns (bytes, path) of the image cell a reference names; raises EmbeddedImageError naming the ref."""
    where = parse_ref(ref)
    if not Path(where.path).is_file():
        raise EmbeddedImageError(f"{ref}: the Arrow file {where.path} is gone")
    try:
        table = open_arrow_table(where.path)
    except Exception as exc:  # pyarrow reports a damaged file through several exception types
        raise EmbeddedImageError(f"{ref}: cannot read the Arrow file ({type(exc).__name__}: {exc})") from exc
    if where.column not in table.schema.names or not 0 <= where.row < table.num_rows:
        raise EmbeddedImageError(f"{ref}: no such row or column in {where.path} ({table.num_rows} rows)")
    cell = table.column(where.column).slice(where.row, 1).to_pylist()[0]
    if where.item is not None:
        cell = cell[where.item] if isinstance(cell, list) and where.item < len(cell) else None
    if not isinstance(cell, dict):
        raise EmbeddedImageError(f"{ref}: the cell holds no image")
    return cell.get("bytes"), cell.get("path")
