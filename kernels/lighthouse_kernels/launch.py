"""Launch geometry shared by the kernels: rows of work and warps per Triton program."""

from __future__ import annotations

from typing import NamedTuple

import torch

#: Rows per program under the CPU interpreter (``TRITON_INTERPRET=1``), whose cost is per program and per op.
INTERPRETER_ROWS = 512


class Geometry(NamedTuple):
    """Rows of work (tokens or subsequence rows) and warps of one Triton program on a CUDA device.

    Each kernel module holds its geometry as a named constant. At those, ptxas keeps every kernel's ``[rows, D]``
    fp32 tiles in registers for ``D = 128`` on sm_90 (``tests/test_kernel_registers.py`` compiles them and fails on
    any spill); ``benchmarks/bench_kernels.py --geometries`` times the kernels at others."""

    rows: int
    warps: int


def launch_geometry(device: torch.device, cuda: Geometry) -> Geometry:
    """``cuda`` for CUDA tensors; under the interpreter, at least :data:`INTERPRETER_ROWS` rows (its warps are
    ignored there)."""
    return cuda if device.type == "cuda" else Geometry(max(cuda.rows, INTERPRETER_ROWS), cuda.warps)
