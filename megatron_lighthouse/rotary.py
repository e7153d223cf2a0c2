"""Rotary position embedding of selected pyramid entries, as the published Lighthouse model applies it.

The reference model pools *un-rotated* q/k and rotates each selected entry (q and k alike) at the position of the
last token it covers. Rotating tokens first and pooling after (what a stock attention layer's order would give)
averages rotations: pooled entries lose their high-frequency components and carry no clean position. This module
gives :func:`~megatron_lighthouse.attention.lighthouse_attention` the entry rotation in Megatron's RoPE convention
(``t * cos(f) + rotate_half(t) * sin(f)``, ``f`` the per-dimension angles Megatron's ``RotaryEmbedding`` makes).
"""

from __future__ import annotations

from typing import Callable, Optional

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


class _TableRotary:
    """The :data:`EntryRotary` of one ``[s, R]`` table of angles (what :func:`entry_rotary` returns); its table is
    checked against the attention's q before any work (:func:`check_rotary`)."""

    def __init__(self, table: torch.Tensor, interleaved: bool, mscale: float) -> None:
        self.table, self.interleaved, self.mscale = table, interleaved, mscale

    def __call__(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if positions.shape != x.shape[:-1]:
            raise ValueError(f"rotary: positions {tuple(positions.shape)} must be x's {tuple(x.shape[:-1])}")
        return apply_rotary(x, self.table[positions], self.interleaved, self.mscale)


def entry_rotary(freqs: torch.Tensor, interleaved: bool = False, mscale: float = 1.0) -> EntryRotary:
    """The :data:`EntryRotary` of a Megatron rotary table.

    Args:
        freqs: Megatron's ``rotary_pos_emb`` for the sequence the attention sees, ``[s, 1, 1, R]`` (or ``[s, R]``)
            angles, ``s >= 1`` and ``R`` even; under context parallelism the rank's own shard, so local positions
            index it. The attention checks that it covers its sequence (``s >= N``) and head dim (``R <= D``).
        interleaved: ``config.rotary_interleaved``; mscale: Megatron's YaRN concentration factor (1 otherwise).
    """
    if not isinstance(freqs, torch.Tensor):
        raise ValueError(f"entry_rotary: freqs must be a torch.Tensor, got {type(freqs).__name__}")
    if (freqs.dim() not in (2, 4) or freqs.shape[1:-1] not in ((), (1, 1)) or freqs.shape[0] < 1
            or freqs.shape[-1] < 2 or freqs.shape[-1] % 2):
        raise ValueError(f"entry_rotary: freqs of shape {tuple(freqs.shape)}: must be Megatron's [s, 1, 1, R] (or "
                         f"[s, R]) rotary angles with s >= 1 and an even R >= 2")
    return _TableRotary(freqs.reshape(freqs.shape[0], freqs.shape[-1]), interleaved, mscale)


def is_table_rotary(rotary: Optional[EntryRotary]) -> bool:
    """Whether ``rotary`` is one of :func:`entry_rotary`: its table is checked before any work
    (:func:`check_rotary`) and its result keeps x's shape, dtype and device by construction."""
    return isinstance(rotary, _TableRotary)


def check_rotary(rotary: Optional[EntryRotary], q: torch.Tensor) -> None:
    """``ValueError`` unless ``rotary`` is ``None`` or an :data:`EntryRotary` callable; for one of
    :func:`entry_rotary`, also unless its table covers the positions of ``q`` ``[B, N, H, D]`` (``s >= N``), rotates
    at most ``D`` dims and is on ``q``'s device."""
    if rotary is not None and not callable(rotary):
        raise ValueError(f"rotary must be an EntryRotary, (x, positions) -> x rotated (e.g. entry_rotary(freqs)), or "
                         f"None, got {type(rotary).__name__}")
    if not is_table_rotary(rotary):
        return
    (s, r), n, d = rotary.table.shape, q.shape[1], q.shape[3]
    if s < n:
        raise ValueError(f"rotary= table of {s} positions: q has {n} tokens (it must cover every position, s >= N)")
    if r > d:
        raise ValueError(f"rotary= table of {r} angles per position: more than q's head dim {d} (it rotates the "
                         f"first R of D dims)")
    if rotary.table.device != q.device:
        raise ValueError(f"rotary= table on {rotary.table.device}: q is on {q.device}")
