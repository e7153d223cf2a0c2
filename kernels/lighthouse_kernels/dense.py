"""Stock dense causal attention on the subsequence: torch SDPA (cuDNN / flash backends), FlashAttention 2 / 3.

Every kernel here follows the contract ``attention(q, k, v, softmax_scale) -> out``, all ``[B, H, S, D]``,
causal over ``S``.
"""

from __future__ import annotations

import importlib
from typing import Callable, Tuple

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

DenseAttention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]

#: Accepted ``dense`` names: ``"auto"`` (SDPA preferring cuDNN, then flash, on CUDA; plain SDPA elsewhere), ``"cudnn"``,
#: ``"flash"`` (SDPA's backends alone), ``"sdpa"`` (torch's own choice), ``"fa2"`` (``flash_attn``),
#: ``"fa3"`` (``flash_attn_interface``).
DENSE_KERNELS: Tuple[str, ...] = ("auto", "cudnn", "flash", "sdpa", "fa2", "fa3")


def _sdpa_with(backends):
    def attention(q, k, v, softmax_scale):
        with sdpa_kernel(backends, set_priority=True):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=softmax_scale)

    return attention


def _sdpa(q, k, v, softmax_scale):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=softmax_scale)


def _flash_attn(module_name: str) -> DenseAttention:
    func = importlib.import_module(module_name).flash_attn_func

    def attention(q, k, v, softmax_scale):
        out = func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=softmax_scale, causal=True)
        out = out[0] if isinstance(out, tuple) else out
        return out.transpose(1, 2)

    return attention


def dense_attention(name: str = "auto", device_type: str = "cuda") -> DenseAttention:
    """The dense causal kernel called ``name`` (see :data:`DENSE_KERNELS`) for tensors on ``device_type``."""
    if name not in DENSE_KERNELS:
        raise ValueError(f"dense={name!r}: must be one of {DENSE_KERNELS}")
    if name == "fa2":
        return _flash_attn("flash_attn")
    if name == "fa3":
        return _flash_attn("flash_attn_interface")
    if name == "sdpa" or (name == "auto" and device_type != "cuda"):
        return _sdpa
    if name == "flash":
        return _sdpa_with([SDPBackend.FLASH_ATTENTION])
    if name == "cudnn":
        return _sdpa_with([SDPBackend.CUDNN_ATTENTION])
    return _sdpa_with(
        [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    )
