"""Scatter of subsequence outputs back to tokens with causal shift and fan-out (spec section 5)."""

from __future__ import annotations

import torch

from ..config import level_offsets


def scatter_to_tokens(
    out_sub: torch.Tensor, indices: torch.Tensor, seq_len: int, levels: int, pooling_factor: int
) -> torch.Tensor:
    """Add each subsequence output to the tokens its entry reaches.

    The output of level-``l`` entry ``i`` goes to tokens ``[(i+1)*p**l - 1, (i+2)*p**l - 1)``; equivalently
    token ``t`` reads level ``l`` entry ``(t+1) // p**l - 1`` when that entry was selected. Written as that
    gather (one per level), so forward and backward are deterministic.

    Args:
        out_sub: ``[B, H, S, D]`` subsequence outputs.
        indices: ``[B, H, S]`` pyramid positions (from :func:`~megatron_lighthouse.naive.selection.select_entries`).
    Returns:
        ``[B, N, H, D]`` in ``out_sub``'s dtype (levels summed in at least float32).
    """
    b, h, s, d = out_sub.shape
    offsets = torch.tensor(level_offsets(seq_len, levels, pooling_factor), device=indices.device)
    entry_level = torch.searchsorted(offsets, indices, right=True) - 1
    local = indices - offsets[entry_level]
    acc = torch.promote_types(out_sub.dtype, torch.float32)
    padded = torch.cat([out_sub.to(acc), out_sub.new_zeros(b, h, 1, d, dtype=acc)], dim=2)
    position = torch.arange(s, device=indices.device).expand(b, h, s)
    tokens = torch.arange(seq_len, device=indices.device)

    result = None
    for level in range(levels):
        span = pooling_factor**level
        n_level = seq_len // span
        # slot n_level (and subsequence row s, a zero row) stands for "not selected".
        where = torch.full((b, h, n_level + 1), s, dtype=torch.long, device=indices.device)
        at_level = entry_level == level
        where.scatter_(2, torch.where(at_level, local, n_level), torch.where(at_level, position, s))
        source = (tokens + 1) // span - 1
        source = torch.where(source >= 0, source, n_level).expand(b, h, seq_len)
        rows = where.gather(2, source)
        term = padded.gather(2, rows.unsqueeze(-1).expand(-1, -1, -1, d))
        result = term if result is None else result + term
    return result.to(out_sub.dtype).transpose(1, 2)
