"""``LighthouseCoreAttention``: Megatron-Core core attention that runs Lighthouse around a stock inner one.

The inner core attention (``TEDotProductAttention``,
:class:`~megatron_lighthouse.sdpa_core_attention.SDPACoreAttention`, any module honouring Megatron's
core-attention contract) is built from ``submodules.core_attention`` and does the dense causal attention on the
selected subsequence, so kernel choice, dropout, softmax scale and context parallelism stay Megatron's. Selection
is per query head, so the inner attention of a Lighthouse layer is built with ``num_query_groups ==
num_attention_heads``. The module has no parameters of its own and its ``state_dict`` / ``sharded_state_dict``
keys are those of the inner attention at this module's prefix: a checkpoint is the dense model's.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import logging
import math
from typing import Any, Optional, Tuple, Union

import torch
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, get_module
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import sharded_state_dict_default

from .attention import lighthouse_attention
from .config import LighthouseConfig
from .rotary import apply_rotary, entry_rotary
from .transformer_config import context_parallel_group, resolve_lighthouse, unsupported_attention_settings

#: Name of the inner core attention among this module's children (hidden from state-dict keys).
INNER = "inner"

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class LighthouseCoreAttentionSubmodules:
    """``core_attention``: the stock core attention run on the selected subsequence, as Megatron's layer specs
    give it (a ``ModuleSpec``, a class or a ``functools.partial`` of one)."""

    core_attention: Union[ModuleSpec, type, functools.partial] = None


def _builder_class(builder: Union[ModuleSpec, type, functools.partial]) -> type:
    """The class a core-attention builder instantiates."""
    while isinstance(builder, functools.partial):
        builder = builder.func
    return get_module(builder)


def _accepted_kwargs(cls: type, kwargs: dict) -> dict:
    """The entries of ``kwargs`` that ``cls.__init__`` accepts (all of them if it takes ``**kwargs``)."""
    params = inspect.signature(cls.__init__).parameters
    if any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return dict(kwargs)
    return {k: v for k, v in kwargs.items() if k in params}


class LighthouseCoreAttention(MegatronModule):
    """Lighthouse self-attention core: ``query`` ``[s, b, h, d]``, ``key``/``value`` ``[s, b, g, d]`` ->
    ``[s, b, h*d]``.

    Args:
        config: the layer's ``TransformerConfig``.
        layer_number: 1-based global layer number (Megatron's); a layer listed in ``lighthouse.dense_layers``
            stays dense for good (:attr:`dense_layer`) and its inner attention is built exactly as the dense
            model's (``num_query_groups`` kv heads).
        attn_mask_type: must be ``AttnMaskType.causal``.
        attention_type: must be ``"self"``.
        attention_dropout, softmax_scale, cp_comm_type, pg_collection, **kwargs: passed on to the inner core
            attention where its constructor accepts them (megatron-core 0.16-0.19 pass different sets).
        submodules: :class:`LighthouseCoreAttentionSubmodules` naming the inner core attention.
        lighthouse: the settings (a ``ModuleSpec`` param); default ``config.lighthouse``.

    Raises ``ValueError`` at construction for cross-attention, non-causal masks, and (Lighthouse layers)
    sliding-window attention, ``qk_clip`` and ``log_max_attention_logit``; at the first call for packed (THD)
    sequences, ``attention_bias`` and sequence lengths the settings cannot select from.

    :attr:`enabled` switches between Lighthouse and the plain inner attention on the full sequence (the dense
    model) at run time; see :func:`megatron_lighthouse.switch.set_lighthouse_enabled`. While enabled, a
    :attr:`dense_weight` ``w`` in ``(0, 1)`` returns ``(1 - w) * Lighthouse + w * dense`` (both computed: the
    blended switch of :class:`~megatron_lighthouse.schedule.LighthouseSchedule`).

    RoPE (``lighthouse.rope == "entries"``): inside
    :class:`~megatron_lighthouse.self_attention.LighthouseSelfAttention` (the spec provider's), q/k arrive
    un-rotated with Megatron's rotary table in :attr:`rotary_freqs`, and the selected entries are rotated at their
    last tokens' positions. ``rope="entries"`` refuses ``fused_single_qkv_rope`` and YaRN at construction.
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
        submodules: Optional[LighthouseCoreAttentionSubmodules] = None,
        lighthouse: Optional[LighthouseConfig] = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(config=config)
        if attention_type != "self":
            raise ValueError(
                f"LighthouseCoreAttention: attention_type={attention_type!r}: only self-attention is supported "
                f"(Lighthouse selects within one causal sequence; cross-attention has no such order)"
            )
        if attn_mask_type != AttnMaskType.causal:
            raise ValueError(
                f"LighthouseCoreAttention: attn_mask_type={attn_mask_type}: only causal attention is supported"
            )
        if submodules is None or submodules.core_attention is None:
            raise ValueError(
                "LighthouseCoreAttention: submodules.core_attention (the inner core attention) is required"
            )
        self.lighthouse = resolve_lighthouse(config, lighthouse)
        self.layer_number = layer_number
        self.attn_mask_type = attn_mask_type
        self.softmax_scale = 1.0 / math.sqrt(config.kv_channels) if softmax_scale is None else softmax_scale
        dense_layers = self.lighthouse.dense_layer_set(config.num_layers)
        self.dense_layer = (layer_number - 1) in dense_layers if 1 <= layer_number <= config.num_layers else False
        self.enabled = not self.dense_layer
        #: While :attr:`enabled`: the weight of the dense attention in a blend with Lighthouse (0: Lighthouse only).
        self.dense_weight = 0.0
        lighthouse_layers = sorted(set(range(config.num_layers)) - dense_layers)
        count = max(len(lighthouse_layers), 1)
        #: ``(index, count)``: this layer's place among the model's Lighthouse layers, in layer order, which a
        #: staggered switch goes by (:class:`~megatron_lighthouse.schedule.LighthouseSchedule`); a layer numbered
        #: past ``config.num_layers`` counts as the last.
        self.lighthouse_position: Tuple[int, int] = (
            lighthouse_layers.index(layer_number - 1) if layer_number - 1 in lighthouse_layers else count - 1, count)
        unsupported = unsupported_attention_settings(config, None if self.dense_layer else layer_number)
        if unsupported:
            raise ValueError(
                f"LighthouseCoreAttention (layer {layer_number}): {', '.join(unsupported)}: not supported (a "
                f"Lighthouse layer attends over a selected pyramid subsequence, not a token window, and reports no "
                f"max attention logit)"
            )
        self.cp_group = context_parallel_group(config, pg_collection, f"LighthouseCoreAttention (layer {layer_number})")
        if not self.dense_layer and self.lighthouse.rope == "entries":
            for name in ("fused_single_qkv_rope", "yarn_rotary_scaling_factor"):
                if getattr(config, name, None):
                    raise ValueError(
                        f"LighthouseCoreAttention (layer {layer_number}): {name}={getattr(config, name)!r} with "
                        f"lighthouse.rope='entries': not supported (the entries are rotated with plain RoPE after "
                        f"selection); set it off, or use LighthouseConfig(rope='tokens')"
                    )
        #: Megatron's rotary table for the current call, handed over by ``LighthouseSelfAttention`` (``None``:
        #: the model has no RoPE here). :attr:`rotary_handoff`: built inside one (set by it).
        self.rotary_freqs: Optional[torch.Tensor] = None
        self.rotary_handoff = False
        self._warned_no_handoff = False

        inner_config = config
        if not self.dense_layer:  # selection is per query head: the subsequence has one kv head per query head
            inner_config = copy.copy(config)
            inner_config.num_query_groups = config.num_attention_heads
        optional = dict(attention_dropout=attention_dropout, softmax_scale=softmax_scale, cp_comm_type=cp_comm_type,
                        pg_collection=pg_collection, **kwargs)
        optional = _accepted_kwargs(_builder_class(submodules.core_attention), optional)
        #: The stock core attention (``num_query_groups == num_attention_heads`` unless :attr:`dense_layer`),
        #: built the way Megatron's ``Attention`` builds a core attention; registered as child ``INNER``, whose
        #: name the state-dict hooks below hide.
        self.inner = submodules.core_attention(
            config=inner_config, layer_number=layer_number, attn_mask_type=attn_mask_type,
            attention_type=attention_type, **optional,
        )
        self._expand_kv = not self.dense_layer
        self._register_state_dict_hook(_drop_inner_prefix)
        self._register_load_state_dict_pre_hook(_add_inner_prefix, with_module=True)

    def _dense(self, query, key, value, attention_mask, attn_mask_type, **kwargs) -> torch.Tensor:
        """The inner attention on the full sequence: the dense model (kv heads expanded first when the inner
        attention was built for one kv head per query head)."""
        groups = query.shape[2] // key.shape[2]
        if self._expand_kv and groups > 1:
            key, value = key.repeat_interleave(groups, dim=2), value.repeat_interleave(groups, dim=2)
        return self.inner(query, key, value, attention_mask, attn_mask_type=attn_mask_type, **kwargs)

    def _subsequence_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        """Dense kernel for :func:`lighthouse_attention`: ``[B, H, S, D]`` q/k/v -> ``[B, H, S, D]`` via the inner."""
        b, h, s, d = q.shape
        q, k, v = (x.permute(2, 0, 1, 3).contiguous() for x in (q, k, v))  # [S, B, H, D]
        out = self.inner(q, k, v, None, attn_mask_type=AttnMaskType.causal, attention_bias=None,
                         packed_seq_params=None)
        return out.view(s, b, h, d).permute(1, 2, 0, 3)

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
        """``query`` ``[s, b, h, d]``, ``key``/``value`` ``[s, b, g, d]`` -> ``[s, b, h*d]`` (``s``: this CP rank's
        load-balanced shard when context parallel)."""
        if packed_seq_params is not None:
            raise ValueError("LighthouseCoreAttention: packed (THD) sequences are not supported; use sbhd batches")
        if attention_bias is not None:
            raise ValueError("LighthouseCoreAttention: attention_bias is not supported")
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        if mask_type != AttnMaskType.causal:
            raise ValueError(f"LighthouseCoreAttention: attn_mask_type={mask_type}: only causal attention is supported")
        if not self.enabled:
            return self._dense(query, key, value, attention_mask, mask_type, **kwargs)
        s, b, h, d = query.shape
        cfg = self.lighthouse
        if self.cp_group is None:
            try:
                cfg.validate(s)
            except ValueError as err:
                raise ValueError(f"LighthouseCoreAttention (layer {self.layer_number}, {s} tokens): {err}") from None
        q, k, v = (x.transpose(0, 1) for x in (query, key, value))  # [b, s, h|g, d]
        rotary = self._entry_rotary(s)
        out = lighthouse_attention(
            q, k, v, levels=cfg.levels, pooling_factor=cfg.pooling_factor, topk=cfg.topk,
            softmax_scale=self.softmax_scale, attention=self._subsequence_attention, cp_group=self.cp_group,
            rotary=rotary,
        )
        out = out.transpose(0, 1).reshape(s, b, h * d)
        if self.dense_weight > 0.0:  # the blended switch: the dense model's attention, weighted in
            if rotary is not None:  # q/k arrived un-rotated: rotate the tokens as Megatron would have
                query, key = (apply_rotary(x, self.rotary_freqs.reshape(s, 1, 1, -1),
                                           self.config.rotary_interleaved) for x in (query, key))
            dense = self._dense(query, key, value, attention_mask, mask_type, **kwargs)
            out = torch.lerp(out, dense.to(out.dtype), self.dense_weight)
        return out

    def _entry_rotary(self, seq_len: int):
        """The RoPE of selected entries for this call (``None``: none to apply here)."""
        if self.lighthouse.rope != "entries":
            return None
        if not self.rotary_handoff:
            if not self._warned_no_handoff:
                logger.warning("LighthouseCoreAttention (layer %d) is not inside LighthouseSelfAttention: in a RoPE "
                               "model its q/k arrive rotated and are pooled so (rope='tokens'); build the layer "
                               "with the spec provider of megatron_lighthouse.spec", self.layer_number)
                self._warned_no_handoff = True
            return None
        freqs = self.rotary_freqs
        if freqs is None:
            return None
        if freqs.shape[0] != seq_len:
            raise ValueError(f"LighthouseCoreAttention (layer {self.layer_number}): rotary table of {freqs.shape[0]} "
                             f"positions for {seq_len} tokens")
        return entry_rotary(freqs, interleaved=self.config.rotary_interleaved)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None):
        """The inner attention's sharded state dict at this module's prefix (the dense model's keys)."""
        return sharded_state_dict_default(self.inner, prefix, sharded_offsets, metadata)


def _drop_inner_prefix(module: LighthouseCoreAttention, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """``state_dict`` hook: ``<prefix>inner.<key>`` -> ``<prefix><key>``."""
    inner = f"{prefix}{INNER}."
    for key in [k for k in state_dict if k.startswith(inner)]:
        state_dict[prefix + key[len(inner):]] = state_dict.pop(key)


def _add_inner_prefix(module: LighthouseCoreAttention, state_dict: dict, prefix: str, *args: Any) -> None:
    """``load_state_dict`` pre-hook: ``<prefix><key>`` -> ``<prefix>inner.<key>`` (dense checkpoints load)."""
    inner = f"{prefix}{INNER}."
    for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(inner)]:
        state_dict[inner + key[len(prefix):]] = state_dict.pop(key)
