"""Dataset sources by name (custom files, Hugging Face datasets, COCO captions, the bundled demo) and mixing
several of them."""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import logging
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from pipeline.data.arrow_images import arrow_file_columns, open_arrow_table
from pipeline.data.formats import check_columns, rename_columns
from pipeline.data.hf_source import HF_KEYS, check_hf, data_files_split, is_hf_file, load_hf, read_split
from pipeline.data.images import DATA_CACHE_DIR, ImageLoadError, fetch_url_to_cache
from pipeline.data.rows import DatasetError, Problem, Row, is_url
from pipeline.data.split import stable_order
from pipeline.data.validate import (
    apply_on_error,
    check_images,
    check_on_error,
    check_videos,
    describe_unknown_keys,
    image_count_problems,
    record_to_row,
    unknown_keys,
    video_count_problems,
)
from pipeline.families.base import VideoLimits
from pipeline.utils.io import atomic_write_bytes

log = logging.getLogger(__name__)

# Keys every source understands: image checking and, inside a mixture, how many rows to take.
COMMON_KEYS = ("name", "check_images", "max_rows", "n", "ratio")

# A loader returns the rows it could build and the problems of records that never became rows.
Loader = Callable[[Mapping, "int | None"], tuple[list[Row], list[Problem]]]


@dataclass(frozen=True)
class Source:
    """A registered dataset source: its name, its loader and the config keys it reads."""

    name: str
    load: Loader
    keys: tuple[str, ...]
    check: Callable[[Mapping], None] | None = None  # raises DatasetError for a config it cannot read


_SOURCES: dict[str, Source] = {}


def register_source(
    name: str, keys: Sequence[str] = (), check: Callable[[Mapping], None] | None = None
) -> Callable[[Loader], Loader]:
    """Return a decorator registering a loader under name; a second registration of a name is an error.

    ``check`` (optional) looks at a source config without reading rows, so a bad path fails before any work.
    """

    def decorator(load: Loader) -> Loader:
        if name in _SOURCES:
            raise ValueError(
                f"dataset source '{name}' is already registered by {_SOURCES[name].load.__module__}"
            )
        _SOURCES[name] = Source(name, load, tuple(keys), check)
        return load

    return decorator


def source_names() -> tuple[str, ...]:
    """Return the registered source names, sorted."""
    return tuple(sorted(_SOURCES))


def get_source(name: object) -> Source:
    """Return the registered source called name, or raise naming the known ones."""
    if name not in _SOURCES:
        raise DatasetError(f"unknown dataset source {name!r}; known sources: {', '.join(source_names())}")
    return _SOURCES[name]


def check_source(source_cfg: Mapping) -> None:
    """Return None when the source config can be read (its own check, if any); raise DatasetError otherwise."""
    source = get_source(source_cfg.get("name"))
    if source.check is not None:
        source.check(source_cfg)


def load_rows(
    source_cfg: Mapping,
    *,
    on_error: str = "raise",
    max_rows: int | None = None,
    image_limit: tuple[int, str] | None = None,
    video_limit: VideoLimits | None = None,
    max_video_seconds: float | None = None,
) -> tuple[list[Row], list[Problem]]:
    """Return the usable rows of one source and the problems found (raise DatasetError on_error="raise").

    Structure and images are checked here; token lengths need the tokenizer and are checked by the caller
    with ``validate.validate_rows(..., count_tokens=...)``. ``max_rows`` (or the config's ``max_rows``) caps
    the records read, so a quick run does not parse or check a whole large source. ``image_limit`` is
    (images per conversation, the model's name) of the family that will read the rows (None: unchecked);
    ``video_limit`` what it takes of videos (None: unchecked), and ``max_video_seconds`` the longest video.
    """
    check_on_error(on_error)
    if not isinstance(source_cfg, Mapping) or "name" not in source_cfg:
        raise DatasetError(
            f"a dataset source needs a 'name' (one of {', '.join(source_names())}); got {source_cfg!r}"
        )
    source = get_source(source_cfg["name"])
    max_rows = max_rows if max_rows is not None else source_cfg.get("max_rows")
    rows, problems = source.load(source_cfg, max_rows)
    # every image, local or URL, in one pass; URLs land in the cache that the datasets read later
    found = check_images(rows) if source_cfg.get("check_images", True) else []
    if image_limit is not None:
        found += image_count_problems(rows, *image_limit)
    if video_limit is not None:
        found += video_count_problems(rows, video_limit)
    refused = {index for index, _ in found}
    with_videos = [index for index, row in enumerate(rows) if row.videos and index not in refused]
    if with_videos and source_cfg.get("check_images", True):
        found += [
            (with_videos[position], problem)
            for position, problem in check_videos(
                [rows[i] for i in with_videos], max_seconds=max_video_seconds, limits=video_limit
            )
        ]
    kept, problems = apply_on_error(rows, found, on_error, earlier=problems)
    if not kept:
        where = f" at {source_cfg.get('path')}" if source_cfg.get("path") else ""
        raise DatasetError(
            f"dataset source '{source.name}'{where} has no usable rows ({len(problems)} problem(s))"
        )
    return kept, problems


def _custom_files(cfg: Mapping) -> tuple[list[Path], dict[str, str]]:
    paths = _as_paths(cfg.get("path"), key="path", source="custom")
    try:
        columns = check_columns(cfg.get("columns"))
    except ValueError as exc:
        raise DatasetError(f"dataset source 'custom': {exc}") from None
    return paths, columns


def check_custom(cfg: Mapping) -> None:
    """Return None when the custom source's files exist and its columns mapping is valid."""
    _custom_files(cfg)


@register_source("custom", keys=("path", "columns", "cache_dir"), check=check_custom)
def load_custom(cfg: Mapping, max_rows: int | None) -> tuple[list[Row], list[Problem]]:
    """Return rows and problems from the .jsonl/.json (or .parquet/.arrow) files given by the config's ``path``.

    Records may be in any format of pipeline.data.formats; ``columns`` renames their keys first. Parquet and
    arrow files are read as the 'hf' source reads them (their split is named "train").
    """
    paths, columns = _custom_files(cfg)
    rows: list[Row] = []
    problems: list[Problem] = []
    for path in paths:
        # a record with several problems is one record: count origins, not problems
        budget = None if max_rows is None else max_rows - len(rows) - len({p.origin for p in problems})
        if budget is not None and budget <= 0:
            break
        if is_hf_file(path):
            split = data_files_split([path], cache_dir=cfg.get("cache_dir"))
            file_rows, file_problems = read_split(split, columns, budget)
        else:
            file_rows, file_problems = read_custom_file(path, max_records=budget, columns=columns)
        rows += file_rows
        problems += file_problems
    return rows, problems


def _as_paths(value: object, *, key: str, source: str) -> list[Path]:
    if value is None or value == "" or value == []:
        raise DatasetError(
            f"dataset source '{source}' needs '{key}': a .jsonl, .json, .parquet or .arrow file, or a list of them"
        )
    values = [value] if isinstance(value, str | os.PathLike) else list(value)
    paths = [Path(str(item)).expanduser() for item in values]
    for path in paths:
        if path.is_dir():
            raise DatasetError(
                f"{path}: a folder; read a save_to_disk folder or a folder of data files with dataset=hf"
            )
        if path.suffix.lower() not in (".jsonl", ".json") and not is_hf_file(path):
            raise DatasetError(
                f"{path}: unsupported data file type '{path.suffix}'; use .jsonl, .json, .parquet or .arrow"
            )
        if not path.is_file():
            raise DatasetError(f"{path}: data file not found (from the '{source}' source's '{key}')")
    return paths


def read_custom_file(
    path: Path, *, max_records: int | None = None, columns: Mapping[str, str] | None = None
) -> tuple[list[Row], list[Problem]]:
    """Return rows and problems of one .jsonl (origin file:line) or .json list (origin file:item N) file.

    A UTF-8 byte order mark at the start of the file is skipped. ``columns`` renames each record's keys.
    """
    path = Path(path)
    records = _jsonl_records(path) if path.suffix.lower() == ".jsonl" else _json_records(path)
    rows: list[Row] = []
    problems: list[Problem] = []
    ignored: Counter[str] = Counter()
    base_dir = path.parent.resolve()
    for count, (origin, record) in enumerate(records):
        if max_records is not None and count >= max_records:
            break
        if isinstance(record, Problem):
            problems.append(record)
            continue
        record = rename_columns(record, columns or {})
        ignored.update(unknown_keys(record))
        parsed = record_to_row(record, origin, base_dir)
        if isinstance(parsed, Row):
            rows.append(parsed)
        else:
            problems += [Problem(origin, reason) for reason in parsed]
    if ignored:
        log.warning("%s: ignoring unknown keys %s", path, describe_unknown_keys(ignored))
    return rows, problems


def _jsonl_records(path: Path):
    with path.open(encoding="utf-8-sig") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue  # blank lines (often a trailing one) are not rows
            try:
                yield f"{path}:{number}", json.loads(line)
            except json.JSONDecodeError as exc:
                yield (
                    f"{path}:{number}",
                    Problem(f"{path}:{number}", f"invalid JSON: {exc.msg} (column {exc.colno})"),
                )


def _json_records(path: Path):
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as exc:
        yield (
            f"{path}:{exc.lineno}",
            Problem(f"{path}:{exc.lineno}", f"invalid JSON: {exc.msg} (column {exc.colno})"),
        )
        return
    if not isinstance(data, list):
        yield f"{path}:1", Problem(f"{path}:1", "a .json data file must hold a list of row objects")
        return
    for number, record in enumerate(data, start=1):
        yield f"{path}:item {number}", record


register_source("hf", keys=HF_KEYS, check=check_hf)(load_hf)


@register_source("demo", keys=("path", "num_rows"))
def load_demo(cfg: Mapping, max_rows: int | None) -> tuple[list[Row], list[Problem]]:
    """Return the bundled demo rows, generating the demo set first when it is missing or incomplete."""
    from pipeline.data.demo import DEFAULT_DEMO_DIR, DEFAULT_ROWS, ensure_demo  # drawing code: load on use

    folder = ensure_demo(
        Path(cfg.get("path") or DEFAULT_DEMO_DIR), n=int(cfg.get("num_rows") or DEFAULT_ROWS)
    )
    return read_custom_file(folder / "train.jsonl", max_records=max_rows)


@register_source("demo_pairs", keys=("path", "num_rows"))
def load_demo_pairs(cfg: Mapping, max_rows: int | None) -> tuple[list[Row], list[Problem]]:
    """Return the bundled preference pairs (data/README.md), generating them first when missing or incomplete."""
    from pipeline.data.demo import DEFAULT_PAIRS_DIR, DEFAULT_ROWS, ensure_demo_pairs  # drawing code: on use

    folder = ensure_demo_pairs(
        Path(cfg.get("path") or DEFAULT_PAIRS_DIR), n=int(cfg.get("num_rows") or DEFAULT_ROWS)
    )
    return read_custom_file(folder / "train.jsonl", max_records=max_rows)


def load_mixture(
    sources: Sequence[Mapping],
    seed: int,
    *,
    on_error: str = "raise",
    max_rows: int | None = None,
    defaults: Mapping | None = None,
    image_limit: tuple[int, str] | None = None,
    video_limit: VideoLimits | None = None,
    max_video_seconds: float | None = None,
) -> tuple[list[Row], list[Problem]]:
    """Return the rows of several sources concatenated, each sampled by its ``n`` or ``ratio``; and problems.

    Like ``swift sft --dataset a b#500``: ``n`` takes that many rows (repeating the source, said in a log
    line, only when n exceeds what it has), ``ratio`` a fraction of it; neither takes all. The sampling of
    source i depends only on (seed, i), so the result is the same on every run and machine. ``defaults``
    fills keys a source entry leaves out (e.g. the dataset's image_root).
    """
    if not sources:
        raise DatasetError("the dataset 'sources' list is empty; give at least one {name: ...} entry")
    rows: list[Row] = []
    problems: list[Problem] = []
    for index, entry in enumerate(sources):
        cfg = with_defaults(entry, defaults, index)
        source_rows, source_problems = load_rows(
            cfg,
            on_error=on_error,
            max_rows=max_rows,
            image_limit=image_limit,
            video_limit=video_limit,
            max_video_seconds=max_video_seconds,
        )
        label = f"sources[{index}]"
        taken = sample_rows(source_rows, n=cfg.get("n"), ratio=cfg.get("ratio"), seed=seed, label=label)
        how = next((f"{key}: {cfg[key]}" for key in ("n", "ratio") if cfg.get(key) is not None), None)
        if how is None:
            log.info("dataset %s: %d rows", cfg["name"], len(taken))
        else:
            log.info("dataset %s: %d rows (%s of its %d)", cfg["name"], len(taken), how, len(source_rows))
        rows += taken
        problems += source_problems
    return rows, problems


def with_defaults(entry: Mapping, defaults: Mapping | None, index: int) -> dict:
    """Return the config of source entry `index` with `defaults` filled in; raises naming unknown keys."""
    if not isinstance(entry, Mapping) or "name" not in entry:
        raise DatasetError(f"sources[{index}] must be a mapping with a 'name'; got {entry!r}")
    source = get_source(entry["name"])
    accepted = set(COMMON_KEYS) | set(source.keys)
    unknown = sorted(key for key, value in entry.items() if key not in accepted and value is not None)
    if unknown:
        raise DatasetError(
            f"sources[{index}] ({source.name}): unknown key(s) {', '.join(unknown)}; "
            f"accepted: {', '.join(sorted(accepted))}"
        )
    merged = {
        key: value for key, value in (defaults or {}).items() if key in source.keys and value is not None
    }
    merged.update({key: value for key, value in entry.items() if value is not None})
    return merged


def sample_rows(
    rows: list[Row], *, n: int | None, ratio: float | None, seed: int, label: str = "source"
) -> list[Row]:
    """Return n (or round(ratio * len)) rows chosen by (seed, label), kept in order; all rows if neither."""
    if n is not None and ratio is not None:
        raise DatasetError(f"{label}: give either 'n' or 'ratio', not both")
    if ratio is not None:
        if not ratio > 0:
            raise DatasetError(f"{label}: ratio={ratio} must be a positive fraction (e.g. 0.5)")
        n = max(1, round(float(ratio) * len(rows)))
    if n is None:
        return list(rows)
    if isinstance(n, bool) or int(n) != n or n < 1:
        raise DatasetError(f"{label}: n={n!r} must be a positive integer")
    n = int(n)
    copies, rest = divmod(n, len(rows))
    if copies:
        log.info(
            "%s: n=%d is more than its %d rows; sampling with replacement (%d full copies + %d rows)",
            label,
            n,
            len(rows),
            copies,
            rest,
        )
    picked = sorted(stable_order(len(rows), "sample", seed, label)[:rest])
    return list(rows) * copies + [rows[i] for i in picked]


# --- coco_en_2_mini: ms-swift's coco-en-2-mini (COCO 2014 caption validation split) from local files ---

COCO_QUERY = "please describe the image."
COCO_KEYS = ("path", "image_root", "allow_download", "cache_dir", "timeout")
_COCO_CSV_COLUMNS = {"uniq_id", "image_id", "caption", "image"}
# the columns each layout's reader takes its captions and images from
_COCO_COLUMNS = {"csv": ("caption", "image"), "arrow": ("caption", "image"), "parquet": ("image", "answer")}
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")


@dataclass
class CocoRecord:
    """One raw COCO row: its captions text, and its image as a URL/file name and/or embedded bytes."""

    index: int
    captions: list[str]
    image_ref: str | None
    image_bytes: bytes | None


def coco_help(reason: str) -> str:
    """Return the error text for a missing COCO dataset: what to download and which config key to set."""
    return (
        f"coco_en_2_mini: {reason}.\n"
        "It reads local files only; provide one of:\n"
        "  (a) ModelScope 'modelscope/coco_2014_caption' (subset coco_2014_caption, split validation):\n"
        "      load it once with MsDataset.load('modelscope/coco_2014_caption',\n"
        "      subset_name='coco_2014_caption', split='validation') and set the source's 'path' to the\n"
        "      cache folder (~/.cache/modelscope/hub/datasets, holding coco_2014_caption-validation.arrow\n"
        "      or the CSVs).\n"
        "      Its image URLs no longer answer, so also download the COCO val2014 images\n"
        "      (http://images.cocodataset.org/zips/val2014.zip) and set 'image_root' to the unzipped one;\n"
        "  (b) Hugging Face 'lmms-lab/COCO-Caption' (split val, images embedded):\n"
        "      hf download lmms-lab/COCO-Caption --repo-type dataset --include '*val-*' --local-dir DIR\n"
        "      and set 'path' to DIR.\n"
        "  e.g. python -m pipeline dataset=coco_en_2_mini dataset.path=DIR dataset.image_root=COCO_DIR"
    )


def check_coco(cfg: Mapping) -> None:
    """Return None when the COCO source's path is set and holds its files (none is read)."""
    if not cfg.get("path"):
        raise DatasetError(coco_help("'path' is not set"))
    check_coco_columns(*find_coco_files(Path(str(cfg["path"])).expanduser()))


@register_source("coco_en_2_mini", keys=COCO_KEYS, check=check_coco)
def load_coco(cfg: Mapping, max_rows: int | None) -> tuple[list[Row], list[Problem]]:
    """Return COCO 2014 caption validation rows (ms-swift's coco-en-2-mini) from local files; and problems."""
    if not cfg.get("path"):
        raise DatasetError(coco_help("'path' is not set"))
    layout, files = find_coco_files(Path(str(cfg["path"])).expanduser())
    check_coco_columns(layout, files)
    log.info("coco_en_2_mini: reading %s layout from %s", layout, ", ".join(map(str, files[:3])))
    split = "val" if layout == "parquet" else "validation"
    records = _COCO_READERS[layout](files)
    if max_rows is not None:
        records = itertools.islice(records, max_rows)
    return _coco_rows(records, cfg, split)


def find_coco_files(path: Path) -> tuple[str, list[Path]]:
    """Return the layout ("arrow", "csv" or "parquet") and the validation-split files found at path."""
    if not path.exists():
        raise DatasetError(coco_help(f"path {path} does not exist"))
    if path.is_file():
        layout = {".arrow": "arrow", ".csv": "csv", ".parquet": "parquet"}.get(path.suffix.lower())
        if layout is None:
            raise DatasetError(coco_help(f"{path} is not a .arrow, .csv or .parquet file"))
        return layout, [path]
    arrow = sorted(path.rglob("coco_2014_caption-validation*.arrow"))
    if arrow:
        return "arrow", _one_folder(arrow, "arrow")
    csvs = [p for p in sorted(path.rglob("*.csv")) if _csv_columns(p) >= _COCO_CSV_COLUMNS]
    val_csvs = [p for p in csvs if "val" in p.name.lower()] or [
        p for p in csvs if "train" not in p.name.lower() and _first_caption_joined(p)
    ]
    if val_csvs:
        if len(val_csvs) > 1:
            log.warning("coco_en_2_mini: several validation CSVs under %s; using %s", path, val_csvs[0])
        return "csv", val_csvs[:1]
    parquet = [p for p in sorted(path.rglob("*.parquet")) if p.name.lower().startswith("val")]
    if parquet:
        return "parquet", _one_folder(parquet, "parquet")
    found = "only the train split's CSV" if csvs else "no COCO caption files"
    raise DatasetError(coco_help(f"{found} under {path}"))


def check_coco_columns(layout: str, files: list[Path]) -> None:
    """Returns None when every file has the columns its layout's reader takes captions and images from;
    raises DatasetError naming the file, the columns expected and the ones found (a file of another data set
    would otherwise give one "empty caption" problem per row). Reads the header or schema only."""
    expected = _COCO_COLUMNS[layout]
    for file in files:
        found = _coco_file_columns(layout, file)
        missing = [column for column in expected if column not in found]
        if missing:
            raise DatasetError(
                f"coco_en_2_mini: {file} is not a COCO caption {layout} file: it has no "
                f"{', '.join(map(repr, missing))} column (expected {', '.join(map(repr, expected))}; found "
                f"{', '.join(map(repr, found)) or 'none'}). Point dataset.path (the source's 'path') at the "
                "COCO caption files, or read your own data with dataset=custom and dataset.columns mapping "
                "its columns"
            )


def _coco_file_columns(layout: str, file: Path) -> list[str]:
    """Returns the column names of a CSV header, an arrow file's schema or a parquet file's schema."""
    if layout == "csv":
        with file.open(encoding="utf-8-sig", newline="") as handle:
            return next(csv.reader(handle), [])
    if layout == "parquet":
        import pyarrow.parquet as pq

        return list(pq.ParquetFile(file).schema_arrow.names)
    return arrow_file_columns(file)


def _one_folder(files: list[Path], kind: str) -> list[Path]:
    # Several cache versions may coexist; mixing them would duplicate rows.
    folders = sorted({file.parent for file in files})
    if len(folders) > 1:
        log.warning("coco_en_2_mini: %s files in several folders; using %s", kind, folders[0])
    return [file for file in files if file.parent == folders[0]]


def _csv_columns(path: Path) -> set[str]:
    with path.open(encoding="utf-8-sig", newline="") as handle:
        return set(next(csv.reader(handle), []))


def _first_caption_joined(path: Path) -> bool:
    # The validation split has one row per image with its captions joined by "&&"; train has one per caption.
    with path.open(encoding="utf-8-sig", newline="") as handle:
        first = next(csv.DictReader(handle), None)
    return bool(first) and "&&" in (first.get("caption") or "")


def _split_captions(text: object) -> list[str]:
    return [part.strip() for part in str(text or "").split("&&") if part.strip()]


def _image_field(value: object) -> tuple[str | None, bytes | None]:
    # The image column is a URL string in the CSVs and {bytes, path} in arrow/parquet files.
    if isinstance(value, Mapping):
        return value.get("path") or None, value.get("bytes") or None
    return (str(value) if value else None), None


def _read_coco_csv(files: list[Path]) -> Iterator[CocoRecord]:
    index = 0
    for file in files:
        with file.open(encoding="utf-8-sig", newline="") as handle:
            for record in csv.DictReader(handle):
                yield CocoRecord(
                    index, _split_captions(record.get("caption")), record.get("image") or None, None
                )
                index += 1


def _read_coco_arrow(files: list[Path]) -> Iterator[CocoRecord]:
    index = 0
    for file in files:
        for batch in open_arrow_table(str(file)).select(["caption", "image"]).to_batches(max_chunksize=64):
            for record in batch.to_pylist():
                ref, data = _image_field(record.get("image"))
                yield CocoRecord(index, _split_captions(record.get("caption")), ref, data)
                index += 1


def _read_coco_parquet(files: list[Path]) -> Iterator[CocoRecord]:
    import pyarrow.parquet as pq

    index = 0
    for file in files:
        # Batches keep memory flat: the shards embed every image.
        for batch in pq.ParquetFile(file).iter_batches(
            batch_size=64, columns=["image", "question_id", "answer"]
        ):
            for record in batch.to_pylist():
                ref, data = _image_field(record.get("image"))
                answers = record.get("answer") or []
                captions = [str(a).strip() for a in ([answers] if isinstance(answers, str) else answers)]
                yield CocoRecord(index, [c for c in captions if c], record.get("question_id") or ref, data)
                index += 1


_COCO_READERS: dict[str, Callable[[list[Path]], Iterator[CocoRecord]]] = {
    "csv": _read_coco_csv,
    "arrow": _read_coco_arrow,
    "parquet": _read_coco_parquet,
}


def _coco_rows(records: Iterable[CocoRecord], cfg: Mapping, split: str) -> tuple[list[Row], list[Problem]]:
    image_root = Path(str(cfg["image_root"])).expanduser() if cfg.get("image_root") else None
    if image_root is not None and not image_root.is_dir():
        raise DatasetError(
            f"coco_en_2_mini: image_root {image_root} is not a folder; point it at the folder "
            "holding COCO val2014 images (or its parent)"
        )
    cache_dir = Path(str(cfg.get("cache_dir") or DATA_CACHE_DIR / "coco_en_2_mini")).expanduser()
    allow_download = bool(cfg.get("allow_download", False))
    rows: list[Row] = []
    problems: list[Problem] = []
    downloads: list[tuple[Row, str]] = []
    for record in records:
        origin = f"coco:{split}:{record.index}"
        if not record.captions:
            problems.append(Problem(origin, "empty caption"))
            continue
        row = Row(COCO_QUERY, record.captions[0], [], [], None, origin, references=record.captions)
        if record.image_bytes:
            row.images = [str(_cache_embedded(record, cache_dir))]
        elif record.image_ref and (local := _find_local(record.image_ref, image_root)):
            row.images = [str(local)]
        elif record.image_ref and is_url(record.image_ref) and allow_download:
            downloads.append((row, record.image_ref))
        elif image_root is None and not allow_download:
            raise DatasetError(coco_help(f"{origin} has no embedded image and 'image_root' is not set"))
        else:
            looked = " and ".join(str(p) for p in _local_candidates(record.image_ref or "", image_root))
            problems.append(
                Problem(
                    origin,
                    f"image {_file_name(record.image_ref or '')!r} not found (looked in "
                    f"{looked or 'no folder'}); set image_root or allow_download: true",
                )
            )
            continue
        rows.append(row)
    rows, download_problems = _download_images(
        rows, downloads, cache_dir / "urls", float(cfg.get("timeout") or 10)
    )
    return rows, problems + download_problems


def _file_name(ref: str) -> str:
    return ref.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]


def _local_candidates(ref: str, image_root: Path | None) -> list[Path]:
    if image_root is None or not _file_name(ref):
        return []
    name = _file_name(ref)
    return [image_root / name, image_root / "val2014" / name]


def _find_local(ref: str, image_root: Path | None) -> Path | None:
    return next((p for p in _local_candidates(ref, image_root) if p.is_file()), None)


def _cache_embedded(record: CocoRecord, cache_dir: Path) -> Path:
    """Return the cached file for an embedded image, writing it once (atomically) on first sight."""
    name = _file_name(record.image_ref or "")
    if not _SAFE_NAME.match(name):
        name = hashlib.sha256(record.image_bytes).hexdigest()[:32] + ".jpg"
    path = cache_dir / "images" / name
    if not (path.is_file() and path.stat().st_size == len(record.image_bytes)):
        atomic_write_bytes(path, record.image_bytes)
    return path


def _download_images(
    rows: list[Row], downloads: list[tuple[Row, str]], cache_dir: Path, timeout: float
) -> tuple[list[Row], list[Problem]]:
    if not downloads:
        return rows, []

    def fetch(url: str) -> Path | str:
        try:
            return fetch_url_to_cache(url, cache_dir, timeout=timeout)
        except ImageLoadError as exc:
            return str(exc)

    with ThreadPoolExecutor(max_workers=8) as pool:
        outcomes = list(pool.map(fetch, [url for _, url in downloads]))
    failed = set()
    problems = []
    for (row, _url), outcome in zip(downloads, outcomes, strict=True):
        if isinstance(outcome, Path):
            row.images = [str(outcome)]
        else:
            failed.add(id(row))
            problems.append(
                Problem(row.origin, f"image not found under image_root and download failed: {outcome}")
            )
    return [row for row in rows if id(row) not in failed], problems
