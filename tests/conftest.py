"""Shared fixtures: golden vectors from the published reference code."""

from __future__ import annotations

import os
import pathlib
from typing import Iterable, List, Optional

import pytest
import torch

# Without a GPU, Triton kernels run under the interpreter (must be set before triton is imported).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

#: The published reference's vectors, cases a-f, cp2 and cp4: ``../shared/golden`` beside the checkout (the
#: project's shared folder; a clone of this repository alone does not have it, and their tests then skip).
SHARED_GOLDEN_DIR = pathlib.Path(__file__).resolve().parents[2] / "shared" / "golden"
#: Why the shared set's tests skip when it is absent.
NO_SHARED_GOLDENS = (f"the published reference's golden vectors are not here ({SHARED_GOLDEN_DIR} is the project's "
                     f"shared folder, beside the checkout); the independent set in tests/data checks the same code")
#: An independent set computed with the published reference code on new seeds and settings (cases ``ind_*``;
#: how: docs/CORRECTNESS.md). Checked with the shared set unless ``LIGHTHOUSE_GOLDEN_DIR`` is set.
INDEPENDENT_GOLDEN_DIR = pathlib.Path(__file__).resolve().parent / "data"
#: ``LIGHTHOUSE_GOLDEN_DIR`` points the suite at another set of reference vectors of the same format instead (any
#: case names and settings; the chunked cases run through the distributed path when ``chunks`` is 4 or 8).
GOLDEN_DIR = pathlib.Path(os.environ.get("LIGHTHOUSE_GOLDEN_DIR", SHARED_GOLDEN_DIR))


def _load_goldens(directory: pathlib.Path) -> dict:
    cases = {}
    for path in sorted(directory.glob("reference_*.pt")):
        cases.update(torch.load(path))
    return cases


if GOLDEN_DIR == SHARED_GOLDEN_DIR:
    SHARED_GOLDENS = _load_goldens(SHARED_GOLDEN_DIR) if SHARED_GOLDEN_DIR.is_dir() else {}
    GOLDENS = {**SHARED_GOLDENS, **_load_goldens(INDEPENDENT_GOLDEN_DIR)}
else:
    SHARED_GOLDENS, GOLDENS = {}, _load_goldens(GOLDEN_DIR)


def golden_names(shared: Iterable[str], max_tokens: int, chunks: Optional[Iterable[int]] = None) -> List[str]:
    """Golden cases a test runs: ``shared`` of the shared set, and every other case (the independent set, or
    another directory's) with at most ``max_tokens`` of ``B * H * N`` (and ``chunks`` among ``chunks`` if given)."""
    others = [name for name, rec in sorted(GOLDENS.items()) if name not in SHARED_GOLDENS
              and rec["config"]["B"] * rec["config"]["H"] * rec["config"]["N"] <= max_tokens
              and (chunks is None or rec["config"]["chunks"] in tuple(chunks))]
    return [name for name in shared if name in SHARED_GOLDENS] + others


@pytest.fixture(scope="session")
def goldens() -> dict:
    if not GOLDENS:
        pytest.fail(f"no golden vectors found under {GOLDEN_DIR}")
    return GOLDENS


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative L2 error of ``a`` against reference ``b``."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()
