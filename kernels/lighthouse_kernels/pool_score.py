"""Norm scores of every pyramid entry, and the coarsest level of the pyramid, in one pass over q and one over k,
each over its own heads (spec sections 1 and 2; grouped-query keys are scored and pooled once per kv head). The
gather reads q's and k's coarsest entries from here rather than pooling them again from the tokens. A block too
large to pool in registers (coarsest entries of more than :data:`POOL_IN_SCORE_ELEMENTS` / ``D`` tokens, e.g.
``p**(L-1) = 256``) leaves the pooling to a pass of its own (``gather.pool_coarsest``)."""

from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl

from .gather import _launch_pool_coarsest
from .launch import Geometry, launch_geometry
from .pyramid_index import next_level, program_block, pyramid_size

#: Launch geometry (tokens, warps) on CUDA (see ``Geometry``); a block holds at least one whole coarsest entry.
POOL_SCORE_GEOMETRY = Geometry(64, 4)
#: Largest block (tokens x ``D`` rounded up to a power of two) whose coarsest entries the scoring pass also pools:
#: 64 x 128 keeps the fp32 tile in registers at 4 warps on sm_90 (``tests/test_kernel_registers.py``).
POOL_IN_SCORE_ELEMENTS = 64 * 128


@triton.jit
def _store_levels(norm, out_ptr, row, tok, seq_len, total, BLOCK_T: tl.constexpr, P: tl.constexpr,
                  LEVELS: tl.constexpr):
    base = out_ptr + row * total  # row is int64: B*H*N_tot can exceed 2**31
    tl.store(base + tok, norm, mask=tok < seq_len)
    offset = 0
    width = seq_len
    span = 1
    cur = norm
    for level in tl.static_range(1, LEVELS):
        offset, width, span = next_level(offset, width, span, P)
        cur = tl.max(tl.reshape(cur, (BLOCK_T // P**level, P)), axis=1)
        entry = tl.program_id(0) * (BLOCK_T // P**level) + tl.arange(0, BLOCK_T // P**level)
        tl.store(base + offset + entry, cur, mask=entry < width)


@triton.jit
def _pool_score_kernel(x_ptr, s_ptr, c_ptr, seq_len, total, H, D, sxb, sxn, sxh, scb, scn, sch,
                       BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, P: tl.constexpr, LEVELS: tl.constexpr,
                       POOL: tl.constexpr):
    row, b, h, tok, mask, d, d_ok = program_block(H, seq_len, D, BLOCK_T, BLOCK_D)
    # b, h are int64 (program_block); the token offsets are widened too: N * stride_n reaches 2**31 at 2M tokens.
    ptrs = x_ptr + b * sxb + h * sxh + tok[:, None].to(tl.int64) * sxn + d[None, :]
    x = tl.load(ptrs, mask=mask[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    _store_levels(tl.sqrt(tl.sum(x * x, axis=1)), s_ptr, row, tok, seq_len, total, BLOCK_T, P, LEVELS)
    if POOL:  # the block holds whole coarsest entries (pool_score_geometry): their fp32 means, rounded once
        SPAN: tl.constexpr = P ** (LEVELS - 1)
        ENTRIES: tl.constexpr = BLOCK_T // SPAN
        mean = tl.sum(tl.reshape(x, (ENTRIES, SPAN, BLOCK_D)), axis=1) / SPAN
        entry = tl.program_id(0) * ENTRIES + tl.arange(0, ENTRIES)
        dst = c_ptr + b * scb + h * sch + entry[:, None].to(tl.int64) * scn + d[None, :]
        tl.store(dst, mean.to(c_ptr.dtype.element_ty), mask=(entry < seq_len // SPAN)[:, None] & d_ok[None, :])


def pool_score_geometry(device: torch.device, levels: int, pooling_factor: int) -> Geometry:
    """Tokens and warps per program: :data:`POOL_SCORE_GEOMETRY`'s, or one coarsest entry (``pooling_factor**(levels
    -1)`` tokens) when that is more."""
    rows, warps = launch_geometry(device, POOL_SCORE_GEOMETRY)
    return Geometry(max(rows, pooling_factor ** (levels - 1)), warps)


def _scores(x: torch.Tensor, levels: int, pooling_factor: int, block_t: int, block_d: int,
            warps: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``x`` ``[B, N, H_x, D]`` -> its pyramid's scores ``[B, H_x, N_tot]`` float32 and its coarsest level ``[B, N /
    p**(L-1), H_x, D]`` in ``x``'s dtype, one program of ``warps`` warps per block of ``block_t`` tokens and head."""
    b, n, h, d = x.shape
    x = x if x.stride(-1) == 1 else x.contiguous()
    total = pyramid_size(n, levels, pooling_factor)
    scores = torch.empty(b, h, total, dtype=torch.float32, device=x.device)
    coarsest = torch.empty(b, n // pooling_factor ** (levels - 1), h, d, dtype=x.dtype, device=x.device)
    pool = block_t * block_d <= POOL_IN_SCORE_ELEMENTS
    grid = (triton.cdiv(n, block_t), b * h)  # see program_block
    _pool_score_kernel[grid](x, scores, coarsest, n, total, h, d, x.stride(0), x.stride(1), x.stride(2),
                             coarsest.stride(0), coarsest.stride(1), coarsest.stride(2), num_warps=warps,
                             BLOCK_T=block_t, BLOCK_D=block_d, P=pooling_factor, LEVELS=levels, POOL=pool)
    if not pool:
        _launch_pool_coarsest(x, coarsest, levels, pooling_factor)
    return scores, coarsest


def pool_scores(q: torch.Tensor, k: torch.Tensor, levels: int,
                pooling_factor: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Norm scores of all pyramid entries, and the coarsest level of q and k (the naive oracle's ``pool_scores``,
    same signature).

    Args:
        q: ``[B, N, H, D]``; k: ``[B, N, H_kv, D]`` (its own heads: grouped-query keys are scored once per kv
            head); bf16/fp16/fp32, one dtype, last dim contiguous or not.
    Returns:
        ``(score_q, score_k, coarsest_q, coarsest_k)``: ``[B, H, N_tot]`` and ``[B, H_kv, N_tot]`` float32, the max
        over covered tokens of the fp32 token norm; ``[B, N / p**(L-1), H, D]`` and ``[B, N / p**(L-1), H_kv, D]``
        in q's dtype, the fp32 means of the coarsest entries' tokens, rounded once (what ``gather_entries`` takes).
        None of them carries gradients (the selection is gradient-free, and the gather's backward reaches the
        tokens without them).

    A program pools whole coarsest entries, ``pooling_factor**(levels-1)`` tokens of ``D`` dims at once: more than
    Triton's largest block (``2**20`` elements, with ``D`` rounded up to a power of two) is a ``ValueError``,
    raised before any work.
    """
    d = q.shape[-1]
    block_t, warps = pool_score_geometry(q.device, levels, pooling_factor)
    block_d = triton.next_power_of_2(d)
    if block_t * block_d > tl.TRITON_MAX_TENSOR_NUMEL:
        raise ValueError(
            f"Triton pooling: a coarsest entry covers pooling_factor**(levels-1) = {pooling_factor}**{levels - 1} = "
            f"{pooling_factor ** (levels - 1)} tokens, {block_t * block_d} elements of a block with D={d} (as "
            f"{block_d}), more than Triton's largest block ({tl.TRITON_MAX_TENSOR_NUMEL}); use fewer levels or a "
            f"smaller pooling_factor, or the torch backend")
    (score_q, coarsest_q), (score_k, coarsest_k) = (_scores(x, levels, pooling_factor, block_t, block_d, warps)
                                                    for x in (q, k))
    return score_q, score_k, coarsest_q, coarsest_k
