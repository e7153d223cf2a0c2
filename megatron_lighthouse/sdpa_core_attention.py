"""A stock causal core attention for Megatron-Core on torch SDPA, with context parallelism.

Megatron's local ``DotProductAttention`` materialises the ``[b, h, s, s]`` score matrix and has no context
parallelism; :class:`SDPACoreAttention` is its drop-in replacement for long sequences without TransformerEngine.
Square causal attention runs the package's dense-kernel policy (:mod:`megatron_lighthouse.dense`): on CUDA in
fp16/bf16 without dropout, the kernel ``LIGHTHOUSE_DENSE_KERNEL`` names, by default ``"auto"``, the fastest stock
kernel for the shape (cuDNN or flash SDPA, FlashAttention 2/3 when installed), timed once; elsewhere torch SDPA's
own choice. With ``context_parallel_size > 1`` it runs
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
from .dense import dense_attention, dense_kernel_from_env, fused_kernel_applies
from .lower_right_attention import lower_right_causal_attention


class SDPACoreAttention(CausalCoreAttention):
    """Causal self-attention core: ``query`` ``[s, b, h, d]``, ``key``/``value`` ``[s_k, b, g, d]`` -> ``[s, b, h*d]``.

    Any floating dtype. The softmax scale is ``softmax_scale`` or ``1/sqrt(kv_channels)``; ``attention_dropout``
    (default ``config.attention_dropout``) applies in training, not under context parallelism. No parameters.
    :attr:`dense_kernel` is the dense-kernel policy, read from ``LIGHTHOUSE_DENSE_KERNEL`` when the module is built.
    Refuses (``ValueError``) what :class:`~megatron_lighthouse.causal_core_attention.CausalCoreAttention` refuses,
    an ``attention_dropout`` outside ``[0, 1)``, a ``LIGHTHOUSE_DENSE_KERNEL`` that is no dense kernel, packed (THD)
    sequences and ``softmax_type`` other than ``"vanilla"``.
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
        try:
            #: The dense kernel of square causal calls: a name of :data:`~megatron_lighthouse.dense.DENSE_KERNELS`.
            self.dense_kernel = dense_kernel_from_env()
        except ValueError as err:
            raise ValueError(f"{self.where}: {err}") from None

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
            out = self.causal_attention(q, k, v)  # over the CP group
        elif mask_type == AttnMaskType.no_mask:  # Megatron's inference after the prompt: every cached key
            if s >= k.shape[2]:
                raise ValueError(f"{self.where}: attn_mask_type=no_mask with {s} queries for {k.shape[2]} keys: only "
                                 f"Megatron's inference after the prompt (fewer queries than cached keys) drops the "
                                 f"causal mask")
            out = F.scaled_dot_product_attention(q, k, v, scale=self.softmax_scale)
        elif s < k.shape[2]:  # queries continuing a cached prefix: row i sees keys 0 .. s_k - s + i
            out = lower_right_causal_attention(q, k, v, self.softmax_scale)
        else:
            out = self.causal_attention(q, k, v)
        return out.permute(2, 0, 1, 3).reshape(s, b, h * d)

    def causal_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Causal attention of ``[b, h, s, d]`` q/k/v (one head count, one length, any strides) -> ``[b, h, s, d]``:
        over the context-parallel group when there is one, else square causal attention by the dense-kernel policy.

        The dense-kernel function that :class:`~megatron_lighthouse.core_attention.LighthouseCoreAttention` calls
        on its subsequence directly, without the ``[s, b, h, d]`` round trip of :meth:`forward`.
        """
        if self.cp_group is not None:
            return cp_causal_attention(q, k, v, self.softmax_scale, self.cp_group)
        dropout = self.dropout_p if self.training else 0.0
        capturing = q.is_cuda and torch.cuda.is_current_stream_capturing()
        if fused_kernel_applies(q.device.type, q.dtype, dropout, capturing):
            # The kernel is named here, not left to SDPA, whose pick depends on process state rather than on this
            # call: torch >= 2.10 puts cuDNN ahead of FlashAttention only with a runtime cuDNN above 9.15, and in a
            # process that imported TransformerEngine (Megatron-Core does whenever it is installed) TE's own cuDNN
            # (9.14 with TE 2.20.2) is the runtime one, so SDPA ran FlashAttention 2, about 1.5x slower than cuDNN on
            # an H100 (docs/BENCHMARKS.md). Deterministic mode and dropout steer it too.
            return dense_attention(self.dense_kernel)(q, k, v, self.softmax_scale)
        return self._sdpa_causal(q, k, v, dropout)

    def _sdpa_causal(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout: float) -> torch.Tensor:
        """Square causal attention by SDPA's own choice, with ``dropout`` (Megatron's RNG tracker on CUDA)."""
        if dropout > 0 and q.is_cuda and tensor_parallel.get_cuda_rng_tracker().is_initialized():
            with tensor_parallel.get_cuda_rng_tracker().fork():
                return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True,
                                                      scale=self.softmax_scale)
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, scale=self.softmax_scale)
