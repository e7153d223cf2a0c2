"""The differentiable fused steps: :func:`gather_entries` and :func:`scatter_to_tokens` (autograd Functions).

``GatherEntries``: q ``[B, N, H, D]``, k/v ``[B, N, H_kv, D]`` + selected pyramid positions -> ``[B, H, S, D]``
each (pooled from the tokens; query head ``h`` reads kv head ``h // (H / H_kv)``, no copy of k or v per query
head). ``ScatterToTokens``: ``[B, H, S, D]`` subsequence outputs -> ``[B, N, H, D]`` tokens (causal shift,
fan-out). Both backwards are gathers (through the inverse map for the gather), so outputs and gradients are
bitwise reproducible. The inverse map is built where it is needed (scatter forward, gather backward) and not kept
between forward and backward.
"""

from __future__ import annotations

from typing import Tuple

import torch

from .gather import gather_backward, gather_forward
from .pyramid_index import inverse_map, pyramid_size
from .scatter import scatter_backward, scatter_forward


class GatherEntries(torch.autograd.Function):
    """Selected pyramid entries of q, k, v, pooled from the tokens; gradients flow back to every covered token."""

    @staticmethod
    def forward(ctx, q, k, v, indices, levels: int, pooling_factor: int):
        ctx.save_for_backward(indices)
        ctx.shape = (q.shape[1], k.shape[2], levels, pooling_factor)
        return gather_forward(q, k, v, indices, levels, pooling_factor)

    @staticmethod
    def backward(ctx, gq, gk, gv):
        (indices,) = ctx.saved_tensors
        seq_len, kv_heads, levels, p = ctx.shape
        like = next(g for g in (gq, gk, gv) if g is not None)
        grads = [g.contiguous() if g is not None else torch.zeros_like(like) for g in (gq, gk, gv)]
        inv = inverse_map(indices, pyramid_size(seq_len, levels, p))
        dq, dk, dv = gather_backward(*grads, inv, seq_len, kv_heads, levels, p)
        return dq, dk, dv, None, None, None


class ScatterToTokens(torch.autograd.Function):
    """Subsequence outputs added to the tokens each entry reaches; backward sums ``dout`` over those tokens."""

    @staticmethod
    def forward(ctx, out_sub, indices, seq_len: int, levels: int, pooling_factor: int):
        ctx.save_for_backward(indices)
        ctx.shape = (levels, pooling_factor, out_sub.dtype)
        inv = inverse_map(indices, pyramid_size(seq_len, levels, pooling_factor))
        return scatter_forward(out_sub.contiguous(), inv, seq_len, levels, pooling_factor)

    @staticmethod
    def backward(ctx, dout):
        (indices,) = ctx.saved_tensors
        levels, p, dtype = ctx.shape
        return scatter_backward(dout, indices, levels, p, dtype), None, None, None, None


def gather_entries(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, indices: torch.Tensor, levels: int,
                   pooling_factor: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The naive oracle's ``gather_entries``, fused: q ``[B, N, H, D]``, k/v ``[B, N, H_kv, D]`` with ``H % H_kv
    == 0`` (bf16/fp16/fp32, one dtype, last dim contiguous or not), ``indices`` ``[B, H, S]`` int64 -> three
    contiguous ``[B, H, S, D]`` in q's dtype. Backward: dk/dv ``[B, N, H_kv, D]``, each kv head's the sum over its
    query heads, reduced in the kernel in head order (deterministic)."""
    return GatherEntries.apply(q, k, v, indices.contiguous(), levels, pooling_factor)


def scatter_to_tokens(out_sub: torch.Tensor, indices: torch.Tensor, seq_len: int, levels: int,
                      pooling_factor: int) -> torch.Tensor:
    """The naive oracle's ``scatter_to_tokens``, fused: ``out_sub`` ``[B, H, S, D]`` -> ``[B, N, H, D]`` in its
    dtype (levels summed in float32)."""
    return ScatterToTokens.apply(out_sub, indices.contiguous(), seq_len, levels, pooling_factor)
