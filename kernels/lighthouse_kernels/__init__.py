"""Fused Triton kernels around Lighthouse's dense attention (the dense part stays a stock kernel).

One concept per module: ``pool_score`` (norm scores of the whole pyramid in one pass), ``select`` (tile-local
hierarchical top-K), ``gather`` (selected entries pooled on the fly from the tokens, and its backward), ``scatter``
(causal shift and fan-out back to tokens, and its backward), ``dense`` (stock dense kernels), ``functions``
(autograd Functions and :func:`lighthouse_attention_triton`). The pure-PyTorch oracle is
``megatron_lighthouse.naive``; tests compare the two.
"""

from .dense import DENSE_KERNELS, FastestDense, dense_attention, pick_fastest
from .functions import (
    GatherFromTokens,
    ScatterToTokens,
    gather_from_tokens,
    inverse_map_for,
    lighthouse_attention_triton,
    scatter_to_tokens,
)
from .pool_score import pool_scores
from .select import select_indices_fused

__all__ = [
    "DENSE_KERNELS",
    "dense_attention",
    "FastestDense",
    "pick_fastest",
    "GatherFromTokens",
    "ScatterToTokens",
    "gather_from_tokens",
    "inverse_map_for",
    "lighthouse_attention_triton",
    "scatter_to_tokens",
    "pool_scores",
    "select_indices_fused",
]
