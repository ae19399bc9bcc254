"""Crash-safe file output: a reader never sees a half-written file or folder under its final name."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _json_default(obj: Any) -> Any:
    """Return a JSON-encodable stand-in for paths, numpy/torch scalars and arrays, and sets."""
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    # numpy and torch scalars/arrays both offer tolist(); item() alone would drop arrays
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"cannot write a {type(obj).__name__} as JSON: {obj!r}")


def _fsync_dir(path: Path) -> None:
    """Flush a directory entry so a rename inside it survives a power cut (best effort off POSIX)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def current_umask() -> int:
    """Return the process's umask (read from /proc on Linux, where reading it does not change it)."""
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)  # elsewhere: set and restore (momentarily process-wide)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """Return the mode a new file gets from a plain open(): 0666 less the umask."""
    return 0o666 & ~current_umask()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Return the path after writing `data` to it through a same-folder temp file and os.replace.

    The file gets the mode a plain open() would give it (0666 less the umask), not the temp file's 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, file_mode())
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Return the path after atomically writing `text` to it."""
    return atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> Path:
    """Return the path after atomically writing `obj` as UTF-8 JSON (paths and numpy/torch values allowed)."""
    text = json.dumps(obj, indent=indent, ensure_ascii=False, default=_json_default)
    return atomic_write_text(path, text + "\n")


def append_jsonl(path: str | os.PathLike, obj: Any) -> None:
    """Append `obj` as one JSON line; a single write call so concurrent readers see whole lines."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(obj, ensure_ascii=False, default=_json_default) + "\n"
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(line)
        handle.flush()


def _fsync_tree(root: Path) -> None:
    """Flush every file and folder under `root` to disk before it is renamed into place."""
    for folder, _, files in os.walk(root):
        for name in files:
            file_path = Path(folder) / name
            if file_path.is_symlink():
                continue
            with contextlib.suppress(OSError), open(file_path, "rb") as handle:
                os.fsync(handle.fileno())
        _fsync_dir(Path(folder))


@contextlib.contextmanager
def atomic_dir(final_path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a `.tmp-<name>` sibling to fill; on success it is renamed to `final_path`, on error removed.

    With overwrite=True an existing `final_path` is replaced (the old folder is moved aside first and
    deleted only after the new one is in place); otherwise an existing `final_path` is an error.
    """
    final_path = Path(final_path)
    parent = final_path.parent
    parent.mkdir(parents=True, exist_ok=True)
    if final_path.exists() and not overwrite:
        raise FileExistsError(f"{final_path} already exists; remove it or pass overwrite=True")
    tmp = parent / f".tmp-{final_path.name}"
    if tmp.exists():
        # left over from a crashed earlier attempt: never seen under the final name, safe to discard
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
        old = None
        if final_path.exists():
            old = parent / f".old-{final_path.name}"
            if old.exists():
                shutil.rmtree(old)
            os.replace(final_path, old)
        os.replace(tmp, final_path)
        _fsync_dir(parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
