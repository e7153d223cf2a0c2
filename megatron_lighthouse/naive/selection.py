"""Tile-local bidirectional hierarchical top-K selection and causal ordering (spec section 3)."""

from __future__ import annotations

import torch

from ..config import TILE_HALF, TILE_SELECT, level_offsets


def _top_half(scores: torch.Tensor) -> torch.Tensor:
    """Positions of the ``TILE_HALF`` largest entries along the last dim; ties go to the lower position."""
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :TILE_HALF]


@torch.no_grad()
def select_entries(
    score_q: torch.Tensor,
    score_k: torch.Tensor,
    seq_len: int,
    levels: int,
    pooling_factor: int,
    topk: int,
) -> torch.Tensor:
    """Select the causal-ordered subsequence of pyramid entries.

    Args:
        score_q, score_k: ``[B, H, N_tot]`` and ``[B, H_kv, N_tot]`` float32 pyramid scores, ``H % H_kv == 0``
            (see :func:`~megatron_lighthouse.naive.pyramid.pool_scores`); query head ``h`` is scored against kv
            head ``h // (H / H_kv)``.
        seq_len: ``N``, tokens per sequence (the settings must be valid for it).
    Returns:
        ``[B, H, S]`` int64 positions in the concatenated pyramid, sorted by the spec's causal key,
        ``S = N / p**(L-1) + (L-1) * p * topk``.
    """
    b, h, _ = score_q.shape
    kv_head = torch.arange(h, device=score_k.device) // (h // score_k.shape[1])
    score_k = score_k[:, kv_head]  # each query head's view of its kv head's key scores: [B, H, N_tot]
    p = pooling_factor
    tiles = topk // TILE_SELECT
    offsets = level_offsets(seq_len, levels, p)
    coarsest = levels - 1
    per_tile = seq_len // p**coarsest // tiles
    # Keys are the spec's sort keys times 2**(L-1): exact integers, unique within a row.
    scale = 2 ** (levels - 1)

    cand = torch.arange(tiles * per_tile, device=score_q.device).view(1, 1, tiles, per_tile).expand(b, h, -1, -1)
    keys, ids = [], []
    for level in range(coarsest, 0, -1):
        m = cand.shape[-1]
        flat = cand.reshape(b, h, -1) + offsets[level]
        sq = score_q.gather(2, flat).view(b, h, tiles, m)
        sk = score_k.gather(2, flat).view(b, h, tiles, m)

        chosen = torch.zeros_like(cand, dtype=torch.bool)
        chosen.scatter_(-1, _top_half(sq), True)
        sk = sk.masked_fill(chosen, float("-inf"))
        chosen.scatter_(-1, _top_half(sk), True)

        # Boolean indexing keeps ascending candidate order, so children below stay ascending.
        selected = cand[chosen].view(b, h, tiles, TILE_SELECT)
        rejected = cand[~chosen].view(b, h, tiles, m - TILE_SELECT)
        span = p**level
        keys += [rejected * span * scale, (selected + 1) * span * scale - (scale >> level)]
        ids += [rejected + offsets[level], selected + offsets[level]]

        cand = (selected.unsqueeze(-1) * p + torch.arange(p, device=cand.device)).view(b, h, tiles, TILE_SELECT * p)

    keys.append(cand * scale)
    ids.append(cand)
    order = torch.cat(keys, dim=-1).argsort(dim=-1)
    return torch.cat(ids, dim=-1).gather(-1, order).view(b, h, -1)
