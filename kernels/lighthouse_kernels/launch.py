"""Launch geometry shared by the kernels: rows of work per Triton program."""

from __future__ import annotations

import torch

#: Rows per program under the CPU interpreter (``TRITON_INTERPRET=1``), whose cost is per program and per op.
INTERPRETER_ROWS = 512


def rows_per_program(device: torch.device, cuda_rows: int) -> int:
    """``cuda_rows`` (the size tuned on GPUs) for CUDA tensors, else :data:`INTERPRETER_ROWS` (never fewer)."""
    return cuda_rows if device.type == "cuda" else max(cuda_rows, INTERPRETER_ROWS)
