"""A stock causal core attention for Megatron-Core on torch SDPA, with context parallelism.

Megatron's local ``DotProductAttention`` materialises the ``[b, h, s, s]`` score matrix and has no context
parallelism; :class:`SDPACoreAttention` is its drop-in replacement for long sequences without TransformerEngine
(torch picks the flash / memory-efficient / math kernel). With ``context_parallel_size > 1`` it runs
:func:`~megatron_lighthouse.context_parallel.cp_causal_attention` over the CP group (inputs in Megatron's
load-balanced layout).
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from .context_parallel import cp_causal_attention
from .transformer_config import context_parallel_group, unsupported_attention_settings


class SDPACoreAttention(MegatronModule):
    """Causal self-attention core: ``query`` ``[s, b, h, d]``, ``key``/``value`` ``[s, b, g, d]`` -> ``[s, b, h*d]``.

    ``h`` and ``g`` are this tensor-parallel rank's query and kv heads (``h % g == 0``). The softmax scale is
    ``softmax_scale`` or ``1/sqrt(kv_channels)``; ``attention_dropout`` (default ``config.attention_dropout``)
    applies in training. Causal masking is built in; ``attention_mask`` is ignored for the causal mask type, as
    TransformerEngine does. No parameters.
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
        **kwargs: Any,
    ) -> None:
        super().__init__(config=config)
        if attention_type != "self":
            raise ValueError(f"SDPACoreAttention: attention_type={attention_type!r}: only self-attention is supported")
        if attn_mask_type != AttnMaskType.causal:
            raise ValueError(f"SDPACoreAttention: attn_mask_type={attn_mask_type}: only causal attention is supported")
        unsupported = unsupported_attention_settings(config, layer_number)
        if getattr(config, "softmax_type", "vanilla") != "vanilla":
            unsupported.append(f"softmax_type={config.softmax_type!r}")
        if unsupported:
            raise ValueError(
                f"SDPACoreAttention (layer {layer_number}): {', '.join(unsupported)}: not supported by the torch-SDPA "
                f"core attention (plain causal softmax attention only); use TransformerEngine's core attention"
            )
        self.layer_number = layer_number
        self.attn_mask_type = attn_mask_type
        self.softmax_scale = 1.0 / math.sqrt(config.kv_channels) if softmax_scale is None else softmax_scale
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        self.cp_group = context_parallel_group(config, pg_collection, "SDPACoreAttention")
        if self.cp_group is not None and self.dropout_p > 0:
            raise ValueError(
                f"SDPACoreAttention: attention_dropout={self.dropout_p} with context_parallel_size="
                f"{config.context_parallel_size}: dropout is not supported under context parallelism "
                f"(set attention_dropout=0)"
            )

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params: Optional[Any] = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """``[s, b, h, d]`` query, ``[s, b, g, d]`` key/value -> ``[s, b, h*d]``, causal."""
        if packed_seq_params is not None:
            raise ValueError("SDPACoreAttention: packed (THD) sequences are not supported")
        if attention_bias is not None:
            raise ValueError("SDPACoreAttention: attention_bias is not supported")
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        if mask_type != AttnMaskType.causal:
            raise ValueError(f"SDPACoreAttention: attn_mask_type={mask_type}: only causal attention is supported")
        s, b, h, d = query.shape
        groups = h // key.shape[2]
        if groups > 1:
            key, value = key.repeat_interleave(groups, dim=2), value.repeat_interleave(groups, dim=2)
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))  # [b, h, s, d]
        if self.cp_group is not None:
            out = cp_causal_attention(q, k, v, self.softmax_scale, self.cp_group)
        else:
            dropout = self.dropout_p if self.training else 0.0
            tracker = tensor_parallel.get_cuda_rng_tracker()
            if dropout > 0 and q.is_cuda and tracker.is_initialized():
                with tracker.fork():
                    out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True,
                                                         scale=self.softmax_scale)
            else:
                out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True,
                                                     scale=self.softmax_scale)
        return out.permute(2, 0, 1, 3).reshape(s, b, h * d)
