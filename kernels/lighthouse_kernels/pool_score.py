"""Norm scores of every pyramid entry in one pass over q and one over k, each over its own heads (spec section
2; grouped-query keys are scored once per kv head)."""

from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl

from .launch import Geometry, launch_geometry
from .pyramid_index import next_level, program_block, pyramid_size

#: Launch geometry (tokens, warps) on CUDA (see ``Geometry``); a block holds at least one whole coarsest entry.
POOL_SCORE_GEOMETRY = Geometry(64, 4)


@triton.jit
def _token_norms(x_ptr, b, h, tok, tok_mask, d, d_ok, stride_b, stride_n, stride_h):
    # b, h are int64 (program_block); the token offsets are widened too: N * stride_n reaches 2**31 at 2M tokens.
    ptrs = x_ptr + b * stride_b + h * stride_h + tok[:, None].to(tl.int64) * stride_n + d[None, :]
    x = tl.load(ptrs, mask=tok_mask[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    return tl.sqrt(tl.sum(x * x, axis=1))


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
def _pool_score_kernel(x_ptr, s_ptr, seq_len, total, H, D, sxb, sxn, sxh,
                       BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, P: tl.constexpr, LEVELS: tl.constexpr):
    row, b, h, tok, mask, d, d_ok = program_block(H, seq_len, D, BLOCK_T, BLOCK_D)
    norms = _token_norms(x_ptr, b, h, tok, mask, d, d_ok, sxb, sxn, sxh)
    _store_levels(norms, s_ptr, row, tok, seq_len, total, BLOCK_T, P, LEVELS)


def pool_score_geometry(device: torch.device, levels: int, pooling_factor: int) -> Geometry:
    """Tokens and warps per program: :data:`POOL_SCORE_GEOMETRY`'s, or one coarsest entry (``pooling_factor**(levels
    -1)`` tokens) when that is more."""
    rows, warps = launch_geometry(device, POOL_SCORE_GEOMETRY)
    return Geometry(max(rows, pooling_factor ** (levels - 1)), warps)


def _scores(x: torch.Tensor, levels: int, pooling_factor: int, block_t: int, block_d: int,
            warps: int) -> torch.Tensor:
    """``x`` ``[B, N, H_x, D]`` -> its pyramid's scores ``[B, H_x, N_tot]`` float32, one program of ``warps`` warps
    per block of ``block_t`` tokens and head."""
    b, n, h, d = x.shape
    x = x if x.stride(-1) == 1 else x.contiguous()
    total = pyramid_size(n, levels, pooling_factor)
    scores = torch.empty(b, h, total, dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(n, block_t), b * h)  # see program_block
    _pool_score_kernel[grid](x, scores, n, total, h, d, x.stride(0), x.stride(1), x.stride(2), num_warps=warps,
                             BLOCK_T=block_t, BLOCK_D=block_d, P=pooling_factor, LEVELS=levels)
    return scores


def pool_scores(q: torch.Tensor, k: torch.Tensor, levels: int,
                pooling_factor: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Norm scores of all pyramid entries (the naive oracle's ``pool_scores``, same signature).

    Args:
        q: ``[B, N, H, D]``; k: ``[B, N, H_kv, D]`` (its own heads: grouped-query keys are scored once per kv
            head); bf16/fp16/fp32, last dim contiguous or not.
    Returns:
        ``(score_q, score_k)``, ``[B, H, N_tot]`` and ``[B, H_kv, N_tot]`` float32: the max over covered tokens of
        the fp32 token norm.

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
    return tuple(_scores(x, levels, pooling_factor, block_t, block_d, warps) for x in (q, k))
