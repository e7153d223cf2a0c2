"""Pyramid geometry shared by the kernels: program prologue, level walk, positions <-> (level, entry), and the
inverse map pyramid entry -> subsequence row.

The concatenated pyramid of a sequence of ``N`` tokens puts level ``l`` (entries of ``p**l`` tokens) at offset
``sum_{m<l} N / p**m``. The inverse map ``[B*H, N_tot]`` int32 holds, for every pyramid entry, the subsequence
row that selected it, or ``-1``; it turns every scatter of this package into a deterministic gather.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def pyramid_size(seq_len: int, levels: int, pooling_factor: int) -> int:
    """Entries of the concatenated pyramid of ``seq_len`` tokens: ``sum_l seq_len / p**l``."""
    return sum(seq_len // pooling_factor**level for level in range(levels))


@triton.jit
def program_block(H, limit, D, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    """The prologue of every per-(batch, head) kernel of this package, launched on grid ``(B*H, blocks)``.

    Returns this program's row ``b*H + h``, ``b``, ``h``, its block of ``BLOCK`` positions along a dimension of
    length ``limit`` with their in-range mask, and the ``BLOCK_D`` head-dim lanes with theirs (``< D``).

    ``row``, ``b`` and ``h`` are int64 scalars (widened once per program), so every ``row * row_stride``,
    ``b * stride_b`` and ``h * stride_h`` is an int64 offset: those exceed 2**31 elements on long sequences (e.g.
    ``[B, N, H, D]`` with ``N*H*D >= 2**31``, or Megatron's ``[s, b, h, d]`` seen as ``[b, s, h, d]``). The
    positions stay int32 (they index a dimension below 2**31); kernels widen them before multiplying by a stride.

    The grid is ``(cdiv(limit, BLOCK), B*H)``: the blocks along the sequence on axis 0, which takes up to 2**31 - 1
    programs (axes 1 and 2 take 65,535: 4M tokens in blocks of 64 are 65,536).
    """
    row = tl.program_id(1).to(tl.int64)
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    d = tl.arange(0, BLOCK_D)
    return row, row // H, row % H, idx, idx < limit, d, d < D


@triton.jit
def next_level(offset, width, span, P: tl.constexpr):
    """One step up the pyramid: the next level's offset in the concatenation, its entry count and its span."""
    return offset + width, width // P, span * P


@triton.jit
def entry_of(pos, seq_len, P: tl.constexpr, LEVELS: tl.constexpr):
    """Split pyramid positions ``pos`` into ``(local entry, span p**level)`` (both int tensors like ``pos``)."""
    local = pos
    span = pos * 0 + 1
    offset = 0
    width = seq_len
    level_span = 1
    for _ in tl.static_range(1, LEVELS):
        offset, width, level_span = next_level(offset, width, level_span, P)
        above = pos >= offset
        local = tl.where(above, pos - offset, local)
        span = tl.where(above, level_span, span)
    return local, span


def inverse_map(indices: torch.Tensor, total: int) -> torch.Tensor:
    """``indices`` ``[B, H, S]`` (unique per row) -> int32 ``[B*H, total]``: the row selecting each entry, else -1."""
    b, h, s = indices.shape
    inv = torch.full((b * h, total), -1, dtype=torch.int32, device=indices.device)
    rows = torch.arange(s, dtype=torch.int32, device=indices.device).expand(b * h, s)
    return inv.scatter_(1, indices.reshape(b * h, s).long(), rows)
