"""Atomic file writes: a reader never sees a half-written record or checkpoint.

Write to a uniquely named temporary file in the target directory, flush + fsync, then
``os.replace`` (atomic on POSIX), then fsync the directory (so that the rename, too, outlives a
power cut). A crash leaves at worst a stray ``.tmp`` file, never a truncated target; two writers
never share a temporary file.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Iterator

import torch


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file that replaces ``path`` only if the block finishes without error."""
    if mode not in ("w", "wb"):
        raise ValueError(f"mode={mode!r}; accepted: 'w', 'wb'")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.chmod(tmp, 0o644)  # mkstemp makes it 0600: others on a shared results folder must read it
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_directory(path.parent)


def _fsync_directory(folder: Path) -> None:
    """Make a rename in ``folder`` durable where the system allows it (Windows cannot open a
    directory; some network file systems refuse to fsync one: the file itself is synced)."""
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    with atomic_open(path, "w") as handle:
        json.dump(obj, handle, indent=1, sort_keys=True, allow_nan=True)
        handle.write("\n")


def torch_save_atomic(obj: Any, path: str | os.PathLike) -> None:
    with atomic_open(path, "wb") as handle:
        torch.save(obj, handle)
