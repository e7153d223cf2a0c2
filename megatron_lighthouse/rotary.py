"""Rotary position embedding of selected pyramid entries, as the published Lighthouse model applies it.

The reference model pools *un-rotated* q/k and rotates each selected entry (q and k alike) at the position of the
last token it covers. Rotating tokens first and pooling after (what a stock attention layer's order would give)
averages rotations: pooled entries lose their high-frequency components and carry no clean position. This module
gives :func:`~megatron_lighthouse.attention.lighthouse_attention` the entry rotation in Megatron's RoPE convention
(``t * cos(f) + rotate_half(t) * sin(f)``, ``f`` the per-dimension angles Megatron's ``RotaryEmbedding`` makes).
"""

from __future__ import annotations

from typing import Callable

import torch

#: ``rotary(x, positions) -> x rotated``: ``x`` ``[B, H, S, D]``, ``positions`` int64 ``[B, H, S]`` (the token
#: index, in the sequence given to the attention, of each entry's last token).
EntryRotary = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def rotate_half(x: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """``[..., D]`` -> ``[-x2, x1]`` halves (``interleaved``: pairs ``(2i, 2i+1)`` -> ``(-x_{2i+1}, x_{2i})``)."""
    if not interleaved:
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((-x2, x1), dim=-1)
    pairs = x.unflatten(-1, (-1, 2))
    return torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)


def apply_rotary(x: torch.Tensor, angles: torch.Tensor, interleaved: bool = False,
                 mscale: float = 1.0) -> torch.Tensor:
    """Rotate the first ``R = angles.shape[-1]`` dims of ``x`` ``[..., D]`` by ``angles`` (broadcast against
    ``x[..., :R]``, float32); the other ``D - R`` dims pass unchanged (Megatron's ``rotary_percent < 1``).
    Megatron's unfused RoPE formula, so token positions give exactly its result."""
    rot = angles.shape[-1]
    head, rest = x[..., :rot], x[..., rot:]
    cos = (torch.cos(angles) * mscale).to(x.dtype)
    sin = (torch.sin(angles) * mscale).to(x.dtype)
    return torch.cat((head * cos + rotate_half(head, interleaved) * sin, rest), dim=-1)


def entry_rotary(freqs: torch.Tensor, interleaved: bool = False, mscale: float = 1.0) -> EntryRotary:
    """The :data:`EntryRotary` of a Megatron rotary table.

    Args:
        freqs: Megatron's ``rotary_pos_emb`` for the sequence the attention sees, ``[s, 1, 1, R]`` (or ``[s, R]``)
            angles; under context parallelism the rank's own shard, so local positions index it.
        interleaved: ``config.rotary_interleaved``; mscale: Megatron's YaRN concentration factor (1 otherwise).
    """
    table = freqs.reshape(freqs.shape[0], freqs.shape[-1])

    def rotary(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if positions.shape != x.shape[:-1]:
            raise ValueError(f"rotary: positions {tuple(positions.shape)} must be x's {tuple(x.shape[:-1])}")
        return apply_rotary(x, table[positions], interleaved, mscale)

    return rotary
