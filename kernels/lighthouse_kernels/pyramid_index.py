"""Pyramid positions <-> (level, entry) inside kernels, and the inverse map pyramid entry -> subsequence row.

The concatenated pyramid of a sequence of ``N`` tokens puts level ``l`` (entries of ``p**l`` tokens) at offset
``sum_{m<l} N / p**m``. The inverse map ``[B*H, N_tot]`` int32 holds, for every pyramid entry, the subsequence
row that selected it, or ``-1``; it turns every scatter of this package into a deterministic gather.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def entry_of(pos, seq_len, P: tl.constexpr, LEVELS: tl.constexpr):
    """Split pyramid positions ``pos`` into ``(local entry, span p**level)`` (both int tensors like ``pos``)."""
    local = pos
    span = pos * 0 + 1
    offset = 0
    width = seq_len
    for _ in tl.static_range(1, LEVELS):
        offset += width
        width = width // P
        above = pos >= offset
        local = tl.where(above, pos - offset, local)
        span = tl.where(above, span * P, span)
    return local, span


def inverse_map(indices: torch.Tensor, total: int) -> torch.Tensor:
    """``indices`` ``[B, H, S]`` (unique per row) -> int32 ``[B*H, total]``: the row selecting each entry, else -1."""
    b, h, s = indices.shape
    inv = torch.full((b * h, total), -1, dtype=torch.int32, device=indices.device)
    rows = torch.arange(s, dtype=torch.int32, device=indices.device).expand(b * h, s)
    return inv.scatter_(1, indices.reshape(b * h, s).long(), rows)
