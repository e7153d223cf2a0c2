"""Readable pure-PyTorch reference of every Lighthouse step: the oracle the fused kernels are tested against.

The four steps have the same names, signatures and layouts as those of the fused kernels (``lighthouse_kernels``),
so the op runs either through one dispatch point:

- ``pool_scores(q, k, levels, pooling_factor)``: q ``[B, N, H, D]``, k ``[B, N, H_kv, D]`` -> ``[B, H, N_tot]`` and
  ``[B, H_kv, N_tot]`` float32 scores;
- ``select_entries(score_q, score_k, seq_len, levels, pooling_factor, topk)`` -> ``[B, H, S]`` int64 indices (query
  head ``h`` scored against kv head ``h // (H / H_kv)``);
- ``gather_entries(q, k, v, indices, levels, pooling_factor)``: k/v ``[B, N, H_kv, D]`` -> three ``[B, H, S, D]``
  (differentiable; a kv head's gradient sums its query heads');
- ``scatter_to_tokens(out_sub, indices, seq_len, levels, pooling_factor)``: ``[B, H, S, D]`` -> ``[B, N, H, D]``
  (differentiable).
"""

from .pyramid import build_pyramid, gather_entries, pool_scores, pyramid_last_tokens
from .scatter import scatter_to_tokens
from .selection import select_entries

__all__ = ["build_pyramid", "gather_entries", "pool_scores", "pyramid_last_tokens", "scatter_to_tokens",
           "select_entries"]
