"""One writer per run folder: an advisory lock held for as long as a run writes into the folder."""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

LOCK_FILE = ".lock"


class FolderBusy(RuntimeError):
    """Another process holds the folder's lock; the message names the folder and that process."""


def _holder(fd: int) -> str:
    """Return what the holder wrote into the lock file ("pid N on host since T"), or a plain fallback."""
    with contextlib.suppress(OSError):
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 512).decode("utf-8", "replace").strip()
        if text:
            return text
    return "pid unknown"


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, what: str = "folder") -> Iterator[Path]:
    """Yield the lock file after taking an exclusive lock on `folder`; raise FolderBusy if it is held.

    The lock (flock on `folder/.lock`) is released when the block ends or the process dies, however it
    dies, so a folder is never left locked by a killed run. The lock file itself stays: removing it would
    let two later processes lock two different files.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FolderBusy(
                f"{what} {folder} is in use by another process ({_holder(fd)}); wait for it to finish, "
                f"or write into another folder (hydra.run.dir=...)"
            ) from None
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime())
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {since}\n".encode(), 0)
        yield path
    finally:
        os.close(fd)  # releases the lock
