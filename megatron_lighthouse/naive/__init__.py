"""Readable pure-PyTorch reference of every Lighthouse step: the oracle the fused kernels are tested against."""

from .pyramid import build_pyramid, pyramid_last_tokens, pyramid_scores
from .scatter import scatter_to_tokens
from .selection import select_pyramid_indices

__all__ = ["build_pyramid", "pyramid_last_tokens", "pyramid_scores", "select_pyramid_indices", "scatter_to_tokens"]
