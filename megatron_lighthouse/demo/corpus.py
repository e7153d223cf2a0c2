"""The embedded default corpus: the Python standard library's own source and text files, as bytes."""

from __future__ import annotations

import logging
import os
import pathlib
import sysconfig
import zlib
from typing import Iterator, Optional, Tuple

import torch

logger = logging.getLogger(__name__)

_SUFFIXES = (".py", ".txt", ".rst")
#: Directories skipped *inside* the corpus root (a root that itself lies under site-packages is still read).
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "idlelib", "test", "tests"}


def default_corpus_dir() -> pathlib.Path:
    """The standard library directory of this Python (ships with every install)."""
    return pathlib.Path(sysconfig.get_paths()["stdlib"])


def _text_files(directory: pathlib.Path) -> Iterator[pathlib.Path]:
    """The text files under ``directory`` in sorted path order (the order of ``sorted(directory.rglob("*"))``),
    skipping :data:`_SKIP_DIRS` and not following links to directories; lazily, so a small ``max_bytes`` reads few
    directories."""
    try:
        with os.scandir(directory) as it:
            entries = sorted(it, key=lambda e: e.name)
    except PermissionError:
        return
    for entry in entries:
        if entry.is_dir() and not entry.is_symlink():
            if entry.name not in _SKIP_DIRS:
                yield from _text_files(directory / entry.name)
        elif os.path.splitext(entry.name)[1] in _SUFFIXES and entry.is_file():
            yield directory / entry.name


def _as_tensor(data: bytearray) -> torch.Tensor:
    """1-D uint8 tensor owning a copy of ``data``."""
    if not data:
        return torch.empty(0, dtype=torch.uint8)
    return torch.frombuffer(data, dtype=torch.uint8).clone()  # a bytearray is writable: no read-only warning


def load_corpus(path: Optional[str] = None, max_bytes: int = 8 << 20,
                val_fraction: float = 0.1) -> Tuple[torch.Tensor, torch.Tensor]:
    """Read text files under ``path`` (default: the standard library) into byte tensors.

    Files are taken in sorted order until ``max_bytes``; a file goes to validation when the CRC32 of its
    relative path falls in the ``val_fraction`` bucket, so the split is deterministic and file-disjoint.
    Returns ``(train, val)``, 1-D uint8 tensors.
    """
    root = pathlib.Path(path) if path else default_corpus_dir()
    if not root.exists():
        raise ValueError(f"--corpus {root}: no such file or directory")
    files = iter([root]) if root.is_file() else _text_files(root)
    train, val, total = bytearray(), bytearray(), 0
    found = False
    for f in files:
        found = True
        data = f.read_bytes()
        rel = f.name if root.is_file() else str(f.relative_to(root))
        bucket = val if (zlib.crc32(rel.encode()) % 1000) < val_fraction * 1000 else train
        bucket += data
        total += len(data)
        if total >= max_bytes:
            break
    if not found:
        raise ValueError(f"--corpus {root}: no {'/'.join(_SUFFIXES)} files found")
    if total == 0:
        raise ValueError(f"--corpus {root}: empty (0 bytes" + ("" if root.is_file() else f" in its "
                         f"{'/'.join(_SUFFIXES)} files") + "); give a text file or a directory of them")
    if root.is_file() or not val:  # one file: split its tail off instead
        cut = int(len(train) * (1 - val_fraction))
        train, val = train[:cut], train[cut:] + val
    logger.info("corpus %s: %d train bytes, %d validation bytes", root, len(train), len(val))
    return _as_tensor(train), _as_tensor(val)
