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
from typing import Any, Optional, Union

import torch
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.spec_utils import ModuleSpec, get_module
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import sharded_state_dict_default

from .attention import expand_kv_heads, lighthouse_attention
from .causal_core_attention import CausalCoreAttention, check_cp_comm_type
from .config import LighthouseConfig
from .hybrid_pattern import hybrid_attention_layers
from .rotary import EntryRotary, entry_rotary
from .sdpa_core_attention import SDPACoreAttention
from .transformer_config import resolve_lighthouse

#: Name of the inner core attention among this module's children (hidden from state-dict keys).
INNER = "inner"

#: How a Lighthouse layer answers inference (a KV cache, or a prefill through Megatron's inference path).
TRAINING_ONLY = ("Lighthouse is training-only: switch to dense attention for inference "
                 "(megatron_lighthouse.set_lighthouse_enabled(model, False), or a model built from the dense spec: "
                 "megatron_lighthouse.export.dense_spec_for / spec.get_gpt_decoder_block_dense_spec)")

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


def _is_dense_layer(config: TransformerConfig, lighthouse: LighthouseConfig, layer_number: Any,
                    hybrid_layer_pattern: Optional[str]) -> bool:
    """Whether 1-based ``layer_number`` keeps dense attention: one of ``lighthouse.dense_layers``, counted among
    the layers of a GPT block (``hybrid_layer_pattern`` ``None``) or among the attention layers of the hybrid stack
    built from ``hybrid_layer_pattern`` (:func:`~megatron_lighthouse.hybrid_pattern.hybrid_attention_layers`).
    A layer numbered past ``config.num_layers`` (a multi-token-prediction layer) is not.

    ``ValueError`` when the pattern does not describe the stack being built (another length than
    ``config.num_layers``, or no attention layer at ``layer_number``): the spec was built for another pattern.
    """
    if not isinstance(layer_number, int) or not 1 <= layer_number <= config.num_layers:
        return False
    if hybrid_layer_pattern is None:
        return layer_number - 1 in lighthouse.dense_layer_set(config.num_layers)
    where = f"LighthouseCoreAttention (layer {layer_number}): hybrid_layer_pattern {hybrid_layer_pattern!r}"
    try:
        layers = hybrid_attention_layers(hybrid_layer_pattern, lighthouse)
    except ValueError as err:
        raise ValueError(f"{where} with dense_layers {lighthouse.dense_layers}: {err}") from None
    if layers.num_layers != config.num_layers or layer_number not in layers.attention:
        raise ValueError(f"{where} describes {layers.num_layers} layers with attention at {list(layers.attention)}, "
                         f"but this model has config.num_layers={config.num_layers} and attention at layer "
                         f"{layer_number}: the spec was built for another pattern; build it from the model's own")
    return layer_number in layers.dense


class LighthouseCoreAttention(CausalCoreAttention):
    """Lighthouse self-attention core: ``query`` ``[s, b, h, d]``, ``key``/``value`` ``[s, b, g, d]`` ->
    ``[s, b, h*d]`` (``s``: this CP rank's load-balanced shard under context parallelism).

    Args:
        config: the layer's ``TransformerConfig``.
        layer_number: 1-based global layer number (Megatron's); a layer listed in ``lighthouse.dense_layers``
            stays dense for good (:attr:`dense_layer`) and its inner attention is built exactly as the dense
            model's (``num_query_groups`` kv heads).
        hybrid_layer_pattern: in a Megatron-Core hybrid stack (a ``ModuleSpec`` param set by
            :mod:`~megatron_lighthouse.hybrid_spec`), its ``--hybrid-layer-pattern``: ``dense_layers`` then count
            its attention layers (``*``), not its layers. ``None``: a GPT block, every layer an attention layer.
        attn_mask_type: must be ``AttnMaskType.causal``.
        attention_type: must be ``"self"``.
        softmax_scale, cp_comm_type, pg_collection, **inner_kwargs: passed on to the inner core attention, exactly
            as Megatron gives them; an argument the inner attention's constructor does not take is a ``ValueError``.
        submodules: :class:`LighthouseCoreAttentionSubmodules` naming the inner core attention.
        lighthouse: the settings (a ``ModuleSpec`` param); default ``config.lighthouse``. Fixed at construction
            (:attr:`lighthouse` is read-only, :class:`LighthouseConfig` is frozen).

    Refuses (``ValueError``) at construction what
    :class:`~megatron_lighthouse.causal_core_attention.CausalCoreAttention` refuses (for dense layers the sliding
    window is left to the inner attention), a ``cp_comm_type`` TransformerEngine does not know, FP8 attention
    (``fp8_dot_product_attention``, ``fp8_multi_head_attention``; FP8 linear layers are fine), and with
    ``rope="entries"`` ``fused_single_qkv_rope`` and YaRN; at a Lighthouse call packed (THD) sequences, padding or
    document masks, inference (a KV cache) and sequence lengths the settings cannot select from.

    :attr:`enabled` switches between Lighthouse and the plain inner attention on the full sequence (the dense
    model) at run time; see :func:`megatron_lighthouse.schedule.set_lighthouse_enabled`. Switched to dense, the
    layer is the stock one: packed sequences, masks and inference go to the inner attention as they would.

    RoPE (``lighthouse.rope == "entries"``): inside
    :class:`~megatron_lighthouse.self_attention.LighthouseSelfAttention` (the spec provider's), q/k arrive
    un-rotated with Megatron's rotary table in :attr:`rotary_freqs`, and the selected entries are rotated at their
    last tokens' positions.
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection: Optional[Any] = None,
        submodules: Optional[LighthouseCoreAttentionSubmodules] = None,
        lighthouse: Optional[LighthouseConfig] = None,
        hybrid_layer_pattern: Optional[str] = None,
        **inner_kwargs: Any,
    ) -> None:
        lighthouse = resolve_lighthouse(config, lighthouse)
        dense_layer = _is_dense_layer(config, lighthouse, layer_number, hybrid_layer_pattern)
        super().__init__(config, layer_number, attn_mask_type, attention_type, softmax_scale, pg_collection,
                         check_window=not dense_layer)
        if submodules is None or submodules.core_attention is None:
            raise ValueError(f"{self.where}: submodules.core_attention (the inner core attention) is required")
        check_cp_comm_type(cp_comm_type, config.context_parallel_size, self.where)
        self._lighthouse = lighthouse
        #: Kept dense by ``lighthouse.dense_layers``: never runs Lighthouse.
        self.dense_layer = dense_layer
        #: Run Lighthouse (``True``) or the inner attention on the whole sequence (the dense model).
        self.enabled = not dense_layer
        if not dense_layer:
            for name in ("fp8_multi_head_attention", "fp8_dot_product_attention"):
                if getattr(config, name, False):
                    raise ValueError(f"{self.where}: {name}=True: not supported on Lighthouse layers (the selection "
                                     f"reads q/k/v in bf16/fp16/fp32, and FP8 attention on the subsequence is not "
                                     f"verified); FP8 linear layers (config.fp8, --fp8-format) work: keep the "
                                     f"attention in bf16 (drop --fp8-dot-product-attention / "
                                     f"--fp8-multi-head-attention)")
        if not dense_layer and lighthouse.rope == "entries":
            for name in ("fused_single_qkv_rope", "yarn_rotary_scaling_factor"):
                if getattr(config, name, None):
                    raise ValueError(f"{self.where}: {name}={getattr(config, name)!r} with lighthouse.rope='entries': "
                                     f"not supported (the entries are rotated with plain RoPE after selection); set "
                                     f"it off, or use LighthouseConfig(rope='tokens')")
        #: Megatron's rotary table for the current call, handed over by ``LighthouseSelfAttention`` (``None``:
        #: the model has no RoPE here). :attr:`rotary_handoff`: built inside one (set by it).
        self.rotary_freqs: Optional[torch.Tensor] = None
        self.rotary_handoff = False
        self._warned_no_handoff = False

        inner_config = config
        if not dense_layer:  # selection is per query head: the subsequence has one kv head per query head
            inner_config = copy.copy(config)
            inner_config.num_query_groups = config.num_attention_heads
        given = dict(softmax_scale=softmax_scale, cp_comm_type=cp_comm_type, pg_collection=pg_collection,
                     **inner_kwargs)
        inner_class = _builder_class(submodules.core_attention)
        params = inspect.signature(inner_class.__init__).parameters
        if not any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params.values()):
            unknown = sorted(k for k, v in given.items() if k not in params and (k in inner_kwargs or v is not None))
            if unknown:
                raise ValueError(f"{self.where}: {', '.join(f'{k}={given[k]!r}' for k in unknown)}: not an argument "
                                 f"of the inner core attention {inner_class.__name__}")
            given = {k: v for k, v in given.items() if k in params}
        #: The stock core attention (``num_query_groups == num_attention_heads`` unless :attr:`dense_layer`),
        #: built the way Megatron's ``Attention`` builds a core attention; registered as child ``INNER``, whose
        #: name the state-dict hooks below hide.
        self.inner = submodules.core_attention(config=inner_config, layer_number=layer_number,
                                               attn_mask_type=attn_mask_type, attention_type=attention_type, **given)
        self._register_state_dict_hook(_drop_inner_prefix)
        self._register_load_state_dict_pre_hook(_add_inner_prefix, with_module=True)

    @property
    def lighthouse(self) -> LighthouseConfig:
        """The settings, fixed at construction."""
        return self._lighthouse

    def _subsequence_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        """Dense kernel for :func:`lighthouse_attention`: ``[B, H, S, D]`` q/k/v -> ``[B, H, S, D]`` via the inner
        (its softmax scale, built from the same arguments as this module's ``scale``).

        :class:`SDPACoreAttention` takes the subsequence as it is (its kernels read ``[B, H, S, D]`` strides);
        any other core attention gets Megatron's contract, contiguous ``[S, B, H, D]`` (TransformerEngine's sbhd).
        """
        if isinstance(self.inner, SDPACoreAttention):
            return self.inner.causal_attention(q, k, v)
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
        """``query`` ``[s, b, h, d]``, ``key``/``value`` ``[s, b, g, d]`` -> ``[s, b, h*d]`` in ``query``'s dtype;
        ``kwargs`` (other arguments Megatron versions pass) go to the inner attention when switched to dense."""
        if not self.enabled:
            if not self.dense_layer:  # the inner attention was built with one kv head per query head
                if packed_seq_params is None:  # packed (THD) inputs are 3-D: the inner attention checks them
                    self.check_shapes(query, key, value)
                key, value = (expand_kv_heads(x, query.shape[-2]) for x in (key, value))
            return self.inner(query, key, value, attention_mask, attn_mask_type=attn_mask_type,
                              attention_bias=attention_bias, packed_seq_params=packed_seq_params, **kwargs)
        if packed_seq_params is not None:
            raise ValueError(f"{self.where}: packed (THD) sequences are not supported while Lighthouse runs "
                             f"(it selects within one sbhd sequence); use sbhd batches")
        mask_type = self.check_call(query, key, value, attention_mask, attn_mask_type, attention_bias)
        if mask_type != AttnMaskType.causal or key.shape[0] != query.shape[0]:
            raise ValueError(f"{self.where}: {query.shape[0]} queries against {key.shape[0]} keys "
                             f"(attn_mask_type={mask_type}): {TRAINING_ONLY}")
        s, b, h, d = query.shape
        q, k, v = (x.transpose(0, 1) for x in (query, key, value))  # [b, s, h|g, d]
        try:
            out = lighthouse_attention(q, k, v, config=self.lighthouse, softmax_scale=self.softmax_scale,
                                       attention=self._subsequence_attention, cp_group=self.cp_group,
                                       rotary=self._entry_rotary(s))
        except ValueError as err:
            raise ValueError(f"{self.where}, {s} tokens: {err}") from None
        return out.transpose(0, 1).reshape(s, b, h * d)

    def _entry_rotary(self, seq_len: int) -> Optional[EntryRotary]:
        """The RoPE of selected entries for this call (``None``: none to apply here)."""
        if self.lighthouse.rope != "entries":
            return None
        if not self.rotary_handoff:
            if not self._warned_no_handoff:
                logger.warning("%s is not inside LighthouseSelfAttention: in a RoPE model its q/k arrive rotated and "
                               "are pooled so (rope='tokens'); build the layer with the spec provider of "
                               "megatron_lighthouse.spec", self.where)
                self._warned_no_handoff = True
            return None
        freqs = self.rotary_freqs
        if freqs is None:
            return None
        if freqs.shape[0] != seq_len:
            raise ValueError(f"{self.where}: rotary table of {freqs.shape[0]} positions for {seq_len} tokens")
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
