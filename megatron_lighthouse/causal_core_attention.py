"""What every core attention of this package shares: Megatron-Core's causal self-attention contract.

:class:`CausalCoreAttention` is the base of :class:`~megatron_lighthouse.sdpa_core_attention.SDPACoreAttention`
and :class:`~megatron_lighthouse.core_attention.LighthouseCoreAttention`. Both take ``query`` ``[s, b, h, d]`` and
``key``/``value`` ``[s_k, b, g, d]`` (``h`` and ``g`` this tensor-parallel rank's query and key/value heads,
``h % g == 0``) and return ``[s, b, h * d]``. The base checks, with one ``ValueError`` naming the setting and the
rule, what neither can serve: at construction cross-attention, non-causal mask types, a layer number below 1,
``config.num_attention_heads`` not a multiple of ``config.num_query_groups``, a non-positive or non-finite softmax
scale, sliding windows, ``qk_clip`` / ``log_max_attention_logit`` and a context-parallel group whose size is not
``config.context_parallel_size``; at each call ``query`` / ``key`` / ``value`` that are not 4-D or whose query heads
are not a multiple of their key/value heads, an attention bias and an ``attention_mask`` other than the plain causal
one (padding and document masks).
"""

from __future__ import annotations

from typing import Any, List, Optional

import torch
from megatron.core import parallel_state
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import is_layer_window_attention

from .attention import resolve_softmax_scale
from .cp_layout import split_for_cp

#: Context-parallel communication types of TransformerEngine's ``DotProductAttention`` (Megatron passes
#: ``--cp-comm-type`` through to it unchanged).
TE_CP_COMM_TYPES = ("p2p", "all_gather", "a2a", "a2a+p2p")


class CausalCoreAttention(MegatronModule):
    """Base of this package's core attentions: construction checks, per-call guards, GQA and CP group.

    Args:
        config: the layer's ``TransformerConfig``.
        layer_number: Megatron's 1-based global layer number.
        attn_mask_type: must be ``AttnMaskType.causal``.
        attention_type: must be ``"self"``.
        softmax_scale: ``None`` for ``1/sqrt(config.kv_channels)``; else a finite float > 0.
        pg_collection: Megatron's process groups; its ``cp`` is the context-parallel group (default: Megatron's
            global one when ``config.context_parallel_size > 1``).
        check_window: refuse sliding-window attention on this layer (Megatron's ``window_size``).
    """

    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type: AttnMaskType,
                 attention_type: str, softmax_scale: Optional[float], pg_collection: Optional[Any],
                 check_window: bool = True) -> None:
        name = type(self).__name__
        if not isinstance(config, TransformerConfig):
            raise ValueError(f"{name}: config of type {type(config).__name__}: must be a megatron.core TransformerConfig")
        super().__init__(config=config)
        if isinstance(layer_number, bool) or not isinstance(layer_number, int) or layer_number < 1:
            raise ValueError(f"{name}: layer_number={layer_number!r}: must be an int >= 1 (Megatron numbers layers "
                             f"from 1)")
        self.layer_number = layer_number
        #: ``"<class> (layer <n>)"``, the prefix of this module's error messages.
        self.where = f"{name} (layer {layer_number})"
        if attention_type != "self":
            raise ValueError(f"{self.where}: attention_type={attention_type!r}: only self-attention is supported "
                             f"(a causal sequence attends to itself)")
        if attn_mask_type != AttnMaskType.causal:
            raise ValueError(f"{self.where}: attn_mask_type={attn_mask_type}: only causal attention is supported")
        self.attn_mask_type = attn_mask_type
        heads, groups = config.num_attention_heads, config.num_query_groups
        if groups < 1 or heads % groups:
            raise ValueError(f"{self.where}: config.num_attention_heads={heads} with config.num_query_groups={groups}: "
                             f"the query heads must be a multiple of the query groups (each key/value head serves a "
                             f"whole group of query heads)")
        try:
            self.softmax_scale = resolve_softmax_scale(softmax_scale, config.kv_channels)
        except ValueError as err:
            raise ValueError(f"{self.where}: {err}") from None
        unsupported = _unsupported_settings(config, layer_number if check_window else None)
        if unsupported:
            raise ValueError(f"{self.where}: {', '.join(unsupported)}: not supported (causal softmax attention over "
                             f"the whole sequence only; Megatron reads no max attention logit from this module)")
        self.cp_group = _context_parallel_group(config, pg_collection, self.where)

    def check_shapes(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
        """``ValueError`` unless ``query`` is ``[s, b, h, d]`` and ``key`` / ``value`` ``[s_k, b, g, d]`` with ``h``
        a multiple of ``g`` (Megatron's grouped-query attention)."""
        for name, tensor in (("query", query), ("key", key), ("value", value)):
            if not isinstance(tensor, torch.Tensor):
                raise ValueError(f"{self.where}: {name} is a {type(tensor).__name__}: must be a tensor [s, b, heads, "
                                 f"head_dim] (Megatron's sbhd layout)")
            if tensor.dim() != 4:
                raise ValueError(f"{self.where}: {name} of shape {tuple(tensor.shape)}: must be 4-D [s, b, heads, "
                                 f"head_dim] (Megatron's sbhd layout)")
        heads, groups = query.shape[2], key.shape[2]
        if value.shape[2] != groups or groups < 1 or heads % groups:
            raise ValueError(f"{self.where}: {heads} query heads for {groups} key and {value.shape[2]} value heads: "
                             f"the query heads must be a multiple of the key/value heads (grouped-query attention)")

    def check_call(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attention_mask: Optional[torch.Tensor], attn_mask_type: Optional[AttnMaskType],
                   attention_bias: Optional[torch.Tensor]) -> AttnMaskType:
        """Refuse what a call cannot get right (:meth:`check_shapes` first); returns the call's mask type
        (``attn_mask_type`` or the module's).

        ``AttnMaskType.no_mask`` passes: Megatron's inference sets it for the tokens after the prompt, each of
        which attends to every cached key (a subclass that cannot serve inference refuses it itself).
        """
        self.check_shapes(query, key, value)
        if attention_bias is not None:
            raise ValueError(f"{self.where}: attention_bias is not supported")
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        if mask_type not in (AttnMaskType.causal, AttnMaskType.no_mask):
            raise ValueError(f"{self.where}: attn_mask_type={mask_type}: only causal attention is supported")
        if attention_mask is not None and mask_type == AttnMaskType.causal:
            check_causal_mask(attention_mask, query.shape[0], key.shape[0], self.cp_group, self.where)
        return mask_type


def check_causal_mask(mask: torch.Tensor, query_len: int, key_len: int, cp_group: Optional[Any], where: str) -> None:
    """``ValueError`` unless ``mask`` is Megatron's plain causal mask for this call (``True`` = masked out).

    Megatron's GPT data loader makes ``[b, 1, s, s]`` boolean masks, upper triangle masked; under context
    parallelism each rank holds the rows of its load-balanced shard, ``[b, 1, s / W, s]``. Anything else (a padding
    mask, a document mask from ``--reset-attention-mask``) changes which tokens may attend, which a causal kernel
    and Lighthouse's selection over the whole sequence cannot honour.
    """
    world = 1 if cp_group is None else cp_group.size()
    full = key_len * world
    wrong = (f"{where}: attention_mask of shape {tuple(mask.shape)} is not the plain causal mask: padding and "
             f"document masks (--reset-attention-mask) are not supported; pass attention_mask=None (Megatron-LM: "
             f"--no-create-attention-mask-in-dataloader) and mark padding in the loss mask instead")
    if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[2] != query_len or mask.shape[3] != full:
        raise ValueError(wrong)
    causal = torch.ones(full, full, dtype=torch.bool, device=mask.device).triu(1)
    if world > 1:
        causal = split_for_cp(causal, cp_group.rank(), world, seq_dim=0)
    if not torch.equal(mask.bool(), causal.expand_as(mask)):
        raise ValueError(wrong)


def _unsupported_settings(config: TransformerConfig, layer_number: Optional[int]) -> List[str]:
    """``"name=value"`` for each setting of ``config`` a causal core attention of this package cannot honour at
    (1-based) ``layer_number``: a sliding window on that layer (not checked for ``None``), and ``qk_clip`` /
    ``log_max_attention_logit`` (Megatron reads the max logit back from the core attention)."""
    found = []
    window = getattr(config, "window_size", None)
    if window and layer_number is not None and is_layer_window_attention(
            window, getattr(config, "window_attn_skip_freq", None), layer_number):
        found.append(f"window_size={window}")
    return found + [f"{name}=True" for name in ("qk_clip", "log_max_attention_logit") if getattr(config, name, False)]


def _context_parallel_group(config: TransformerConfig, pg_collection: Optional[Any], where: str) -> Optional[Any]:
    """The CP group to run over (``None`` without context parallelism): ``pg_collection.cp`` when given, else
    Megatron's global CP group. ``ValueError`` when its size is not ``config.context_parallel_size`` (each rank would
    hold a shard of another layout: a wrong answer, or a hang in the inner attention's collectives)."""
    group = getattr(pg_collection, "cp", None) if pg_collection is not None else None
    if group is None and config.context_parallel_size > 1:
        group = parallel_state.get_context_parallel_group()
    size = 1 if group is None else group.size()
    if size != config.context_parallel_size:
        raise ValueError(f"{where}: the context-parallel group has {size} ranks but config.context_parallel_size="
                         f"{config.context_parallel_size}: they must be equal (pass pg_collection.cp of that size, or "
                         f"set context_parallel_size to the group's size)")
    return group if size > 1 else None


def check_cp_comm_type(cp_comm_type: Any, context_parallel_size: int, where: str = "") -> None:
    """``ValueError`` unless ``cp_comm_type`` is a context-parallel communication type TransformerEngine accepts.

    Megatron hands ``cp_comm_type`` to TE's ``DotProductAttention`` unchanged, and TE only rejects an unknown value at
    the first forward under context parallelism, so it is checked when a core attention is built, whatever
    ``context_parallel_size`` (a config that is wrong at CP=1 breaks the day CP is switched on).

    Args:
        cp_comm_type: ``None`` (Megatron's default: ``"p2p"`` under CP), one of :data:`TE_CP_COMM_TYPES`, or a list /
            tuple of those per layer (as ``TransformerConfig.cp_comm_type`` allows). The spelling without the
            underscore is refused, not normalised: the message gives TE's ``"all_gather"``.
        context_parallel_size: the CP size the value is for (a positive int; named in the messages).
        where: the messages' prefix (e.g. the module and layer).
    """
    if isinstance(context_parallel_size, bool) or not isinstance(context_parallel_size, int) \
            or context_parallel_size < 1:
        raise ValueError(f"context_parallel_size={context_parallel_size!r}: must be a positive int")
    prefix = f"{where}: " if where else ""

    def check(value: Any, name: str) -> None:
        if value is None or (isinstance(value, str) and value in TE_CP_COMM_TYPES):
            return
        hint = ""
        if isinstance(value, str):
            plain = value.lower().replace("-", "").replace("_", "").replace(" ", "")
            close = [accepted for accepted in TE_CP_COMM_TYPES if accepted.replace("_", "") == plain]
            if close:
                hint = f"; use {close[0]!r} (TransformerEngine's spelling)"
        raise ValueError(f"{prefix}{name}={value!r} (context_parallel_size={context_parallel_size}): not a "
                         f"context-parallel communication type of TransformerEngine, which accepts "
                         f"{', '.join(map(repr, TE_CP_COMM_TYPES))}{hint}. Megatron passes the value to TE unchanged, "
                         f"and TE would only fail at the first forward under context parallelism")

    if isinstance(cp_comm_type, (list, tuple)):
        for layer, value in enumerate(cp_comm_type):
            check(value, f"cp_comm_type[{layer}]")
    else:
        check(cp_comm_type, "cp_comm_type")
