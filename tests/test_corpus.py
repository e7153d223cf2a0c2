"""The demo's corpus reader: which files it takes, and the file-disjoint train/validation split."""

import pathlib
import warnings

import pytest

from megatron_lighthouse.demo.corpus import load_corpus


def _write(root: pathlib.Path, rel: str, text: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_root_under_site_packages_is_read_but_tests_inside_it_are_skipped(tmp_path):
    """The skip rule applies to directories inside the root, not to where the root itself lies."""
    root = tmp_path / "lib" / "site-packages"
    for i in range(40):
        _write(root, f"pkg/mod{i:02d}.py", f"x{i} = {i}\n")
    _write(root, "pkg/tests/test_a.py", "SKIPPED_TEST\n")
    _write(root, "pkg/__pycache__/mod.py", "SKIPPED_CACHE\n")
    _write(root, "pkg/data.bin", "SKIPPED_SUFFIX\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no read-only-buffer warning from the byte tensors either
        train, val = load_corpus(str(root), max_bytes=1 << 20)
    text = bytes(train.tolist()) + bytes(val.tolist())
    assert b"SKIPPED" not in text
    assert all(f"x{i} = {i}\n".encode() in text for i in range(40))
    assert len(text) == sum(len(f"x{i} = {i}\n") for i in range(40))


def test_split_is_file_disjoint_and_stops_at_max_bytes(tmp_path):
    for i in range(200):
        _write(tmp_path, f"m{i:03d}.py", f"<{i:03d}>" * 10 + "\n")
    train, val = load_corpus(str(tmp_path), max_bytes=51 * 120)
    tr, va = bytes(train.tolist()), bytes(val.tolist())
    assert len(tr) + len(va) == 51 * 120  # files of 51 bytes, taken until the total reaches max_bytes
    assert 0 < len(va) < len(tr)
    assert not {tr[j:j + 5] for j in range(0, len(tr), 51)} & {va[j:j + 5] for j in range(0, len(va), 51)}


def test_directory_without_text_files_is_an_error(tmp_path):
    _write(tmp_path, "a.bin", "data")
    with pytest.raises(ValueError, match="no .py/.txt/.rst files found"):
        load_corpus(str(tmp_path))
