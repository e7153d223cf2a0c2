"""Fused Triton kernels around Lighthouse's dense attention (the dense part stays a stock kernel).

The four steps have the names, signatures and layouts of the pure-PyTorch oracle ``megatron_lighthouse.naive``,
which the tests compare them with; the op dispatches to either through one point. One concept per module:
``pool_score`` (norm scores of the whole pyramid in one pass), ``select`` (tile-local hierarchical top-K),
``gather`` (selected entries pooled from the tokens, grouped-query k/v read per kv head, and its backward, which
sums a kv head's query heads), ``scatter`` (causal shift and fan-out back to tokens, and its backward),
``functions`` (their autograd Functions), ``pyramid_index`` (the geometry and program prologue they share),
``launch`` (rows and warps per program). This package imports torch and Triton only.

Every pointer offset that can pass 2**31 elements (row, batch, head and token times a stride) is computed in int64.
:data:`MAX_TILE_ENTRIES` is the selection's limit on coarsest-level entries per tile: past it,
:func:`select_entries` raises a ``ValueError`` before any work.
"""

from .functions import gather_entries, scatter_to_tokens
from .pool_score import pool_scores
from .select import MAX_TILE_ENTRIES, select_entries

__all__ = ["MAX_TILE_ENTRIES", "gather_entries", "pool_scores", "scatter_to_tokens", "select_entries"]
