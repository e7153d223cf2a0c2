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

#: The published reference's vectors (``../shared/golden``), cases a-f, cp2 and cp4.
SHARED_GOLDEN_DIR = pathlib.Path(__file__).resolve().parents[2] / "shared" / "golden"
#: ``LIGHTHOUSE_GOLDEN_DIR`` points the suite at another set of reference vectors of the same format (any case
#: names and settings; the chunked cases run through the distributed path when ``chunks`` is 4 or 8).
GOLDEN_DIR = pathlib.Path(os.environ.get("LIGHTHOUSE_GOLDEN_DIR", SHARED_GOLDEN_DIR))


def _load_goldens() -> dict:
    cases = {}
    for path in sorted(GOLDEN_DIR.glob("reference_*.pt")):
        cases.update(torch.load(path))
    return cases


GOLDENS = _load_goldens()


def golden_names(shared: Iterable[str], max_tokens: int, chunks: Optional[Iterable[int]] = None) -> List[str]:
    """Golden cases a test runs: ``shared`` for the shared vectors; for another directory every case with at most
    ``max_tokens`` of ``B * H * N`` (and ``chunks`` among ``chunks`` when given)."""
    if GOLDEN_DIR == SHARED_GOLDEN_DIR:
        return list(shared)
    return [name for name, rec in sorted(GOLDENS.items())
            if rec["config"]["B"] * rec["config"]["H"] * rec["config"]["N"] <= max_tokens
            and (chunks is None or rec["config"]["chunks"] in tuple(chunks))]


@pytest.fixture(scope="session")
def goldens() -> dict:
    if not GOLDENS:
        pytest.fail(f"no golden vectors found under {GOLDEN_DIR}")
    return GOLDENS


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative L2 error of ``a`` against reference ``b``."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()
