"""Atomic file writes: every file the demo writes (checkpoint, metrics, dense model, plot) goes through
:func:`write_atomic`, so an interrupted or failed write leaves the previous file whole."""

from __future__ import annotations

import os
import pathlib
import tempfile
from typing import BinaryIO, Callable, Union


def write_atomic(path: Union[str, os.PathLike], write: Callable[[BinaryIO], None]) -> pathlib.Path:
    """Write ``path`` by calling ``write(f)`` on a temporary file in the same directory, then flush and fsync it and
    rename it over ``path`` (``os.replace``, atomic on POSIX and Windows).

    Readers see the old file or the whole new one, never a part. When ``write`` (or the flush) raises, the temporary
    file is removed, ``path`` is left as it was and the exception propagates. Returns ``path`` as a
    :class:`pathlib.Path`.
    """
    path = pathlib.Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # KeyboardInterrupt too: never leave the temporary file behind
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_directory(path.parent)
    return path


def _fsync_directory(directory: pathlib.Path) -> None:
    """Make the rename itself durable (best effort: not every platform can open a directory)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
