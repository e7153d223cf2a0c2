"""Tile-local bidirectional hierarchical top-K (spec section 3) as one Triton program per (batch*head, tile).

Same result as the naive oracle's ``select_entries`` (ties toward the lower candidate position),
with no sort at all. Inside its tile a program:

1. selects level by level, coarsest first: the 64 candidates with the largest query score, then the 64 largest key
   scores among the rest. The 64th largest is found exactly by a bitwise search over the order-preserving int32
   image of the fp32 score, then over candidate positions among tied scores;
2. computes bottom-up the size of every selected entry's subtree (itself plus all emitted entries below it);
3. places every emitted entry top-down: an entry's subtree follows its earlier siblings' subtrees and the entry
   itself is the last of its subtree (the spec's key puts a selected entry just before the end of its span), so
   the tile's slice of the ``[B, H, S]`` output is written in key order directly. Tiles own contiguous key
   ranges, so tile order is global order.

Per-level lists (selected entries, subtree sizes and starts, choices) go through a small per-program scratch
buffer, behind barriers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .pyramid_index import next_level, pyramid_size

#: Entries one selection tile picks per level: 64 by query score, then 64 by key score (the published method's
#: tile; ``megatron_lighthouse.config.TILE_SELECT`` is the same number, checked by the tests).
TILE_SELECT = 128
TILE_HALF = TILE_SELECT // 2
#: Most coarsest-level entries one selection tile may own: a program holds its tile's entries in one Triton block,
#: and Triton caps a block at 2**20 elements (``triton.language.TRITON_MAX_TENSOR_NUMEL``). A tile owns
#: ``seq_len / pooling_factor**(levels-1) / (topk / TILE_SELECT)`` entries; :func:`select_entries` refuses more.
MAX_TILE_ENTRIES = 2**20


@triton.jit
def _ordered(score):
    """Order-preserving int32 image of fp32 scores (-0.0 maps like +0.0, as float comparison treats them)."""
    bits = (score + 0.0).to(tl.int32, bitcast=True)
    return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


@triton.jit
def _top_half(key, pos, valid, HALF: tl.constexpr, POS_BITS: tl.constexpr):
    """Mask of the ``HALF`` valid entries with the largest ``key``, ties toward the lower ``pos`` (unique, >= 0).

    Needs at least ``HALF`` valid entries and ``pos < 2**POS_BITS``.
    """
    # Largest t with at least HALF keys >= t: the sign first, then the remaining 31 bits from the top.
    n_nonneg = tl.sum(((key >= 0) & valid).to(tl.int32), axis=0)
    t = tl.where(n_nonneg >= HALF, 0, -2147483648)
    for i in range(31):
        trial = t + (1 << (30 - i))
        t = tl.where(tl.sum(((key >= trial) & valid).to(tl.int32), axis=0) >= HALF, trial, t)
    above = valid & (key > t)
    tied = valid & (key == t)
    need = HALF - tl.sum(above.to(tl.int32), axis=0)
    # The need-th smallest position among the ties: the largest c with fewer than `need` tied positions below c.
    cut = need * 0
    for i in range(POS_BITS):
        trial = cut + (1 << (POS_BITS - 1 - i))
        cut = tl.where(tl.sum((tied & (pos < trial)).to(tl.int32), axis=0) < need, trial, cut)
    return above | (tied & (pos <= cut))


@triton.jit
def _exclusive_cumsum(x, axis: tl.constexpr):
    return tl.cumsum(x, axis=axis) - x


@triton.jit
def _level_offset(seq_len, level: tl.constexpr, P: tl.constexpr):
    """Offset of ``level`` in the concatenated pyramid of ``seq_len`` tokens."""
    offset = 0
    width = seq_len
    span = 1
    for _ in tl.static_range(level):
        offset, width, span = next_level(offset, width, span, P)
    return offset


@triton.jit
def _children(parents, P: tl.constexpr, SEL: tl.constexpr):
    """Children of ``SEL`` entries, in order: ``[SEL * P]``."""
    return tl.reshape(parents[:, None] * P + tl.arange(0, P)[None, :], (SEL * P,))


@triton.jit
def _select_kernel(sq_ptr, sk_ptr, out_ptr, work_ptr, seq_len, total, per_tile, S, group,
                   P: tl.constexpr, LEVELS: tl.constexpr, HALF: tl.constexpr, BLOCK_C: tl.constexpr,
                   C_BITS: tl.constexpr, W_BITS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # widened once: row * total and row * S exceed 2**31 on long sequences
    tile = tl.program_id(1)
    SEL: tl.constexpr = 2 * HALF
    WIDE: tl.constexpr = SEL * P
    # Scratch of one level: selected entries | their subtree sizes | their subtree starts | candidate choices.
    SLOT: tl.constexpr = 3 * SEL + WIDE
    work = work_ptr + (row * tl.num_programs(1) + tile) * (LEVELS * SLOT)
    base = row * total
    # The key scores of this query head's kv head: row b*H + h reads b*H_kv + h // group, i.e. row // group.
    base_k = row // group * total
    sel = tl.arange(0, SEL)
    wide = tl.arange(0, WIDE)
    top_offset = _level_offset(seq_len, LEVELS - 1, P)
    first = tile * per_tile

    # 1. Selection, coarsest level: the tile's per_tile entries.
    loc = tl.arange(0, BLOCK_C)
    ok = loc < per_tile
    top = first + loc
    key = _ordered(tl.load(sq_ptr + base + top_offset + top, mask=ok, other=0.0))
    top_chosen = _top_half(key, loc, ok, HALF, C_BITS)
    key = _ordered(tl.load(sk_ptr + base_k + top_offset + top, mask=ok, other=0.0))
    top_chosen = top_chosen | _top_half(key, loc, ok & ~top_chosen, HALF, C_BITS)
    top_rank = _exclusive_cumsum(top_chosen.to(tl.int32), 0)
    tl.store(work + (LEVELS - 1) * SLOT + top_rank, top, mask=top_chosen)
    tl.debug_barrier()
    # Finer levels: the children of the entries selected above.
    for level in tl.static_range(LEVELS - 2, 0, -1):
        offset = _level_offset(seq_len, level, P)
        cand = _children(tl.load(work + (level + 1) * SLOT + sel), P, SEL)
        key = _ordered(tl.load(sq_ptr + base + offset + cand))
        chosen = _top_half(key, wide, wide >= 0, HALF, W_BITS)
        key = _ordered(tl.load(sk_ptr + base_k + offset + cand))
        chosen = chosen | _top_half(key, wide, ~chosen, HALF, W_BITS)
        tl.store(work + level * SLOT + _exclusive_cumsum(chosen.to(tl.int32), 0), cand, mask=chosen)
        tl.store(work + level * SLOT + 3 * SEL + wide, chosen.to(tl.int32))
        tl.debug_barrier()

    # 2. Subtree sizes, bottom-up: a selected level-1 entry has its P tokens below it.
    tl.store(work + SLOT + SEL + sel, tl.full((SEL,), 1 + P, tl.int32))
    tl.debug_barrier()
    for upper in tl.static_range(2, LEVELS):
        chosen = tl.load(work + (upper - 1) * SLOT + 3 * SEL + wide) > 0
        rank = _exclusive_cumsum(chosen.to(tl.int32), 0)
        size = tl.load(work + (upper - 1) * SLOT + SEL + rank, mask=chosen, other=1)
        tl.store(work + upper * SLOT + SEL + sel, 1 + tl.sum(tl.reshape(size, (SEL, P)), axis=1))
        tl.debug_barrier()

    # 3. Placement, top-down: subtree start = parent's start + earlier siblings' sizes; entry = its subtree's end.
    out = out_ptr + row * S + tile * (per_tile + (LEVELS - 1) * WIDE)
    size = tl.load(work + (LEVELS - 1) * SLOT + SEL + top_rank, mask=top_chosen, other=1)
    start = _exclusive_cumsum(size, 0)
    tl.store(out + start + size - 1, (top + top_offset).to(tl.int64), mask=ok)
    tl.store(work + (LEVELS - 1) * SLOT + 2 * SEL + top_rank, start, mask=top_chosen)
    tl.debug_barrier()
    for finer in tl.static_range(LEVELS - 2, 0, -1):
        cand = _children(tl.load(work + (finer + 1) * SLOT + sel), P, SEL)
        chosen = tl.load(work + finer * SLOT + 3 * SEL + wide) > 0
        rank = _exclusive_cumsum(chosen.to(tl.int32), 0)
        size = tl.load(work + finer * SLOT + SEL + rank, mask=chosen, other=1)
        siblings = _exclusive_cumsum(tl.reshape(size, (SEL, P)), 1)
        start = tl.reshape(tl.load(work + (finer + 1) * SLOT + 2 * SEL + sel)[:, None] + siblings, (WIDE,))
        tl.store(out + start + size - 1, (cand + _level_offset(seq_len, finer, P)).to(tl.int64))
        tl.store(work + finer * SLOT + 2 * SEL + rank, start, mask=chosen)
        tl.debug_barrier()
    tokens = _children(tl.load(work + SLOT + sel), P, SEL)
    start = tl.load(work + SLOT + 2 * SEL + sel)
    tl.store(out + tl.reshape(start[:, None] + tl.arange(0, P)[None, :], (WIDE,)), tokens.to(tl.int64))


def _tile_entries(seq_len: int, levels: int, pooling_factor: int, topk: int) -> int:
    """The coarsest-level entries each selection tile owns, ``seq_len / pooling_factor**(levels-1) / (topk /
    TILE_SELECT)``; ``ValueError`` past :data:`MAX_TILE_ENTRIES` (the Triton kernel's limit). Pure arithmetic."""
    coarsest = seq_len // pooling_factor ** (levels - 1)
    tiles = max(1, topk // TILE_SELECT)
    per_tile = coarsest // tiles
    if per_tile > MAX_TILE_ENTRIES:
        raise ValueError(
            f"Triton selection: each tile would own {per_tile} coarsest-level entries (seq_len={seq_len} / "
            f"pooling_factor**(levels-1)={pooling_factor ** (levels - 1)} = {coarsest} entries over topk/{TILE_SELECT}"
            f" = {tiles} tile(s)), more than the kernel's limit MAX_TILE_ENTRIES={MAX_TILE_ENTRIES} (2**20, Triton's "
            f"largest block); raise topk (more tiles), levels or pooling_factor so that "
            f"seq_len / pooling_factor**(levels-1) / (topk/{TILE_SELECT}) <= {MAX_TILE_ENTRIES}")
    return per_tile


@torch.no_grad()
def select_entries(score_q: torch.Tensor, score_k: torch.Tensor, seq_len: int, levels: int,
                         pooling_factor: int, topk: int) -> torch.Tensor:
    """``[B, H, N_tot]`` query and ``[B, H_kv, N_tot]`` key scores (float32, ``H % H_kv == 0``; query head ``h``
    is scored against kv head ``h // (H / H_kv)``) -> ``[B, H, S]`` int64 pyramid positions in causal order.

    The naive oracle's ``select_entries``, same signature; the settings must be valid for ``seq_len``
    (``LighthouseConfig.validate``), and a tile may own at most :data:`MAX_TILE_ENTRIES` coarsest entries
    (checked here before any work: ``ValueError``, as are scores that do not fit together or with ``seq_len``).
    """
    b, h, total = score_q.shape
    p = pooling_factor
    if total != pyramid_size(seq_len, levels, p):
        raise ValueError(f"scores of {total} pyramid entries do not match seq_len={seq_len}, levels={levels}, p={p}")
    if score_k.dim() != 3 or (score_k.shape[0], score_k.shape[2]) != (b, total) or h % score_k.shape[1]:
        raise ValueError(f"score_k {tuple(score_k.shape)} must be [B, H_kv, N_tot] with H % H_kv == 0 beside "
                         f"score_q {tuple(score_q.shape)} ([B, H, N_tot])")
    per_tile = _tile_entries(seq_len, levels, p, topk)
    tiles = topk // TILE_SELECT
    wide = TILE_SELECT * p
    s = tiles * (per_tile + (levels - 1) * wide)
    out = torch.empty(b, h, s, dtype=torch.int64, device=score_q.device)
    work = torch.empty(b * h * tiles, levels * (3 * TILE_SELECT + wide), dtype=torch.int32, device=score_q.device)
    block_c = triton.next_power_of_2(per_tile)
    _select_kernel[(b * h, tiles)](
        score_q.contiguous(), score_k.contiguous(), out, work, seq_len, total, per_tile, s, h // score_k.shape[1],
        P=p, LEVELS=levels, HALF=TILE_HALF, BLOCK_C=block_c, C_BITS=block_c.bit_length() - 1,
        W_BITS=wide.bit_length() - 1, num_warps=min(16, max(4, block_c // 256)),
    )
    return out
