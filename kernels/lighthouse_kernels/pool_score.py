"""Norm scores of every pyramid entry in one pass over q and k (spec section 2)."""

from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl

from megatron_lighthouse.config import level_offsets

from .launch import rows_per_program


@triton.jit
def _token_norms(x_ptr, b, h, tok, tok_mask, stride_b, stride_n, stride_h, D, BLOCK_D: tl.constexpr):
    d = tl.arange(0, BLOCK_D)
    ptrs = x_ptr + b * stride_b + h * stride_h + tok[:, None] * stride_n + d[None, :]
    x = tl.load(ptrs, mask=tok_mask[:, None] & (d[None, :] < D), other=0.0).to(tl.float32)
    return tl.sqrt(tl.sum(x * x, axis=1))


@triton.jit
def _store_levels(norm, out_ptr, row, blk, seq_len, total,
                  BLOCK_T: tl.constexpr, P: tl.constexpr, LEVELS: tl.constexpr):
    base = out_ptr + row * total
    tok = blk * BLOCK_T + tl.arange(0, BLOCK_T)
    tl.store(base + tok, norm, mask=tok < seq_len)
    offset = 0
    width = seq_len
    cur = norm
    for level in tl.static_range(1, LEVELS):
        offset += width
        width = width // P
        cur = tl.max(tl.reshape(cur, (BLOCK_T // P**level, P)), axis=1)
        entry = blk * (BLOCK_T // P**level) + tl.arange(0, BLOCK_T // P**level)
        tl.store(base + offset + entry, cur, mask=entry < width)


@triton.jit
def _pool_score_kernel(q_ptr, k_ptr, sq_ptr, sk_ptr, seq_len, total, H, D,
                       sqb, sqn, sqh, skb, skn, skh,
                       BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, P: tl.constexpr, LEVELS: tl.constexpr):
    row = tl.program_id(0)
    blk = tl.program_id(1)
    b = row // H
    h = row % H
    tok = blk * BLOCK_T + tl.arange(0, BLOCK_T)
    mask = tok < seq_len
    nq = _token_norms(q_ptr, b, h, tok, mask, sqb, sqn, sqh, D, BLOCK_D)
    _store_levels(nq, sq_ptr, row, blk, seq_len, total, BLOCK_T, P, LEVELS)
    nk = _token_norms(k_ptr, b, h, tok, mask, skb, skn, skh, D, BLOCK_D)
    _store_levels(nk, sk_ptr, row, blk, seq_len, total, BLOCK_T, P, LEVELS)


def pool_scores(q: torch.Tensor, k: torch.Tensor, levels: int,
                pooling_factor: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Norm scores of all pyramid entries, as :func:`megatron_lighthouse.naive.pyramid_scores`.

    Args:
        q, k: ``[B, N, H, D]`` (same shape; last dim contiguous), bf16/fp16/fp32.
    Returns:
        ``(score_q, score_k)``, each ``[B, H, N_tot]`` float32: the max over covered tokens of the fp32 token norm.
    """
    b, n, h, d = q.shape
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    total = level_offsets(n, levels, pooling_factor)[-1]
    sq = torch.empty(b, h, total, dtype=torch.float32, device=q.device)
    sk = torch.empty_like(sq)
    block_t = max(pooling_factor ** (levels - 1), rows_per_program(q.device, 64))
    grid = (b * h, triton.cdiv(n, block_t))
    _pool_score_kernel[grid](
        q, k, sq, sk, n, total, h, d, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        BLOCK_T=block_t, BLOCK_D=triton.next_power_of_2(d), P=pooling_factor, LEVELS=levels,
    )
    return sq, sk
