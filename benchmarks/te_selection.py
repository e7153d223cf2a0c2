"""Which backend TransformerEngine's ``DotProductAttention`` ran: shared by the benchmarks that time TE inside
the Lighthouse core attention (bench_core_attention.py, bench_cp.py). Imports nothing of TE itself."""

from __future__ import annotations

import sys


def te_backend() -> str:
    """The backend TransformerEngine's ``DotProductAttention`` selected for its last call, from TE's own selection
    state (``_attention_backends`` of its dot_product_attention module)."""
    module = sys.modules.get("transformer_engine.pytorch.attention.dot_product_attention.dot_product_attention")
    state = getattr(module, "_attention_backends", None)
    if not isinstance(state, dict):
        return "unknown (TransformerEngine's selection state not found)"
    if state.get("use_fused_attention"):
        return f"FusedAttention (cuDNN), sub-backend {state.get('fused_attention_backend')}"
    if state.get("use_flash_attention"):
        return f"FlashAttention {state.get('flash_attention_backend')}"
    if state.get("use_unfused_attention"):
        return "UnfusedDotProductAttention"
    return "none selected"
