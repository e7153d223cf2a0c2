"""Megatron's load-balanced context-parallel sequence layout.

The sequence is cut into ``2W`` equal chunks; rank ``r`` of ``W`` holds chunks ``r`` and ``2W-1-r``, concatenated
in that order (so every rank gets the same share of causal-attention work). These helpers move between the full
sequence and that local layout on any tensor dimension.
"""

from __future__ import annotations

from typing import Sequence, Tuple

import torch

from .config import check_int


def cp_chunk_ids(rank: int, world: int) -> Tuple[int, int]:
    """Global chunk indices (of ``2 * world``) held by ``rank``, in local order: ``(rank, 2*world-1-rank)``."""
    world = check_int("context-parallel size", world)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world:
        raise ValueError(f"context-parallel rank {rank!r}: must be an int in [0, {world})")
    return rank, 2 * world - 1 - rank


def _check_seq_dim(x: torch.Tensor, seq_dim: int, what: str) -> None:
    """``ValueError`` unless ``x`` is a tensor with a dimension ``seq_dim`` (negative counts from the end)."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{what}: a {type(x).__name__}, not a torch.Tensor")
    if isinstance(seq_dim, bool) or not isinstance(seq_dim, int) or not -x.dim() <= seq_dim < x.dim():
        raise ValueError(f"seq_dim={seq_dim!r}: not a dimension of {what}, of shape {tuple(x.shape)}")


def split_for_cp(x: torch.Tensor, rank: int, world: int, seq_dim: int = 1) -> torch.Tensor:
    """The shard of ``x`` that CP rank ``rank`` of ``world`` holds: chunks ``rank`` and ``2*world-1-rank``.

    ``x`` holds the full sequence along ``seq_dim`` (length divisible by ``2 * world``); the result has
    ``1 / world`` of it along that dimension, other dimensions unchanged.
    """
    ids = cp_chunk_ids(rank, world)
    _check_seq_dim(x, seq_dim, "x")
    n = x.shape[seq_dim]
    if n % (2 * world) != 0:
        raise ValueError(
            f"sequence length {n} (dim {seq_dim}): must be divisible by 2 * context-parallel size = {2 * world}"
        )
    chunks = x.chunk(2 * world, dim=seq_dim)
    return torch.cat([chunks[i] for i in ids], dim=seq_dim)


def gather_from_cp(shards: Sequence[torch.Tensor], seq_dim: int = 1) -> torch.Tensor:
    """Inverse of :func:`split_for_cp`: the full sequence from the shards of all ranks, given in rank order."""
    world = len(shards)
    if world < 1:
        raise ValueError("gather_from_cp: needs the shards of at least one rank")
    ordered = [None] * (2 * world)
    for rank, shard in enumerate(shards):
        _check_seq_dim(shard, seq_dim, f"the shard of rank {rank}")
        if shard.shape != shards[0].shape:
            raise ValueError(f"gather_from_cp: the shard of rank {rank} has shape {tuple(shard.shape)}, rank 0's "
                             f"{tuple(shards[0].shape)}: every rank holds an equal share")
        if shard.shape[seq_dim] % 2 != 0:
            raise ValueError(
                f"shard of rank {rank} has odd length {shard.shape[seq_dim]} along dim {seq_dim}: a load-balanced "
                f"shard is two equal chunks"
            )
        first, second = shard.chunk(2, dim=seq_dim)
        ordered[rank], ordered[2 * world - 1 - rank] = first, second
    return torch.cat(ordered, dim=seq_dim)
