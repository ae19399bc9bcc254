"""Hugging Face datasets as a row source: parquet or arrow files, a `save_to_disk` folder, or a hub id.

    python -m pipeline dataset=hf dataset.path=my_set/                    # save_to_disk folder (or data files)
    python -m pipeline dataset=hf dataset.path=train.parquet 'dataset.columns={question: query, answer: response}'
    python -m pipeline dataset=hf dataset.path=org/name dataset.split=train dataset.trust_hub=true

Every form becomes Arrow files that `datasets` memory-maps: the folder's own, the file itself (.arrow), or
the Arrow copy `datasets.load_dataset` writes into its cache (parquet files, a folder of data files, a hub
id). Rows are read from the text columns a batch at a time, in any row format of pipeline.data.formats
(after `columns` renames them). An image column (`datasets.Image`: bytes, or a path; one or a list; or plain
path strings) becomes image references: a path stays a path, embedded bytes become an `arrow:` reference
(pipeline.data.arrow_images) that is read and decoded only when its sample is built, in a DataLoader worker.
A "videos" column (path or URL strings, a list per row or one per row; `columns` may map another name to it)
gives each row's videos. Origins name the split and the row index: `train.parquet:train[17]`.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.data.arrow_images import EmbeddedImage, open_arrow_table
from pipeline.data.formats import COLUMN_TARGETS, check_columns, rename_columns
from pipeline.data.rows import DatasetError, Problem, Row
from pipeline.data.validate import record_to_row

log = logging.getLogger(__name__)

HF_KEYS = ("path", "split", "subset", "columns", "trust_hub", "cache_dir")
FILE_SUFFIXES = (".parquet", ".arrow")
# what a missing path ending so was meant to be: a data file (reported as not found), never a hub id
DATA_FILE_SUFFIXES = (*FILE_SUFFIXES, ".json", ".jsonl", ".csv", ".tsv", ".txt")
# a save_to_disk folder holds one of these; any other folder is read as data files by datasets.load_dataset
SAVED_MARKERS = ("dataset_dict.json", "state.json")
IMAGE_COLUMNS = ("images", "image")  # looked for, in this order, when `columns` maps none to "images"
BATCH_ROWS = 1024


@dataclass(frozen=True)
class ArrowSplit:
    """One split's rows as Arrow files, in row order: what origins call it and where relative paths resolve."""

    label: str  # the path or hub id, as origins show it
    split: str
    files: tuple[Path, ...]
    base_dir: Path


def is_hf_file(path: Path) -> bool:
    """Returns whether a data file is one this module reads (parquet or arrow) rather than JSON lines."""
    return path.suffix.lower() in FILE_SUFFIXES


def offline_help(path: str) -> str:
    """Returns the error for a hub id with downloads off: how to download it and where to point the path."""
    return (
        f"dataset.path={path!r} is not a local file or folder and downloads are off. Download it on a machine "
        f"with network (`hf download {path} --repo-type dataset --local-dir <folder>`), then set "
        "dataset.path=<folder>; or set dataset.trust_hub=true to download it with datasets.load_dataset"
    )


def _looks_like_hub_id(path: str) -> bool:
    return path.count("/") == 1 and not path.startswith((".", "/", "~"))


def _paths(value: object) -> list[str]:
    if value is None or value == "" or value == []:
        raise DatasetError(
            "dataset source 'hf' needs 'path': .parquet/.arrow files, a save_to_disk folder, a folder of "
            "data files, or a hub id"
        )
    return [str(value)] if isinstance(value, str | os.PathLike) else [str(item) for item in value]


def check_hf(cfg: Mapping) -> None:
    """Returns None when the hf source's path, split and columns can be read as configured (no row read)."""
    try:
        check_columns(cfg.get("columns"))
    except ValueError as exc:
        raise DatasetError(f"dataset source 'hf': {exc}") from None
    split = cfg.get("split") or "train"
    if not isinstance(split, str):
        raise DatasetError(f"dataset source 'hf': split={split!r} must be a split name such as train")
    paths = _paths(cfg.get("path"))
    if len(paths) > 1:
        _local_files([Path(p).expanduser() for p in paths])
        return
    local = Path(paths[0]).expanduser()
    if local.is_dir():
        return
    if local.exists() or local.suffix.lower() in DATA_FILE_SUFFIXES:
        _local_files([local])
    elif not _looks_like_hub_id(paths[0]):
        raise DatasetError(f"{local}: not found (the 'hf' source's 'path')")
    elif not cfg.get("trust_hub"):
        raise DatasetError(offline_help(paths[0]))


def _local_files(paths: list[Path]) -> list[Path]:
    for path in paths:
        if not is_hf_file(path):
            raise DatasetError(
                f"{path}: unsupported data file type '{path.suffix}' for the 'hf' source; use .parquet or "
                ".arrow files, a folder, or a hub id"
            )
        if not path.is_file():
            raise DatasetError(f"{path}: data file not found")
    kinds = {path.suffix.lower() for path in paths}
    if len(kinds) > 1:
        raise DatasetError(f"{', '.join(map(str, paths))}: give either .parquet or .arrow files, not both")
    return paths


def open_split(cfg: Mapping) -> ArrowSplit:
    """Returns the Arrow files of the configured split (converting parquet or downloading through `datasets`
    where needed); raises DatasetError naming the path, the split and what to do."""
    check_hf(cfg)
    paths = _paths(cfg.get("path"))
    split = str(cfg.get("split") or "train")
    cache_dir = str(Path(str(cfg["cache_dir"])).expanduser()) if cfg.get("cache_dir") else None
    local = Path(paths[0]).expanduser()
    if len(paths) > 1 or local.is_file():
        return data_files_split([Path(p).expanduser() for p in paths], split, cache_dir)
    import datasets  # heavy: imported when a Hugging Face dataset is read

    subset = cfg.get("subset") or None
    try:
        if local.is_dir() and any((local / marker).is_file() for marker in SAVED_MARKERS):
            saved = datasets.load_from_disk(str(local))
            if isinstance(saved, datasets.DatasetDict):
                saved = _pick_split(saved, split, str(local))
            return _as_split(saved, str(local), split, local)
        label = str(local) if local.is_dir() else paths[0]
        dataset = datasets.load_dataset(
            str(local) if local.is_dir() else paths[0], subset, split=split, cache_dir=cache_dir
        )
    except DatasetError:
        raise
    except Exception as exc:  # datasets reports a missing split, config or file through many types
        where = f"dataset.path={paths[0]}" + (f" (subset {subset})" if subset else "")
        raise DatasetError(f"{where}, split {split!r}: {type(exc).__name__}: {exc}") from exc
    return _as_split(dataset, label, split, local if local.is_dir() else Path.cwd())


def data_files_split(paths: Sequence[Path], split: str = "train", cache_dir: str | None = None) -> ArrowSplit:
    """Returns .arrow files as they are, or .parquet files as the Arrow copy datasets makes of them (once:
    it is cached by the files' identity)."""
    paths = _local_files(list(paths))
    cache_dir = str(Path(cache_dir).expanduser()) if cache_dir else None
    label = str(paths[0]) if len(paths) == 1 else f"{paths[0].parent}/[{len(paths)} files]"
    base_dir = paths[0].parent.resolve()
    if paths[0].suffix.lower() == ".arrow":
        return ArrowSplit(label, split, tuple(path.resolve() for path in paths), base_dir)
    import datasets

    try:
        dataset = datasets.load_dataset(
            "parquet", data_files=[str(p) for p in paths], split="train", cache_dir=cache_dir
        )
    except Exception as exc:
        raise DatasetError(f"{label}: cannot read the parquet file(s) ({type(exc).__name__}: {exc})") from exc
    return _as_split(dataset, label, split, base_dir)


def _pick_split(saved: Any, split: str, label: str) -> Any:
    if split not in saved:
        raise DatasetError(f"{label}: no split {split!r}; it has {', '.join(saved)} (set dataset.split)")
    return saved[split]


def _as_split(dataset: Any, label: str, split: str, base_dir: Path) -> ArrowSplit:
    """Returns the memory-mapped Arrow files behind a datasets.Dataset, in row order."""
    if dataset._indices is not None:  # a select/shuffle view: write its rows out in order once
        dataset = dataset.flatten_indices()
    files = tuple(Path(entry["filename"]).resolve() for entry in dataset.cache_files)
    rows = sum(open_arrow_table(str(file)).num_rows for file in files)
    if not files or rows != len(dataset):
        raise DatasetError(
            f"{label}: split {split!r} is not backed by Arrow files on disk ({len(files)} file(s), {rows} of "
            f"its {len(dataset)} rows); save it with Dataset.save_to_disk and point dataset.path at the folder"
        )
    return ArrowSplit(label, split, files, base_dir.resolve())


def load_hf(cfg: Mapping, max_rows: int | None) -> tuple[list[Row], list[Problem]]:
    """Returns rows and problems of the configured Hugging Face dataset split (see the module docstring)."""
    columns = check_columns(cfg.get("columns"))
    return read_split(open_split(cfg), columns, max_rows)


def read_split(
    split: ArrowSplit, columns: Mapping[str, str] | None = None, max_records: int | None = None
) -> tuple[list[Row], list[Problem]]:
    """Returns the rows of a split (at most max_records records read) and the problems of the others."""
    rows: list[Row] = []
    problems: list[Problem] = []
    for index, record in _records(split, dict(columns or {}), max_records):
        origin = f"{split.label}:{split.split}[{index}]"
        parsed = record_to_row(record, origin, split.base_dir)
        if isinstance(parsed, Row):
            rows.append(parsed)
        else:
            problems += [Problem(origin, reason) for reason in parsed]
    return rows, problems


def _records(
    split: ArrowSplit, columns: dict[str, str], max_records: int | None
) -> Iterator[tuple[int, dict]]:
    """Yields (row index in the split, record with renamed keys and image references) a batch at a time."""
    index = 0
    ignored: Counter[str] = Counter()
    for file in split.files:
        table = open_arrow_table(str(file))
        image_column = _image_column(table.schema.names, columns)
        text_columns = [
            name
            for name in table.schema.names
            if name != image_column and columns.get(name, name) in COLUMN_TARGETS
        ]
        ignored.update(n for n in table.schema.names if n != image_column and n not in text_columns)
        file_row = 0  # the batch's first row in this file, where its images are
        for batch in table.select(text_columns).to_batches(max_chunksize=BATCH_ROWS):
            column = table.column(image_column).slice(file_row, batch.num_rows) if image_column else None
            images = _image_refs(column, file, file_row, image_column) if column is not None else None
            file_row += batch.num_rows
            for k, values in enumerate(batch.to_pylist()):
                if max_records is not None and index >= max_records:
                    _warn_ignored(split, ignored)
                    return
                renamed = rename_columns(values, columns)
                record = {key: value for key, value in renamed.items() if value is not None}
                if images is not None and images[k] is not None:
                    record["images"] = images[k]
                if isinstance(record.get("videos"), str):  # a column of one video path per row
                    record["videos"] = [record["videos"]]
                yield index, record
                index += 1
    _warn_ignored(split, ignored)


def _warn_ignored(split: ArrowSplit, ignored: Counter[str]) -> None:
    if ignored:
        log.warning(
            "%s: ignoring column(s) %s (no row format reads them; map them with dataset.columns)",
            split.label,
            ", ".join(sorted(ignored)),
        )


def _image_column(names: Sequence[str], columns: Mapping[str, str]) -> str | None:
    """Returns the column holding the images: the one `columns` maps to "images", else "images" or "image"."""
    mapped = [source for source, target in columns.items() if target == "images" and source in names]
    if mapped:
        return mapped[0]
    return next((name for name in IMAGE_COLUMNS if name in names and name not in columns), None)


def _image_refs(array: Any, file: Path, start: int, column: str) -> list[list[str] | None]:
    """Returns each row's image references: embedded bytes as `arrow:` references (nothing is decoded or
    copied), a path or URL as it is (relative paths resolve against the data's folder later)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    array = array.combine_chunks() if isinstance(array, pa.ChunkedArray) else array
    kind = array.type
    if _is_image_struct(kind):
        cells = _struct_refs(array, file, start, column, None)
        return [None if cell is None else [cell] if cell else [] for cell in cells]
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return [None if value is None else [value] for value in array.to_pylist()]
    if (pa.types.is_list(kind) or pa.types.is_large_list(kind)) and _is_image_struct(kind.value_type):
        lengths = pc.fill_null(array.value_lengths(), 0).to_pylist()
        flat = array.flatten()
        out: list[list[str] | None] = []
        offset = 0
        for k, n in enumerate(lengths):
            cells = _struct_refs(flat.slice(offset, n), file, start + k, column, 0)
            out.append([cell for cell in cells if cell])
            offset += n
        return [None if not array[k].is_valid else refs for k, refs in enumerate(out)]
    if (pa.types.is_list(kind) or pa.types.is_large_list(kind)) and pa.types.is_string(kind.value_type):
        return [None if value is None else [v for v in value if v] for value in array.to_pylist()]
    raise DatasetError(
        f"{file}: column {column!r} of type {kind} holds no images; an image column is a datasets.Image "
        "feature (or a list of them) or path strings"
    )


def _is_image_struct(kind: Any) -> bool:
    import pyarrow as pa

    return pa.types.is_struct(kind) and {kind.field(i).name for i in range(kind.num_fields)} >= {
        "bytes",
        "path",
    }


def _struct_refs(array: Any, file: Path, row: int, column: str, first_item: int | None) -> list[str | None]:
    """Returns one reference per image struct: an `arrow:` one when it holds bytes, else its path (None for a
    null cell, "" for a cell with neither). `first_item` None: one cell per row from `row` on; else the
    items of row `row`'s list, numbered from it."""
    import pyarrow.compute as pc

    has_bytes = pc.is_valid(array.field("bytes")).to_pylist()
    paths = array.field("path").to_pylist()
    valid = array.is_valid().to_pylist()
    refs: list[str | None] = []
    for k in range(len(array)):
        if not valid[k]:
            refs.append(None)
        elif has_bytes[k]:
            where = (row + k, None) if first_item is None else (row, first_item + k)
            refs.append(EmbeddedImage(str(file), where[0], column, where[1]).ref())
        else:
            refs.append(paths[k] or "")
    return refs
