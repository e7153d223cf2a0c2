"""Lighthouse settings and the constraints of the published method (spec section 8)."""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any, Tuple

#: Entries one selection tile picks per level (64 by query norm + 64 by key norm).
TILE_SELECT = 128
#: Entries picked by each of the two scores inside a tile.
TILE_HALF = TILE_SELECT // 2
#: Most coarsest-level entries one selection tile may span on the Triton backend: Triton's largest block
#: (``TRITON_MAX_TENSOR_NUMEL``, 2**20 elements), which holds a tile in the fused selection. The same limit as
#: ``lighthouse_kernels.MAX_TILE_ENTRIES``, kept here so that the op checks it without importing Triton.
MAX_TILE_ENTRIES = 2**20
#: Largest ``log2(pooling_factor**(levels-1))``: a sequence valid for the settings has at least ``TILE_SELECT *
#: pooling_factor**(levels-1)`` tokens (each tile needs 128 coarsest-level entries), and int64 token positions reach
#: ``2**63 - 1``, so that shortest sequence may be at most ``128 * 2**55 = 2**62`` tokens.
_MAX_STRIDE_BITS = 63 - TILE_SELECT.bit_length()
#: Largest count any setting or argument may hold (a sequence length, ``topk``, ``chunks``, a layer count or index):
#: the concatenated pyramid of an ``N``-token sequence has fewer than ``2 * N`` entries, indexed with int64.
MAX_COUNT = 2**62

_SCORERS = ("norm",)
#: Where a Lighthouse layer applies rotary position embedding (see :class:`LighthouseConfig`).
ROPE_PLACEMENTS = ("entries", "tokens")


def _is_power_of_two(x: int) -> bool:
    return x > 0 and (x & (x - 1)) == 0


def _fits(config: LighthouseConfig, seq_len: int, chunks: int) -> bool:
    try:
        config.validate(seq_len, chunks)
    except ValueError:
        return False
    return True


def check_int(name: str, value: Any, low: int = 1) -> int:
    """``value`` as an ``int`` when it is an integer (``numbers.Integral``, numpy's too; not a bool) in
    ``[low, MAX_COUNT]``; else ``ValueError`` naming ``name``, the value and the rule. The one check of every count
    the settings and the op take (sequence lengths, ``chunks``, head and layer counts)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{name}={value!r}: must be " + ("a positive int" if low == 1 else f"an int >= {low}"))
    if value > MAX_COUNT:
        raise ValueError(f"{name}={value!r}: must be at most 2**62 (token positions of the pyramid are int64)")
    return int(value)


@dataclasses.dataclass(frozen=True)
class LighthouseConfig:
    """Settings of Lighthouse attention.

    Args:
        levels: pyramid levels ``L`` (level 0 is the token level), ``>= 2``, with ``pooling_factor**(L-1) <= 2**55``
            (the shortest sequence valid for the settings, ``128 * pooling_factor**(L-1)`` tokens, stays in int64).
        pooling_factor: ``p``, tokens pooled per step up the pyramid; a power of two in ``[2, 64]``.
        topk: global selection budget ``k``; a multiple of 128 (one tile selects 128 per level).
        scorer: entry scorer; only ``"norm"`` (the published default) is implemented.
        dense_layers: attention layers that keep full attention, 0-based, negative counts from the end (the paper
            keeps the first two and the last two dense): in a GPT model its layers, in a Megatron-Core hybrid
            stack its attention layers (``*``) only, whatever lies between them.
        rope: where Lighthouse layers of a RoPE model apply it. ``"entries"`` (the published model): q/k are
            pooled and selected un-rotated and every selected entry is rotated at the position of the last token
            it covers (needs :class:`~megatron_lighthouse.self_attention.LighthouseSelfAttention`, which the spec
            provider builds). ``"tokens"``: Megatron's order, tokens rotated before pooling, so pooled entries
            average rotations (for checkpoints trained that way). Dense layers, and the model once
            Lighthouse is switched off, use Megatron's RoPE either way.

    The sequence-dependent rules are checked by :meth:`validate`.
    """

    levels: int = 3
    pooling_factor: int = 4
    topk: int = 2048
    scorer: str = "norm"
    dense_layers: Tuple[int, ...] = (0, 1, -2, -1)
    rope: str = "entries"

    def __post_init__(self) -> None:
        for name in ("levels", "pooling_factor", "topk"):
            value = getattr(self, name)
            if not isinstance(value, numbers.Integral) or isinstance(value, bool):
                raise ValueError(f"LighthouseConfig.{name}={value!r}: must be an int")
            object.__setattr__(self, name, int(value))
        if self.levels < 2:
            raise ValueError(f"LighthouseConfig.levels={self.levels}: must be >= 2 (level 0 is the token level)")
        if not _is_power_of_two(self.pooling_factor) or not 2 <= self.pooling_factor <= TILE_HALF:
            raise ValueError(
                f"LighthouseConfig.pooling_factor={self.pooling_factor}: must be a power of two with "
                f"2 <= pooling_factor <= {TILE_HALF}"
            )
        stride_bits = self.pooling_factor.bit_length() - 1
        if (self.levels - 1) * stride_bits > _MAX_STRIDE_BITS:
            raise ValueError(
                f"LighthouseConfig.levels={self.levels} with pooling_factor={self.pooling_factor}: "
                f"pooling_factor**(levels-1) must be <= 2**{_MAX_STRIDE_BITS}, i.e. levels <= "
                f"{1 + _MAX_STRIDE_BITS // stride_bits} (a valid sequence has >= {TILE_SELECT} * "
                f"pooling_factor**(levels-1) tokens, which int64 positions must index)"
            )
        if self.topk < TILE_SELECT or self.topk % TILE_SELECT != 0 or self.topk > MAX_COUNT:
            raise ValueError(
                f"LighthouseConfig.topk={self.topk}: must be a positive multiple of {TILE_SELECT} "
                f"(each selection tile picks {TILE_SELECT} entries per level), at most 2**62"
            )
        if self.rope not in ROPE_PLACEMENTS:
            raise ValueError(f"LighthouseConfig.rope={self.rope!r}: must be one of {ROPE_PLACEMENTS}")
        if self.scorer not in _SCORERS:
            raise ValueError(f"LighthouseConfig.scorer={self.scorer!r}: must be one of {_SCORERS}")
        layers = self.dense_layers
        items = None if isinstance(layers, (str, bytes)) or not hasattr(layers, "__iter__") else tuple(layers)
        if items is None or not all(isinstance(i, numbers.Integral) and not isinstance(i, bool) and abs(i) <= MAX_COUNT
                                    for i in items):
            raise ValueError(f"LighthouseConfig.dense_layers={layers!r}: must be a sequence of ints (0-based layer "
                             f"indices, negative from the end), e.g. (0, 1, -2, -1)")
        object.__setattr__(self, "dense_layers", tuple(int(i) for i in items))

    @classmethod
    def for_sequence(cls, seq_len: int, *, chunks: int = 1, max_top_level: int = 16384,
                     **fields) -> "LighthouseConfig":
        """The settings with the fewest ``levels`` whose top level has at most ``max_top_level`` entries per chunk:
        the pyramid grows with the sequence, so the subsequence ``S = N/p**(L-1) + (L-1)*p*k`` stays bounded and
        the cost stays near-linear in ``N``. A fixed ``levels`` lets ``S`` grow as ``N/p**(L-1)``, and the dense
        attention on it quadratically. (``p=4``: ``L=2`` up to 64K tokens, ``L=3`` to 256K, ``L=4`` to 1M,
        ``L=5`` to 4M.)

        ``fields`` are the other settings (``pooling_factor``, ``topk``, ...); ``ValueError`` when no ``levels``
        fits ``seq_len`` (see :meth:`validate`), or none within ``max_top_level`` does while fewer levels would.
        """
        if "levels" in fields:
            raise ValueError("LighthouseConfig.for_sequence chooses levels itself; give the other settings only")
        unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"LighthouseConfig.for_sequence: {', '.join(unknown)}: not a setting; the settings: "
                             f"{', '.join(f.name for f in dataclasses.fields(cls) if f.name != 'levels')}")
        seq_len, chunks = check_int("seq_len", seq_len), check_int("chunks", chunks)
        check_int("max_top_level", max_top_level)
        base = cls(**fields)
        chunk_len = seq_len // chunks
        levels = 2
        while chunk_len // base.pooling_factor ** (levels - 1) > max_top_level:
            levels += 1
        config = dataclasses.replace(base, levels=levels)
        try:
            config.validate(seq_len, chunks)
        except ValueError:
            # more levels only shrink the top level further; if fewer levels fit, max_top_level is what fails
            fewer = next((n for n in range(levels - 1, 1, -1)
                          if _fits(dataclasses.replace(base, levels=n), seq_len, chunks)), None)
            if fewer is None:
                raise
            top = chunk_len // base.pooling_factor ** (fewer - 1)
            raise ValueError(
                f"max_top_level={max_top_level}: too small for sequence length {seq_len}"
                + (f" in {chunks} chunks" if chunks > 1 else "")
                + f": levels={levels}, the fewest with at most {max_top_level} top-level entries per chunk, leaves "
                f"{chunk_len // config.coarsest_stride}, and the top level must split evenly into the "
                f"{config.tiles(chunks)} selection tiles of >= {TILE_SELECT} entries each; levels={fewer} fits "
                f"with {top}: use max_top_level >= {top}"
            ) from None
        return config

    # ------------------------------------------------------------------ geometry
    @property
    def coarsest_stride(self) -> int:
        """Tokens covered by one coarsest-level entry, ``p**(L-1)``."""
        return self.pooling_factor ** (self.levels - 1)

    def tiles(self, chunks: int = 1) -> int:
        """Selection tiles per chunk, ``T = (topk / chunks) / 128``; ``ValueError`` unless ``chunks`` is a positive
        int that leaves each chunk a multiple of 128 of ``topk``."""
        chunks = check_int("chunks", chunks)
        if self.topk % (chunks * TILE_SELECT) != 0:
            raise ValueError(
                f"topk={self.topk} with chunks={chunks}: the per-chunk budget topk/chunks must be a multiple of "
                f"{TILE_SELECT} (topk must be a multiple of {chunks * TILE_SELECT})"
            )
        return self.topk // chunks // TILE_SELECT

    def tile_entries(self, seq_len: int, chunks: int = 1) -> int:
        """Coarsest-level entries each selection tile spans, ``seq_len / chunks / pooling_factor**(levels-1) / T``
        (``ValueError`` unless the settings are valid for ``seq_len``, see :meth:`validate`)."""
        self.validate(seq_len, chunks)
        return seq_len // chunks // (self.coarsest_stride * self.tiles(chunks))

    def validate(self, seq_len: int, chunks: int = 1) -> None:
        """Raise ``ValueError`` unless ``seq_len`` (split into ``chunks``) fits these settings."""
        tiles = self.tiles(chunks)
        seq_len = check_int("seq_len", seq_len)
        if seq_len % chunks != 0:
            raise ValueError(f"sequence length {seq_len}: must be divisible by chunks={chunks}")
        chunk_len = seq_len // chunks
        unit = self.coarsest_stride * tiles
        what = (f"sequence length {seq_len}" if chunks == 1
                else f"chunk length {chunk_len} (sequence {seq_len} / chunks {chunks})")
        if chunk_len % unit != 0:
            shortest = TILE_SELECT * unit * chunks
            raise ValueError(
                f"{what}: must be divisible by pooling_factor**(levels-1) * tiles = "
                f"{self.pooling_factor}**{self.levels - 1} * {tiles} = {unit} "
                f"(tiles = topk/chunks/{TILE_SELECT})"
                + (f" and at least {shortest} (each tile needs >= {TILE_SELECT} coarsest-level entries)"
                   if seq_len < shortest else "")
                + f"; nearest valid lengths: {self.suggest_lengths(seq_len, chunks)}"
            )
        per_tile = chunk_len // unit
        if per_tile < TILE_SELECT:
            raise ValueError(
                f"{what}: each tile owns {per_tile} coarsest-level entries, needs >= {TILE_SELECT}; "
                f"use a sequence length >= {TILE_SELECT * unit * chunks} or lower topk/levels/pooling_factor"
            )

    def suggest_lengths(self, seq_len: int, chunks: int = 1) -> Tuple[int, ...]:
        """The valid sequence lengths nearest to ``seq_len`` (for error messages)."""
        seq_len = check_int("seq_len", seq_len)
        step = self.coarsest_stride * self.tiles(chunks) * chunks
        shortest = TILE_SELECT * step
        if seq_len <= shortest:
            return (shortest,)
        return tuple(sorted({seq_len // step * step, -(-seq_len // step) * step}))

    def subsequence_length(self, seq_len: int, chunks: int = 1) -> int:
        """Length ``S`` of the selected subsequence: ``N/p**(L-1) + (L-1)*p*k`` (summed over chunks)."""
        self.validate(seq_len, chunks)
        return seq_len // self.coarsest_stride + (self.levels - 1) * self.pooling_factor * self.topk

    def attention_cost(self, seq_len: int, num_heads: int, head_dim: int, chunks: int = 1) -> dict:
        """Forward FLOPs of causal attention, dense vs. Lighthouse, per sequence.

        Causal attention does ``2 * 2 * n**2 / 2 * d`` multiply-adds per head (QK^T and PV, half masked).
        Returns ``{"subsequence_length", "dense_flops", "lighthouse_flops", "ratio"}``.
        """
        check_int("num_heads", num_heads)
        check_int("head_dim", head_dim)
        s = self.subsequence_length(seq_len, chunks)
        dense = 2.0 * seq_len * seq_len * head_dim * num_heads
        sparse = 2.0 * s * s * head_dim * num_heads
        return {
            "subsequence_length": s,
            "dense_flops": dense,
            "lighthouse_flops": sparse,
            "ratio": sparse / dense,
        }

    def dense_layer_set(self, num_layers: int, unit: str = "layers") -> frozenset:
        """0-based layer indices kept dense in a model of ``num_layers`` attention layers (every layer of a GPT
        model; the ``*`` layers of a hybrid stack, see :mod:`~megatron_lighthouse.hybrid_pattern`); ``unit`` names
        what ``num_layers`` counts in the error of an entry out of range."""
        num_layers = check_int("num_layers", num_layers)
        out = set()
        for i in self.dense_layers:
            j = i + num_layers if i < 0 else i
            if not 0 <= j < num_layers:
                raise ValueError(
                    f"LighthouseConfig.dense_layers entry {i}: out of range for a model of {num_layers} {unit}"
                )
            out.add(j)
        return frozenset(out)


def level_offsets(seq_len: int, levels: int, pooling_factor: int) -> Tuple[int, ...]:
    """Offsets of each level in the concatenated pyramid, plus its total length as the last entry."""
    offsets = [0]
    for level in range(levels):
        offsets.append(offsets[-1] + seq_len // pooling_factor**level)
    return tuple(offsets)
