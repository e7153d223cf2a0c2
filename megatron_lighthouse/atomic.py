"""Atomic file writes: the dense checkpoint of :mod:`megatron_lighthouse.export` and every file the demo writes
(checkpoint, metrics, dense model, plot) go through :func:`write_atomic`, so an interrupted or failed write leaves
the previous file whole."""

from __future__ import annotations

import os
import pathlib
import uuid
from typing import BinaryIO, Callable, Union


def write_atomic(path: Union[str, os.PathLike], write: Callable[[BinaryIO], None]) -> pathlib.Path:
    """Write ``path`` by calling ``write(f)`` on a temporary file in the same directory, then flush and fsync it and
    rename it over ``path`` (``os.replace``, atomic on POSIX and Windows).

    Readers see the old file or the whole new one, never a part. When ``write`` (or the flush) raises, the temporary
    file is removed, ``path`` is left as it was and the exception propagates. The new file has the permissions of
    any file the process creates (``0o666`` less the umask). Returns ``path`` as a :class:`pathlib.Path`.
    """
    path = pathlib.Path(path)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:12]}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
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
