"""Fused gather of selected pyramid entries from the tokens (pooled as gathered) and its backward, both
deterministic; grouped-query k/v are read in place, once per kv head.

Forward: row ``j`` of query head ``h``'s subsequence is the mean of the ``p**l`` tokens its entry covers, of q's
head ``h`` and of k's and v's head ``h // (H / H_kv)``. The coarsest level (every query head emits all of its
entries) is pooled once per head of q, k and v into a small ``[B, N / p**(L-1), H_x, D]`` tensor; the finer levels
are pooled from the tokens as they are gathered; the rest of the pyramid is never materialised. Backward: token
``t`` of query head ``h`` gets ``sum_l g_h(l, t // p**l) / p**l`` over the levels whose covering entry head ``h``
selected, read through the inverse map (a gather, no atomics); a kv head's token sums that over its query heads in
head order, in the same program.

Offsets: ``row``/``b``/``h`` are int64 (``program_block``) and token positions are widened before they meet a
stride, so tensors of more than 2**31 elements (long sequences, strided views) are addressed correctly.
"""

from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl

from .launch import Geometry, launch_geometry
from .pyramid_index import entry_of, next_level, program_block

#: Launch geometry (rows, warps) of each kernel on CUDA (see ``Geometry``).
POOL_COARSEST_GEOMETRY = Geometry(32, 4)
GATHER_FORWARD_GEOMETRY = Geometry(16, 4)
GATHER_BACKWARD_GEOMETRY = Geometry(16, 4)


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
def _pool_coarsest_kernel(x_ptr, out_ptr, entries, H, D, sxb, sxn, sxh, sob, son, soh,
                          BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, SPAN: tl.constexpr):
    row, b, h, j, j_ok, d, d_ok = program_block(H, entries, D, BLOCK_S, BLOCK_D)
    span = tl.full((BLOCK_S,), SPAN, tl.int32)
    x = _pool_rows(x_ptr, b, h, j * SPAN, span, j_ok, d, d_ok, sxb, sxn, sxh, SPAN, BLOCK_S, BLOCK_D)
    dst = out_ptr + b * sob + h * soh + j[:, None].to(tl.int64) * son + d[None, :]
    tl.store(dst, x.to(out_ptr.dtype.element_ty), mask=j_ok[:, None] & d_ok[None, :])


@triton.jit
def _gather_rows(x_ptr, c_ptr, b, h, local, span, coarsest, j_ok, d, d_ok, sxb, sxn, sxh, scb, scn, sch,
                 FINE_SPAN: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows of head ``h``: coarsest-level entries read from the pooled coarsest level ``c``, the others pooled
    from the tokens ``x`` (at most ``FINE_SPAN`` tokens each)."""
    fine = _pool_rows(x_ptr, b, h, local * span, span, j_ok & ~coarsest, d, d_ok, sxb, sxn, sxh, FINE_SPAN, BLOCK_S,
                      BLOCK_D)
    one = tl.full((BLOCK_S,), 1, tl.int32)
    top = _pool_rows(c_ptr, b, h, local, one, j_ok & coarsest, d, d_ok, scb, scn, sch, 1, BLOCK_S, BLOCK_D)
    return tl.where(coarsest[:, None], top, fine)


@triton.jit
def _gather_fwd_kernel(q_ptr, k_ptr, v_ptr, cq_ptr, ck_ptr, cv_ptr, idx_ptr, qs_ptr, ks_ptr, vs_ptr, seq_len, S, H,
                       group, D, sqb, sqn, sqh, skb, skn, skh, svb, svn, svh, scqb, scqn, scqh, sckb, sckn, sckh,
                       BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, P: tl.constexpr, LEVELS: tl.constexpr):
    row, b, h, j, j_ok, d, d_ok = program_block(H, S, D, BLOCK_S, BLOCK_D)
    kv_head = h // group  # grouped-query attention: query head h reads kv head h // (H / H_kv)
    pos = tl.load(idx_ptr + row * S + j, mask=j_ok, other=0)
    local, span = entry_of(pos, seq_len, P, LEVELS)
    coarsest = span == P ** (LEVELS - 1)
    FINE_SPAN: tl.constexpr = P ** (LEVELS - 2)
    dst = (row * S + j)[:, None] * D + d[None, :]  # int64, as row is
    st_mask = j_ok[:, None] & d_ok[None, :]
    xq = _gather_rows(q_ptr, cq_ptr, b, h, local, span, coarsest, j_ok, d, d_ok, sqb, sqn, sqh, scqb, scqn, scqh,
                      FINE_SPAN, BLOCK_S, BLOCK_D)
    tl.store(qs_ptr + dst, xq.to(qs_ptr.dtype.element_ty), mask=st_mask)
    xk = _gather_rows(k_ptr, ck_ptr, b, kv_head, local, span, coarsest, j_ok, d, d_ok, skb, skn, skh, sckb, sckn,
                      sckh, FINE_SPAN, BLOCK_S, BLOCK_D)
    tl.store(ks_ptr + dst, xk.to(ks_ptr.dtype.element_ty), mask=st_mask)
    xv = _gather_rows(v_ptr, cv_ptr, b, kv_head, local, span, coarsest, j_ok, d, d_ok, svb, svn, svh, sckb, sckn,
                      sckh, FINE_SPAN, BLOCK_S, BLOCK_D)
    tl.store(vs_ptr + dst, xv.to(vs_ptr.dtype.element_ty), mask=st_mask)


@triton.jit
def _unpooled(g_ptr, inv_ptr, first_row, rows, tok, tok_ok, d, d_ok, seq_len, stride_inv, S, D,
              BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, P: tl.constexpr, LEVELS: tl.constexpr):
    """fp32 ``[BLOCK_T, BLOCK_D]``: what the tokens ``tok`` get from the subsequence gradients ``g`` of the
    (batch, head) rows ``first_row .. first_row + rows - 1``, summed row by row, then level by level (a fixed order):
    ``sum_r sum_l g[r, inv[r, level-l entry of tok]] / p**l``."""
    acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    for r in range(rows):
        row = first_row + r  # int64, as first_row is
        inv_row = inv_ptr + row * stride_inv
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
    return acc


@triton.jit
def _gather_bwd_kernel(gq_ptr, gk_ptr, gv_ptr, inv_ptr, dq_ptr, dk_ptr, dv_ptr, seq_len, stride_inv, S, H_KV, group,
                       D, sqb, sqn, sqh, skb, skn, skh,
                       BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, P: tl.constexpr, LEVELS: tl.constexpr):
    # One program per block of tokens of one kv head: dq of its `group` query heads, then dk and dv, each the sum
    # over those query heads in head order (deterministic, no atomics).
    kv_row, b, kv_head, tok, tok_ok, d, d_ok = program_block(H_KV, seq_len, D, BLOCK_T, BLOCK_D)
    first = kv_row * group  # query rows b*H + kv_head*group + i, i < group
    tok_at = tok[:, None].to(tl.int64)
    mask = tok_ok[:, None] & d_ok[None, :]
    for i in range(group):
        dq = _unpooled(gq_ptr, inv_ptr, first + i, 1, tok, tok_ok, d, d_ok, seq_len, stride_inv, S, D, BLOCK_T,
                       BLOCK_D, P, LEVELS)
        dst = dq_ptr + b * sqb + (kv_head * group + i) * sqh + tok_at * sqn + d[None, :]
        tl.store(dst, dq.to(dq_ptr.dtype.element_ty), mask=mask)
    at = b * skb + kv_head * skh + tok_at * skn + d[None, :]
    dk = _unpooled(gk_ptr, inv_ptr, first, group, tok, tok_ok, d, d_ok, seq_len, stride_inv, S, D, BLOCK_T, BLOCK_D,
                   P, LEVELS)
    tl.store(dk_ptr + at, dk.to(dk_ptr.dtype.element_ty), mask=mask)
    dv = _unpooled(gv_ptr, inv_ptr, first, group, tok, tok_ok, d, d_ok, seq_len, stride_inv, S, D, BLOCK_T, BLOCK_D,
                   P, LEVELS)
    tl.store(dv_ptr + at, dv.to(dv_ptr.dtype.element_ty), mask=mask)


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def pool_coarsest(x: torch.Tensor, levels: int, pooling_factor: int) -> torch.Tensor:
    """The coarsest pyramid level of ``x`` ``[B, N, H_x, D]`` (last dim contiguous): ``[B, N / p**(L-1), H_x, D]``,
    a new contiguous tensor in ``x``'s dtype (fp32 means, rounded once)."""
    b, n, h, d = x.shape
    out = torch.empty(b, n // pooling_factor ** (levels - 1), h, d, dtype=x.dtype, device=x.device)
    _launch_pool_coarsest(x, out, levels, pooling_factor)
    return out


def _launch_pool_coarsest(x: torch.Tensor, out: torch.Tensor, levels: int, pooling_factor: int) -> None:
    """Write the coarsest level of ``x`` into ``out``: ``[B, N / p**(L-1), H_x, D]`` of ``x``'s dtype, last dim
    contiguous (any other strides: the offset tests write past 2**31 elements through a view)."""
    b, entries, h, d = out.shape
    block_s, warps = launch_geometry(x.device, POOL_COARSEST_GEOMETRY)
    grid = (triton.cdiv(entries, block_s), b * h)  # see program_block
    _pool_coarsest_kernel[grid](
        x, out, entries, h, d, x.stride(0), x.stride(1), x.stride(2), out.stride(0), out.stride(1), out.stride(2),
        num_warps=warps, BLOCK_S=block_s, BLOCK_D=triton.next_power_of_2(d), SPAN=pooling_factor ** (levels - 1),
    )


def gather_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, indices: torch.Tensor, levels: int,
                   pooling_factor: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q ``[B, N, H, D]``, k/v ``[B, N, H_kv, D]``, ``indices`` ``[B, H, S]`` (contiguous) -> three contiguous
    ``[B, H, S, D]`` in q's dtype; query head ``h`` reads kv head ``h // (H / H_kv)``.

    The coarsest level of q, k and v is pooled first, once per head of each (every query head emits every
    coarsest entry of its tiles, so the query heads of a kv head would otherwise each pool it again from the
    tokens); the finer entries are pooled from the tokens as they are gathered.
    """
    if k.shape != v.shape or (k.shape[0], k.shape[1], k.shape[3]) != (q.shape[0], q.shape[1], q.shape[3]) or (
            q.shape[2] % k.shape[2]):
        raise ValueError(f"gather_entries: q {tuple(q.shape)} and k/v {tuple(k.shape)}, {tuple(v.shape)} must be "
                         f"[B, N, H, D] and [B, N, H_kv, D] with H % H_kv == 0")
    q, k, v = (_last_dim_contiguous(x) for x in (q, k, v))
    b, n, h, d = q.shape
    s = indices.shape[-1]
    cq, ck, cv = (pool_coarsest(x, levels, pooling_factor) for x in (q, k, v))
    out = [torch.empty(b, h, s, d, dtype=q.dtype, device=q.device) for _ in range(3)]
    block_s, warps = launch_geometry(q.device, GATHER_FORWARD_GEOMETRY)
    grid = (triton.cdiv(s, block_s), b * h)  # see program_block
    _gather_fwd_kernel[grid](
        q, k, v, cq, ck, cv, indices, *out, n, s, h, h // k.shape[2], d, q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2), cq.stride(0), cq.stride(1),
        cq.stride(2), ck.stride(0), ck.stride(1), ck.stride(2), num_warps=warps,
        BLOCK_S=block_s, BLOCK_D=triton.next_power_of_2(d), P=pooling_factor, LEVELS=levels,
    )
    return tuple(out)


def gather_backward(gq: torch.Tensor, gk: torch.Tensor, gv: torch.Tensor, inv: torch.Tensor, seq_len: int,
                    kv_heads: int, levels: int, pooling_factor: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Subsequence grads ``[B, H, S, D]`` (contiguous), ``inv`` ``[B*H, N_tot]`` (last dim contiguous) -> dq
    ``[B, N, H, D]`` and dk, dv ``[B, N, kv_heads, D]``, new contiguous tensors in ``gq``'s dtype: a kv head's
    gradient sums those of its ``H / kv_heads`` query heads, in the kernel, in head order."""
    b, h, _, d = gq.shape
    dq = torch.empty(b, seq_len, h, d, dtype=gq.dtype, device=gq.device)
    dk, dv = (torch.empty(b, seq_len, kv_heads, d, dtype=gq.dtype, device=gq.device) for _ in range(2))
    _launch_gather_backward(gq, gk, gv, inv, (dq, dk, dv), levels, pooling_factor)
    return dq, dk, dv


def _launch_gather_backward(gq: torch.Tensor, gk: torch.Tensor, gv: torch.Tensor, inv: torch.Tensor,
                            out: Tuple[torch.Tensor, torch.Tensor, torch.Tensor], levels: int,
                            pooling_factor: int) -> None:
    """Write dq, dk, dv into ``out``: ``[B, N, H, D]`` and two ``[B, N, H_kv, D]`` sharing one set of strides, of
    ``gq``'s dtype, last dim contiguous (any other strides: the offset tests write past 2**31 elements through
    views)."""
    b, h, s, d = gq.shape
    dq, dk, _ = out
    seq_len, kv_heads = dk.shape[1], dk.shape[2]
    if inv.stride(-1) != 1:
        inv = inv.contiguous()
    block_t, warps = launch_geometry(gq.device, GATHER_BACKWARD_GEOMETRY)
    grid = (triton.cdiv(seq_len, block_t), b * kv_heads)  # see program_block
    _gather_bwd_kernel[grid](
        gq, gk, gv, inv, *out, seq_len, inv.stride(0), s, kv_heads, h // kv_heads, d, dq.stride(0), dq.stride(1),
        dq.stride(2), dk.stride(0), dk.stride(1), dk.stride(2), num_warps=warps,
        BLOCK_T=block_t, BLOCK_D=triton.next_power_of_2(d), P=pooling_factor, LEVELS=levels,
    )
