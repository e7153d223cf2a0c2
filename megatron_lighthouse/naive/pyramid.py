"""Pyramid pooling of q/k/v, the norm scores of every pyramid entry, and the gather of selected entries (spec
sections 1, 2 and 4)."""

from __future__ import annotations

from typing import Tuple

import torch


def build_pyramid(x: torch.Tensor, levels: int, pooling_factor: int) -> torch.Tensor:
    """Mean-pool ``x`` into all levels, concatenated along the sequence.

    Args:
        x: ``[B, N, H, D]``, any floating dtype.
    Returns:
        ``[B, H, N_tot, D]`` in ``x``'s dtype; level ``l`` starts at ``sum_{m<l} N / p**m`` and entry ``i``
        of it is the mean of tokens ``[i*p**l, (i+1)*p**l)``.
    """
    b, n, h, d = x.shape
    parts = [x]
    for level in range(1, levels):
        stride = pooling_factor**level
        parts.append(x.view(b, n // stride, stride, h, d).mean(dim=2))
    return torch.cat(parts, dim=1).transpose(1, 2)


def pyramid_last_tokens(seq_len: int, levels: int, pooling_factor: int, device=None) -> torch.Tensor:
    """Token index of the last token each pyramid entry covers: int64 ``[N_tot]`` (entry ``i`` of level ``l``
    covers tokens ``[i*p**l, (i+1)*p**l)``, so ``(i+1)*p**l - 1``); the position RoPE gives a selected entry."""
    parts = []
    for level in range(levels):
        stride = pooling_factor**level
        parts.append(torch.arange(1, seq_len // stride + 1, device=device) * stride - 1)
    return torch.cat(parts)


def pool_scores(
    q: torch.Tensor, k: torch.Tensor, levels: int, pooling_factor: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Norm scores of every pyramid entry: the max over covered tokens of ``||q_t||`` (resp. ``||k_t||``).

    Args:
        q: ``[B, N, H, D]``; k: ``[B, N, H_kv, D]`` (scored once per kv head).
    Returns:
        ``(score_q, score_k)``, ``[B, H, N_tot]`` and ``[B, H_kv, N_tot]`` float32.
    """

    def one(x: torch.Tensor) -> torch.Tensor:
        token = torch.linalg.vector_norm(x.float(), dim=-1)  # [B, N, H]
        b, n, h = token.shape
        parts = [token]
        for level in range(1, levels):
            stride = pooling_factor**level
            parts.append(token.view(b, n // stride, stride, h).amax(dim=2))
        return torch.cat(parts, dim=1).transpose(1, 2).contiguous()

    return one(q), one(k)


def gather_entries(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, indices: torch.Tensor, levels: int,
                   pooling_factor: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The selected pyramid entries of q, k and v (differentiable in q/k/v; ``indices`` are constants).

    Grouped-query attention: each kv head's pyramid is built once, and each of its ``H / H_kv`` query heads
    gathers its own entries from it (query head ``h`` reads kv head ``h // (H / H_kv)``); the gradients of a
    kv head's query heads add up in its pyramid.

    Args:
        q: ``[B, N, H, D]``; k, v: ``[B, N, H_kv, D]``, ``H % H_kv == 0``; one dtype.
        indices: ``[B, H, S]`` int64 positions in the concatenated pyramid (from :func:`select_entries`).
    Returns:
        three ``[B, H, S, D]`` in the inputs' dtype: row ``j`` of head ``h`` is the mean of the tokens entry
        ``indices[:, h, j]`` covers.
    """
    b, h, s = indices.shape

    def pick(x: torch.Tensor) -> torch.Tensor:
        pyramid = build_pyramid(x, levels, pooling_factor)  # [B, H_x, N_tot, D]
        heads, d = pyramid.shape[1], pyramid.shape[-1]
        group = h // heads
        # query head j * group + i is member i of kv head j: members[:, j, i] holds its indices
        members = indices.reshape(b, heads, group, s, 1).expand(-1, -1, -1, -1, d)
        picked = [pyramid.gather(2, members[:, :, i]) for i in range(group)]  # [B, H_x, S, D] each
        return torch.stack(picked, dim=2).view(b, h, s, d)

    return pick(q), pick(k), pick(v)
