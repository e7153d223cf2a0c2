"""Autograd Functions around the dense attention and the fused entry point :func:`lighthouse_attention_triton`.

``GatherFromTokens``: q/k/v ``[B, N, H, D]`` + selected pyramid positions -> ``[B, H, S, D]`` each (pooled on the
fly). ``ScatterToTokens``: ``[B, H, S, D]`` subsequence outputs -> ``[B, N, H, D]`` tokens (causal shift, fan-out).
Both backwards are gathers through the inverse map, so outputs and gradients are bitwise reproducible.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from megatron_lighthouse.config import level_offsets

from .dense import dense_attention
from .gather import gather_backward, gather_forward
from .pyramid_index import inverse_map
from .scatter import scatter_backward, scatter_forward


class GatherFromTokens(torch.autograd.Function):
    """Selected pyramid entries of q, k, v, pooled from the tokens; gradients flow back to every covered token."""

    @staticmethod
    def forward(ctx, q, k, v, indices, inv, levels: int, pooling_factor: int):
        ctx.save_for_backward(inv)
        ctx.shape = (q.shape[1], levels, pooling_factor)
        return gather_forward(q, k, v, indices, levels, pooling_factor)

    @staticmethod
    def backward(ctx, gq, gk, gv):
        (inv,) = ctx.saved_tensors
        seq_len, levels, p = ctx.shape
        grads = [g.contiguous() if g is not None else torch.zeros_like(gq if gq is not None else gk)
                 for g in (gq, gk, gv)]
        dq, dk, dv = gather_backward(*grads, inv, seq_len, levels, p)
        return dq, dk, dv, None, None, None, None


class ScatterToTokens(torch.autograd.Function):
    """Subsequence outputs added to the tokens each entry reaches; backward sums ``dout`` over those tokens."""

    @staticmethod
    def forward(ctx, out_sub, indices, inv, seq_len: int, levels: int, pooling_factor: int):
        ctx.save_for_backward(indices)
        ctx.shape = (levels, pooling_factor, out_sub.dtype)
        return scatter_forward(out_sub.contiguous(), inv, seq_len, levels, pooling_factor)

    @staticmethod
    def backward(ctx, dout):
        (indices,) = ctx.saved_tensors
        levels, p, dtype = ctx.shape
        return scatter_backward(dout, indices, levels, p, dtype), None, None, None, None, None


def gather_from_tokens(q, k, v, indices: torch.Tensor, levels: int, pooling_factor: int,
                       inv: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Differentiable fused gather; q/k/v ``[B, N, H, D]``, ``indices`` ``[B, H, S]`` -> 3 x ``[B, H, S, D]``."""
    indices = indices.contiguous()
    if inv is None:
        inv = inverse_map(indices, level_offsets(q.shape[1], levels, pooling_factor)[-1])
    return GatherFromTokens.apply(q, k, v, indices, inv, levels, pooling_factor)


def scatter_to_tokens(out_sub: torch.Tensor, indices: torch.Tensor, seq_len: int, levels: int, pooling_factor: int,
                      inv: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Differentiable fused scatter; ``out_sub`` ``[B, H, S, D]`` -> ``[B, N, H, D]`` (note: token-major layout)."""
    indices = indices.contiguous()
    if inv is None:
        inv = inverse_map(indices, level_offsets(seq_len, levels, pooling_factor)[-1])
    return ScatterToTokens.apply(out_sub, indices, inv, seq_len, levels, pooling_factor)


def inverse_map_for(indices: torch.Tensor, seq_len: int, levels: int, pooling_factor: int) -> torch.Tensor:
    """Inverse map of ``indices`` ``[B, H, S]`` over the pyramid of ``seq_len`` tokens (``[B*H, N_tot]`` int32)."""
    return inverse_map(indices, level_offsets(seq_len, levels, pooling_factor)[-1])


def lighthouse_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    levels: int,
    pooling_factor: int,
    topk: int,
    chunks: int = 1,
    softmax_scale: Optional[float] = None,
    dense: str = "auto",
) -> torch.Tensor:
    """Lighthouse attention with the fused kernels; ``dense`` names the stock dense kernel
    (see ``dense.DENSE_KERNELS``).

    q ``[B, N, H, D]``, k/v ``[B, N, H_kv, D]`` (bf16/fp16/fp32) -> ``[B, N, H, D]``; same semantics as
    :func:`megatron_lighthouse.lighthouse_attention`.
    """
    from megatron_lighthouse.attention import lighthouse_attention

    return lighthouse_attention(
        q, k, v, levels=levels, pooling_factor=pooling_factor, topk=topk, chunks=chunks, softmax_scale=softmax_scale,
        attention=dense_attention(dense, q.device.type), backend="triton",
    )
