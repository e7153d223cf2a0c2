"""A stock causal core attention for Megatron-Core on torch SDPA, with context parallelism.

Megatron's local ``DotProductAttention`` materialises the ``[b, h, s, s]`` score matrix and has no context
parallelism; :class:`SDPACoreAttention` is its drop-in replacement for long sequences without TransformerEngine
(torch picks the cuDNN / flash / memory-efficient / math kernel). With ``context_parallel_size > 1`` it runs
:func:`~megatron_lighthouse.context_parallel.cp_causal_attention` over the CP group (inputs in Megatron's
load-balanced layout). It also serves Megatron's static-batching inference: queries shorter than the cached keys
attend lower-right aligned (causal prefill continued), and after the prompt (``AttnMaskType.no_mask``) every query
attends to all cached keys.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_config import TransformerConfig

from .attention import expand_kv_heads
from .causal_core_attention import CausalCoreAttention, check_cp_comm_type
from .context_parallel import cp_causal_attention
from .lower_right_attention import lower_right_causal_attention


class SDPACoreAttention(CausalCoreAttention):
    """Causal self-attention core: ``query`` ``[s, b, h, d]``, ``key``/``value`` ``[s_k, b, g, d]`` -> ``[s, b, h*d]``.

    Any floating dtype. The softmax scale is ``softmax_scale`` or ``1/sqrt(kv_channels)``; ``attention_dropout``
    (default ``config.attention_dropout``) applies in training, not under context parallelism. No parameters.
    Refuses (``ValueError``) what :class:`~megatron_lighthouse.causal_core_attention.CausalCoreAttention` refuses,
    an ``attention_dropout`` outside ``[0, 1)``, packed (THD) sequences and ``softmax_type`` other than
    ``"vanilla"``.
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection: Optional[Any] = None,
    ) -> None:
        super().__init__(config, layer_number, attn_mask_type, attention_type, softmax_scale, pg_collection)
        check_cp_comm_type(cp_comm_type, config.context_parallel_size, self.where)
        softmax_type = getattr(config, "softmax_type", "vanilla")
        if softmax_type != "vanilla":
            raise ValueError(f"{self.where}: softmax_type={softmax_type!r}: not supported by the torch-SDPA core "
                             f"attention (plain softmax only); use TransformerEngine's core attention")
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        if isinstance(self.dropout_p, bool) or not isinstance(self.dropout_p, (int, float)) \
                or not 0 <= self.dropout_p < 1:
            name = "config.attention_dropout" if attention_dropout is None else "attention_dropout"
            raise ValueError(f"{self.where}: {name}={self.dropout_p!r}: must be a probability, 0 <= p < 1")
        if self.cp_group is not None and self.dropout_p > 0:
            raise ValueError(f"{self.where}: attention_dropout={self.dropout_p} with context_parallel_size="
                             f"{config.context_parallel_size}: dropout is not supported under context parallelism "
                             f"(set attention_dropout=0)")

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params: Optional[Any] = None,
    ) -> torch.Tensor:
        """``[s, b, h, d]`` query, ``[s_k, b, g, d]`` key/value -> ``[s, b, h*d]`` (``s <= s_k``)."""
        if packed_seq_params is not None:
            raise ValueError(f"{self.where}: packed (THD) sequences are not supported by the torch-SDPA core "
                             f"attention; use sbhd batches or TransformerEngine's core attention")
        mask_type = self.check_call(query, key, value, attention_mask, attn_mask_type, attention_bias)
        s, b, h, d = query.shape
        if s > key.shape[0]:
            raise ValueError(f"{self.where}: {s} queries for {key.shape[0]} keys: a causal query needs its own key")
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, expand_kv_heads(key, h), expand_kv_heads(value, h)))
        if self.cp_group is not None:
            out = cp_causal_attention(q, k, v, self.softmax_scale, self.cp_group)
        elif mask_type == AttnMaskType.no_mask:  # Megatron's inference after the prompt: every cached key
            if s >= k.shape[2]:
                raise ValueError(f"{self.where}: attn_mask_type=no_mask with {s} queries for {k.shape[2]} keys: only "
                                 f"Megatron's inference after the prompt (fewer queries than cached keys) drops the "
                                 f"causal mask")
            out = F.scaled_dot_product_attention(q, k, v, scale=self.softmax_scale)
        elif s < k.shape[2]:  # queries continuing a cached prefix: row i sees keys 0 .. s_k - s + i
            out = lower_right_causal_attention(q, k, v, self.softmax_scale)
        else:
            out = self._causal(q, k, v)
        return out.permute(2, 0, 1, 3).reshape(s, b, h * d)

    def _causal(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Square causal attention on ``[b, h, s, d]``, with dropout in training (Megatron's RNG tracker on CUDA)."""
        dropout = self.dropout_p if self.training else 0.0
        if dropout > 0 and q.is_cuda and tensor_parallel.get_cuda_rng_tracker().is_initialized():
            with tensor_parallel.get_cuda_rng_tracker().fork():
                return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True,
                                                      scale=self.softmax_scale)
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, scale=self.softmax_scale)
