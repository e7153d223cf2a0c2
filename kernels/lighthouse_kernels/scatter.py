"""Scatter of subsequence outputs to tokens (causal shift, fan-out, sum over levels) and its backward, as gathers.

Token ``t`` receives the output of level-``l`` entry ``(t+1) // p**l - 1`` when that entry was selected; the
backward of subsequence row ``j`` (entry ``i`` of level ``l``) sums ``dout`` over tokens
``[(i+1)*p**l - 1, (i+2)*p**l - 1)`` clipped to ``N``. Neither uses atomics: results are bitwise reproducible.

Offsets: ``row``/``b``/``h`` are int64 (``program_block``) and token positions are widened before they meet a
stride, so tensors of more than 2**31 elements (long sequences, strided views) are addressed correctly.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import Geometry, launch_geometry
from .pyramid_index import entry_of, next_level, program_block

#: Launch geometry (rows, warps) of each kernel on CUDA (see ``Geometry``).
SCATTER_FORWARD_GEOMETRY = Geometry(32, 4)
SCATTER_BACKWARD_GEOMETRY = Geometry(16, 8)


@triton.jit
def _scatter_fwd_kernel(sub_ptr, inv_ptr, out_ptr, seq_len, stride_inv, S, H, D,
                        sob, soh, son,
                        BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, P: tl.constexpr, LEVELS: tl.constexpr):
    row, b, h, tok, tok_ok, d, d_ok = program_block(H, seq_len, D, BLOCK_T, BLOCK_D)
    acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    inv_row = inv_ptr + row * stride_inv  # row is int64
    sub = sub_ptr + row * S * D + d[None, :]
    offset = 0
    width = seq_len
    span = 1
    for _ in tl.static_range(LEVELS):
        src = (tok + 1) // span - 1
        ok = tok_ok & (src >= 0)
        sub_row = tl.load(inv_row + offset + src, mask=ok, other=-1)
        hit = sub_row >= 0
        vals = tl.load(sub + sub_row[:, None].to(tl.int64) * D, mask=hit[:, None] & d_ok[None, :], other=0.0)
        acc += vals.to(tl.float32)
        offset, width, span = next_level(offset, width, span, P)
    out = out_ptr + b * sob + h * soh + tok[:, None].to(tl.int64) * son + d[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=tok_ok[:, None] & d_ok[None, :])


@triton.jit
def _scatter_bwd_kernel(dout_ptr, idx_ptr, dsub_ptr, seq_len, S, H, D,
                        sdb, sdn, sdh,
                        BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, P: tl.constexpr, LEVELS: tl.constexpr,
                        MAX_SPAN: tl.constexpr):
    row, b, h, j, j_ok, d, d_ok = program_block(H, S, D, BLOCK_S, BLOCK_D)
    pos = tl.load(idx_ptr + row * S + j, mask=j_ok, other=0)
    local, span = entry_of(pos, seq_len, P, LEVELS)
    first = (local + 1) * span - 1
    # Widened once: b, h are int64 and the first token's offset is computed in int64; the loop steps the pointers.
    rows = dout_ptr + b * sdb + h * sdh + first[:, None].to(tl.int64) * sdn + d[None, :]
    acc = tl.zeros((BLOCK_S, BLOCK_D), dtype=tl.float32)
    for i in range(MAX_SPAN):
        ok = j_ok & (i < span) & (first + i < seq_len)
        acc += tl.load(rows, mask=ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        rows += sdn
    dst = dsub_ptr + (row * S + j)[:, None] * D + d[None, :]  # int64, as row is
    tl.store(dst, acc.to(dsub_ptr.dtype.element_ty), mask=j_ok[:, None] & d_ok[None, :])


def scatter_forward(out_sub: torch.Tensor, inv: torch.Tensor, seq_len: int, levels: int,
                    pooling_factor: int) -> torch.Tensor:
    """``out_sub`` ``[B, H, S, D]`` (contiguous), ``inv`` from :func:`inverse_map` (last dim contiguous) ->
    ``[B, N, H, D]``, a new contiguous tensor in its dtype."""
    b, h, _, d = out_sub.shape
    out = torch.empty(b, seq_len, h, d, dtype=out_sub.dtype, device=out_sub.device)
    _launch_scatter_forward(out_sub, inv, out, levels, pooling_factor)
    return out


def _launch_scatter_forward(out_sub: torch.Tensor, inv: torch.Tensor, out: torch.Tensor, levels: int,
                            pooling_factor: int) -> None:
    """Write the tokens into ``out``: ``[B, N, H, D]`` in ``out_sub``'s dtype, last dim contiguous (any other
    strides: the offset tests write past 2**31 elements through a view)."""
    b, h, s, d = out_sub.shape
    seq_len = out.shape[1]
    if inv.stride(-1) != 1:
        inv = inv.contiguous()
    block_t, warps = launch_geometry(out_sub.device, SCATTER_FORWARD_GEOMETRY)
    grid = (triton.cdiv(seq_len, block_t), b * h)  # see program_block
    _scatter_fwd_kernel[grid](
        out_sub, inv, out, seq_len, inv.stride(0), s, h, d, out.stride(0), out.stride(2), out.stride(1),
        num_warps=warps, BLOCK_T=block_t, BLOCK_D=triton.next_power_of_2(d), P=pooling_factor, LEVELS=levels,
    )


def scatter_backward(dout: torch.Tensor, indices: torch.Tensor, levels: int, pooling_factor: int,
                     dtype: torch.dtype) -> torch.Tensor:
    """``dout`` ``[B, N, H, D]`` (last dim contiguous), ``indices`` ``[B, H, S]`` -> ``d out_sub`` ``[B, H, S, D]``."""
    b, n, h, d = dout.shape
    s = indices.shape[-1]
    dout = dout if dout.stride(-1) == 1 else dout.contiguous()
    dsub = torch.empty(b, h, s, d, dtype=dtype, device=dout.device)
    block_s, warps = launch_geometry(dout.device, SCATTER_BACKWARD_GEOMETRY)
    grid = (triton.cdiv(s, block_s), b * h)  # see program_block
    _scatter_bwd_kernel[grid](
        dout, indices, dsub, n, s, h, d, dout.stride(0), dout.stride(1), dout.stride(2), num_warps=warps,
        BLOCK_S=block_s, BLOCK_D=triton.next_power_of_2(d), P=pooling_factor, LEVELS=levels,
        MAX_SPAN=pooling_factor ** (levels - 1),
    )
    return dsub
