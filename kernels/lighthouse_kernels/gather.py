"""Fused gather of selected pyramid entries straight from the tokens (coarse entries pooled on the fly) and its
backward, both deterministic.

Forward: row ``j`` of the subsequence is the mean of the ``p**l`` tokens its entry covers, for q, k and v at once;
the pyramid is never materialised. Backward: token ``t`` gets ``sum_l g(l, t // p**l) / p**l`` over the levels
whose covering entry was selected, read through the inverse map (a gather, no atomics).

Offsets: ``row``/``b``/``h`` are int64 (``program_block``) and token positions are widened before they meet a
stride, so tensors of more than 2**31 elements (long sequences, strided views) are addressed correctly.
"""

from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl

from .launch import rows_per_program
from .pyramid_index import entry_of, next_level, program_block


@triton.jit
def _pool_rows(x_ptr, b, h, first, span, j_ok, d, d_ok, sxb, sxn, sxh, MAX_SPAN: tl.constexpr, BLOCK_S: tl.constexpr,
               BLOCK_D: tl.constexpr):
    # Widened once: b, h are int64 and the first token's offset is computed in int64; the loop steps the pointers.
    rows = x_ptr + b * sxb + h * sxh + first[:, None].to(tl.int64) * sxn + d[None, :]
    acc = tl.zeros((BLOCK_S, BLOCK_D), dtype=tl.float32)
    for i in range(MAX_SPAN):
        ok = j_ok & (i < span)
        acc += tl.load(rows, mask=ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        rows += sxn
    return acc / span.to(tl.float32)[:, None]


@triton.jit
def _gather_fwd_kernel(q_ptr, k_ptr, v_ptr, idx_ptr, qs_ptr, ks_ptr, vs_ptr, seq_len, S, H, D,
                       sqb, sqn, sqh, skb, skn, skh, svb, svn, svh,
                       BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, P: tl.constexpr, LEVELS: tl.constexpr,
                       MAX_SPAN: tl.constexpr):
    row, b, h, j, j_ok, d, d_ok = program_block(H, S, D, BLOCK_S, BLOCK_D)
    pos = tl.load(idx_ptr + row * S + j, mask=j_ok, other=0)
    local, span = entry_of(pos, seq_len, P, LEVELS)
    first = local * span
    dst = (row * S + j)[:, None] * D + d[None, :]  # int64, as row is
    st_mask = j_ok[:, None] & d_ok[None, :]
    xq = _pool_rows(q_ptr, b, h, first, span, j_ok, d, d_ok, sqb, sqn, sqh, MAX_SPAN, BLOCK_S, BLOCK_D)
    tl.store(qs_ptr + dst, xq.to(qs_ptr.dtype.element_ty), mask=st_mask)
    xk = _pool_rows(k_ptr, b, h, first, span, j_ok, d, d_ok, skb, skn, skh, MAX_SPAN, BLOCK_S, BLOCK_D)
    tl.store(ks_ptr + dst, xk.to(ks_ptr.dtype.element_ty), mask=st_mask)
    xv = _pool_rows(v_ptr, b, h, first, span, j_ok, d, d_ok, svb, svn, svh, MAX_SPAN, BLOCK_S, BLOCK_D)
    tl.store(vs_ptr + dst, xv.to(vs_ptr.dtype.element_ty), mask=st_mask)


@triton.jit
def _unpool_tokens(g_ptr, dx_ptr, row, b, h, tok, tok_ok, d, d_ok, inv_ptr, seq_len, stride_inv, S, D, sdb, sdn,
                   sdh, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, P: tl.constexpr, LEVELS: tl.constexpr):
    acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    inv_row = inv_ptr + row * stride_inv  # row is int64
    g_row = g_ptr + row * S * D + d[None, :]
    offset = 0
    width = seq_len
    span = 1
    for _ in tl.static_range(LEVELS):
        sub_row = tl.load(inv_row + offset + tok // span, mask=tok_ok, other=-1)
        hit = sub_row >= 0
        g = tl.load(g_row + sub_row[:, None].to(tl.int64) * D, mask=hit[:, None] & d_ok[None, :], other=0.0)
        acc += g.to(tl.float32) / span
        offset, width, span = next_level(offset, width, span, P)
    dst = dx_ptr + b * sdb + h * sdh + tok[:, None].to(tl.int64) * sdn + d[None, :]
    tl.store(dst, acc.to(dx_ptr.dtype.element_ty), mask=tok_ok[:, None] & d_ok[None, :])


@triton.jit
def _gather_bwd_kernel(gq_ptr, gk_ptr, gv_ptr, inv_ptr, dq_ptr, dk_ptr, dv_ptr, seq_len, stride_inv, S, H, D,
                       sdb, sdn, sdh,
                       BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, P: tl.constexpr, LEVELS: tl.constexpr):
    row, b, h, tok, tok_ok, d, d_ok = program_block(H, seq_len, D, BLOCK_T, BLOCK_D)
    _unpool_tokens(gq_ptr, dq_ptr, row, b, h, tok, tok_ok, d, d_ok, inv_ptr, seq_len, stride_inv, S, D, sdb, sdn,
                   sdh, BLOCK_T, BLOCK_D, P, LEVELS)
    _unpool_tokens(gk_ptr, dk_ptr, row, b, h, tok, tok_ok, d, d_ok, inv_ptr, seq_len, stride_inv, S, D, sdb, sdn,
                   sdh, BLOCK_T, BLOCK_D, P, LEVELS)
    _unpool_tokens(gv_ptr, dv_ptr, row, b, h, tok, tok_ok, d, d_ok, inv_ptr, seq_len, stride_inv, S, D, sdb, sdn,
                   sdh, BLOCK_T, BLOCK_D, P, LEVELS)


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def gather_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, indices: torch.Tensor, levels: int,
                   pooling_factor: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q/k/v ``[B, N, H, D]``, ``indices`` ``[B, H, S]`` (contiguous) -> three contiguous ``[B, H, S, D]`` in
    q's dtype."""
    q, k, v = (_last_dim_contiguous(x) for x in (q, k, v))
    b, n, h, d = q.shape
    s = indices.shape[-1]
    out = [torch.empty(b, h, s, d, dtype=q.dtype, device=q.device) for _ in range(3)]
    block_s = rows_per_program(q.device, 32)
    grid = (triton.cdiv(s, block_s), b * h)  # see program_block
    _gather_fwd_kernel[grid](
        q, k, v, indices, *out, n, s, h, d, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1),
        k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        BLOCK_S=block_s, BLOCK_D=triton.next_power_of_2(d), P=pooling_factor, LEVELS=levels,
        MAX_SPAN=pooling_factor ** (levels - 1),
    )
    return tuple(out)


def gather_backward(gq: torch.Tensor, gk: torch.Tensor, gv: torch.Tensor, inv: torch.Tensor, seq_len: int,
                    levels: int, pooling_factor: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Subsequence grads ``[B, H, S, D]`` (contiguous), ``inv`` ``[B*H, N_tot]`` (last dim contiguous) -> dq, dk,
    dv ``[B, N, H, D]``, new contiguous tensors in ``gq``'s dtype."""
    b, h, _, d = gq.shape
    out = tuple(torch.empty(b, seq_len, h, d, dtype=gq.dtype, device=gq.device) for _ in range(3))
    _launch_gather_backward(gq, gk, gv, inv, out, levels, pooling_factor)
    return out


def _launch_gather_backward(gq: torch.Tensor, gk: torch.Tensor, gv: torch.Tensor, inv: torch.Tensor,
                            out: Tuple[torch.Tensor, torch.Tensor, torch.Tensor], levels: int,
                            pooling_factor: int) -> None:
    """Write dq, dk, dv into ``out``: three ``[B, N, H, D]`` of ``gq``'s dtype sharing one set of strides, last dim
    contiguous (any other strides: the offset tests write past 2**31 elements through views)."""
    b, h, s, d = gq.shape
    seq_len = out[0].shape[1]
    if inv.stride(-1) != 1:
        inv = inv.contiguous()
    block_t = rows_per_program(gq.device, 64)
    grid = (triton.cdiv(seq_len, block_t), b * h)  # see program_block
    _gather_bwd_kernel[grid](
        gq, gk, gv, inv, *out, seq_len, inv.stride(0), s, h, d, out[0].stride(0), out[0].stride(1), out[0].stride(2),
        BLOCK_T=block_t, BLOCK_D=triton.next_power_of_2(d), P=pooling_factor, LEVELS=levels,
    )
