"""Shared fixtures: golden vectors from the published reference code."""

from __future__ import annotations

import os
import pathlib

import pytest
import torch

# Without a GPU, Triton kernels run under the interpreter (must be set before triton is imported).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

#: ``LIGHTHOUSE_GOLDEN_DIR`` points the suite at another set of reference vectors of the same format.
GOLDEN_DIR = pathlib.Path(
    os.environ.get("LIGHTHOUSE_GOLDEN_DIR", pathlib.Path(__file__).resolve().parents[2] / "shared" / "golden")
)


def _load_goldens() -> dict:
    cases = {}
    for path in sorted(GOLDEN_DIR.glob("reference_*.pt")):
        cases.update(torch.load(path))
    return cases


GOLDENS = _load_goldens()


@pytest.fixture(scope="session")
def goldens() -> dict:
    if not GOLDENS:
        pytest.fail(f"no golden vectors found under {GOLDEN_DIR}")
    return GOLDENS


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative L2 error of ``a`` against reference ``b``."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()
