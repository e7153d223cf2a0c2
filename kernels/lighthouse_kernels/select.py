"""Tile-local bidirectional hierarchical top-K (spec section 3) as batched torch ops with no host synchronisation.

Same result as :func:`megatron_lighthouse.naive.select_pyramid_indices` (ties toward the lower candidate position),
but the per-level split into selected/rejected uses sorts of fixed size instead of boolean indexing (which waits on
the GPU), and the final ordering sorts each tile's entries alone (tiles own contiguous spans, so tile order is
global order). Not a Triton kernel yet.
"""

from __future__ import annotations

import torch

from megatron_lighthouse.config import TILE_HALF, TILE_SELECT, level_offsets


def _top_half(scores: torch.Tensor) -> torch.Tensor:
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :TILE_HALF]


@torch.no_grad()
def select_indices_fused(score_q: torch.Tensor, score_k: torch.Tensor, seq_len: int, levels: int,
                         pooling_factor: int, topk: int) -> torch.Tensor:
    """``[B, H, N_tot]`` float32 scores -> ``[B, H, S]`` int64 pyramid positions in causal order."""
    b, h, _ = score_q.shape
    p = pooling_factor
    tiles = topk // TILE_SELECT
    offsets = level_offsets(seq_len, levels, p)
    scale = 2 ** (levels - 1)  # keys times 2**(L-1): exact integers
    per_tile = seq_len // p ** (levels - 1) // tiles
    dev = score_q.device
    cand = torch.arange(tiles * per_tile, device=dev).view(1, 1, tiles, per_tile).expand(b, h, -1, -1)
    keys, ids = [], []
    for level in range(levels - 1, 0, -1):
        m = cand.shape[-1]
        flat = cand.reshape(b, h, -1) + offsets[level]
        sq = score_q.gather(2, flat).view(b, h, tiles, m)
        sk = score_k.gather(2, flat).view(b, h, tiles, m)
        chosen = torch.zeros(cand.shape, dtype=torch.bool, device=dev)
        chosen.scatter_(-1, _top_half(sq), True)
        chosen.scatter_(-1, _top_half(sk.masked_fill(chosen, float("-inf"))), True)
        # Stable sort on the mask: rejected positions first, then selected, each in ascending candidate order.
        order = torch.sort(chosen.to(torch.uint8), dim=-1, stable=True).indices
        split = cand.gather(-1, order)
        rejected, selected = split[..., : m - TILE_SELECT], split[..., m - TILE_SELECT:]
        span = p**level
        keys += [rejected * span * scale, (selected + 1) * span * scale - (scale >> level)]
        ids += [rejected + offsets[level], selected + offsets[level]]
        cand = (selected.unsqueeze(-1) * p + torch.arange(p, device=dev)).reshape(b, h, tiles, TILE_SELECT * p)
    keys.append(cand * scale)
    ids.append(cand)
    order = torch.cat(keys, dim=-1).argsort(dim=-1)
    return torch.cat(ids, dim=-1).gather(-1, order).view(b, h, -1)
