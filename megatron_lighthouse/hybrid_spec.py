"""Spec provider: Megatron-Core hybrid stack specs (``HybridModel``) with Lighthouse in the attention layers.

A hybrid stack spec is one ``ModuleSpec`` of ``HybridStack`` whose submodules name a layer spec per family
(``attention_layer`` for ``*``, ``mlp_layer`` for ``-``, ``moe_layer`` for ``E``, ``mamba_layer`` for ``M``, ...);
``--hybrid-layer-pattern`` says which family each layer is. :func:`with_lighthouse_attention` replaces only
``attention_layer``'s core attention by :class:`~megatron_lighthouse.core_attention.LighthouseCoreAttention`
around the stock one (with :class:`~megatron_lighthouse.self_attention.LighthouseSelfAttention`, as the GPT specs
do); every other family stays the given stack's. The core attentions keep ``LighthouseConfig.dense_layers``,
counted among the pattern's attention layers, dense
(:func:`~megatron_lighthouse.hybrid_pattern.hybrid_attention_layers`): the spec carries the pattern, which is
checked once here and by each attention layer against the stack it is built in (a spec built for another pattern
is refused, as are attention layers in the multi-token-prediction part).

- :func:`get_hybrid_stack_with_lighthouse_spec`: Megatron's ``hybrid_stack_spec`` (TransformerEngine) or
  :func:`get_hybrid_stack_local_spec` with Lighthouse;
- :func:`get_hybrid_stack_dense_spec`: their dense counterparts, the same state-dict keys (with TE exactly
  Megatron's ``hybrid_stack_spec``);
- :func:`get_hybrid_stack_local_spec`: the stack without TransformerEngine (Megatron's uses TE modules throughout):
  attention, MLP and MoE layers on Megatron's local modules with
  :class:`~megatron_lighthouse.sdpa_core_attention.SDPACoreAttention`, the layouts of Megatron's TE stack (its
  distributed-checkpoint keys map to them, as Megatron's local GPT layers do). Layers of the other families are
  refused when the model is built, naming their symbol and what they need.

Needs megatron-core >= 0.19 (``HybridModel``); on older ones every function here raises one ``ImportError`` line
saying so. Nothing is built at import.
"""

from __future__ import annotations

import copy
import importlib.util
from typing import Optional

from megatron.core.transformer.spec_utils import ModuleSpec

from .config import LighthouseConfig
from .hybrid_pattern import hybrid_attention_layers
from .spec import (
    SDPA_CORE_ATTENTION,
    _call_accepted,
    _check_transformer_engine,
    _with_lighthouse,
    check_normalization,
    replace_core_attention,
)

__all__ = [
    "get_hybrid_stack_with_lighthouse_spec",
    "get_hybrid_stack_dense_spec",
    "get_hybrid_stack_local_spec",
    "with_lighthouse_attention",
    "require_hybrid_model",
]

#: Megatron-Core's hybrid stack spec, as ``--spec`` names it.
MEGATRON_HYBRID_STACK_SPEC = ("megatron.core.models.hybrid.hybrid_layer_specs", "hybrid_stack_spec")

#: Layer families of Megatron's hybrid stack the local spec has no module for: symbol -> (submodule field, name,
#: what building one takes).
LOCAL_UNAVAILABLE = {
    "M": ("mamba_layer", "Mamba", "Megatron builds Mamba layers from TransformerEngine's fused LayerNorm+Linear and "
                                  "the mamba_ssm and causal_conv1d kernels: install those and use the "
                                  "TransformerEngine stack spec"),
    "G": ("gdn_layer", "Gated DeltaNet", "Megatron builds Gated DeltaNet layers from TransformerEngine's modules and "
                                         "the fla (flash-linear-attention) kernels: install those and use the "
                                         "TransformerEngine stack spec"),
    "D": ("dsa_layer", "DeepSeek Sparse Attention", "Megatron builds DSA layers (multi-latent attention with its "
                                                    "indexer) from TransformerEngine's modules, and Lighthouse does "
                                                    "not wrap them: use the TransformerEngine stack spec"),
    "+": ("mla_layer", "multi-latent attention", "Megatron builds MLA layers from TransformerEngine's modules, and "
                                                 "Lighthouse does not wrap them: use the TransformerEngine stack "
                                                 "spec"),
}


def require_hybrid_model() -> None:
    """``ImportError`` (one line) unless this megatron-core has ``HybridModel`` (0.19 and later)."""
    if importlib.util.find_spec("megatron.core.models.hybrid") is None:
        from megatron.core import package_info

        raise ImportError(f"HybridModel needs megatron-core >= 0.19 (megatron.core.models.hybrid); this is "
                          f"megatron-core {package_info.__version__}: use the GPT specs of megatron_lighthouse.spec")


def with_lighthouse_attention(stack_spec: ModuleSpec, lighthouse: LighthouseConfig,
                              hybrid_layer_pattern: str) -> ModuleSpec:
    """A copy of the hybrid stack spec ``stack_spec`` whose ``attention_layer`` runs Lighthouse (its core attention
    wrapped in :class:`LighthouseCoreAttention`), for a ``HybridModel`` built with ``hybrid_layer_pattern``; the
    other layer specs are shared with ``stack_spec``.

    ``ValueError`` naming the pattern and ``dense_layers`` when they leave no attention layer to run Lighthouse
    (fewer than five attention layers with the paper's default), a ``dense_layers`` entry is out of range for the
    attention layers, or the multi-token-prediction part has attention layers; and when ``attention_layer`` is not
    Megatron's ``SelfAttention`` layer.
    """
    require_hybrid_model()
    if not isinstance(lighthouse, LighthouseConfig):
        raise ValueError(f"lighthouse={lighthouse!r}: must be a LighthouseConfig")
    try:
        hybrid_attention_layers(hybrid_layer_pattern, lighthouse)
    except ValueError as err:
        raise ValueError(f"hybrid_layer_pattern {hybrid_layer_pattern!r} with dense_layers "
                         f"{lighthouse.dense_layers}: {err}") from None
    stack = copy.copy(stack_spec)
    stack.submodules = copy.copy(stack_spec.submodules)
    stack.submodules.attention_layer = _with_lighthouse(stack_spec.submodules.attention_layer, lighthouse,
                                                        hybrid_layer_pattern=hybrid_layer_pattern)
    return stack


def get_hybrid_stack_local_spec(normalization: Optional[str] = None) -> ModuleSpec:
    """The hybrid stack without TransformerEngine: :class:`~megatron_lighthouse.hybrid_stack.LocalHybridStack` of
    Megatron's local GPT-layer modules (``get_gpt_layer_local_spec``), split as Megatron's TE hybrid stack splits
    them: attention layers (input norm, ``SelfAttention`` with :class:`SDPACoreAttention`), MLP layers (``MLPLayer``:
    pre-MLP norm and MLP) and MoE layers (``MoETransformerLayer``, Megatron's local MoE); no q/k norms, as in
    Megatron's. ``normalization`` picks the norm as in ``get_gpt_layer_local_spec``. Mamba, Gated DeltaNet, DSA and
    MLA layers (:data:`LOCAL_UNAVAILABLE`) are refused when the model is built.
    """
    require_hybrid_model()
    check_normalization(normalization)
    from megatron.core.models.gpt import gpt_layer_specs
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
    from megatron.core.ssm.mlp_layer import MLPLayer
    from megatron.core.transformer.identity_op import IdentityOp
    from megatron.core.transformer.transformer_layer import (MoETransformerLayer, TransformerLayer,
                                                             TransformerLayerSubmodules)

    from .hybrid_stack import LocalHybridStack, LocalHybridStackSubmodules, UnavailableHybridLayer

    gpt = replace_core_attention(_call_accepted(gpt_layer_specs.get_gpt_layer_local_spec, normalization=normalization),
                                 SDPA_CORE_ATTENTION).submodules
    keys = gpt.sharded_state_dict_keys_map  # local norm -> the TE layout's fused LayerNorm+Linear keys

    def mapped(prefix: str) -> dict:
        return {k: v for k, v in keys.items() if k.startswith(prefix)}

    attention = copy.copy(gpt.self_attention)
    attention.submodules = copy.copy(gpt.self_attention.submodules)
    attention.submodules.q_layernorm = attention.submodules.k_layernorm = IdentityOp
    unavailable = {field: ModuleSpec(module=UnavailableHybridLayer,
                                     params={"symbol": symbol, "family": family, "needs": needs})
                   for symbol, (field, family, needs) in LOCAL_UNAVAILABLE.items()}
    return ModuleSpec(module=LocalHybridStack, submodules=LocalHybridStackSubmodules(
        attention_layer=ModuleSpec(module=TransformerLayer, submodules=TransformerLayerSubmodules(
            input_layernorm=gpt.input_layernorm, self_attention=attention, self_attn_bda=gpt.self_attn_bda,
            sharded_state_dict_keys_map=mapped("input_layernorm."))),
        mlp_layer=ModuleSpec(module=MLPLayer, submodules=TransformerLayerSubmodules(
            pre_mlp_layernorm=gpt.pre_mlp_layernorm, mlp=gpt.mlp, mlp_bda=gpt.mlp_bda,
            sharded_state_dict_keys_map=mapped("pre_mlp_layernorm."))),
        moe_layer=ModuleSpec(module=MoETransformerLayer, submodules=TransformerLayerSubmodules(
            pre_mlp_layernorm=gpt.pre_mlp_layernorm, mlp=get_moe_module_spec(use_te=False, num_experts=8),
            mlp_bda=gpt.mlp_bda)),
        final_norm=gpt.input_layernorm,
        **unavailable,
    ))


def get_hybrid_stack_dense_spec(*, use_transformer_engine: bool = True,
                                normalization: Optional[str] = None) -> ModuleSpec:
    """The dense hybrid stack: with TransformerEngine Megatron's own ``hybrid_stack_spec`` (unchanged, the same
    object), else :func:`get_hybrid_stack_local_spec` (``normalization`` goes there). The baseline, and the spec to
    train on, fine-tune or serve a Lighthouse-trained hybrid checkpoint with (same state-dict keys)."""
    require_hybrid_model()
    _check_transformer_engine(use_transformer_engine)
    if use_transformer_engine:
        from megatron.core.models.hybrid import hybrid_layer_specs

        return hybrid_layer_specs.hybrid_stack_spec
    return get_hybrid_stack_local_spec(normalization)


def get_hybrid_stack_with_lighthouse_spec(lighthouse: LighthouseConfig, hybrid_layer_pattern: str, *,
                                          use_transformer_engine: bool = True,
                                          normalization: Optional[str] = None) -> ModuleSpec:
    """:func:`get_hybrid_stack_dense_spec` (Megatron's ``hybrid_stack_spec`` with TransformerEngine, inner
    ``TEDotProductAttention``; the local stack without, inner :class:`SDPACoreAttention`) with Lighthouse in its
    attention layers (:func:`with_lighthouse_attention`), for a ``HybridModel`` built with
    ``hybrid_layer_pattern``. The attention layers listed in ``lighthouse.dense_layers`` (counted among the
    pattern's ``*`` layers, negative from the last) keep the stock attention."""
    dense = get_hybrid_stack_dense_spec(use_transformer_engine=use_transformer_engine, normalization=normalization)
    return with_lighthouse_attention(dense, lighthouse, hybrid_layer_pattern)
