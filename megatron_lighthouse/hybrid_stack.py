"""Megatron-Core's ``HybridStack`` without TransformerEngine: the stack module of the local hybrid stack spec.

``HybridStack`` builds its final norm as TransformerEngine's ``TENorm`` whatever the spec says, so a stack of
local layers cannot be built where TransformerEngine is missing. :class:`LocalHybridStack` is ``HybridStack`` with
that one norm taken from its submodules (:class:`LocalHybridStackSubmodules`, ``final_norm``); its state-dict keys
are ``HybridStack``'s. :class:`UnavailableHybridLayer` stands for a layer family the local spec has no module for:
building it (when the model is built, before any forward) raises a ``ValueError`` naming the layer, its symbol and
what it needs.

Needs megatron-core >= 0.19 (``megatron.core.models.hybrid``); :mod:`megatron_lighthouse.hybrid_spec` says so
before importing this module.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Union

from megatron.core.models.hybrid.hybrid_block import HybridStack, HybridStackSubmodules
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_config import TransformerConfig


@dataclasses.dataclass
class LocalHybridStackSubmodules(HybridStackSubmodules):
    """``HybridStackSubmodules`` plus ``final_norm``, the norm after the last layer (a norm class taking
    ``config``, ``hidden_size`` and ``eps``, as Megatron's ``WrappedTorchNorm``)."""

    final_norm: Union[ModuleSpec, type, None] = None


class LocalHybridStack(HybridStack):
    """``HybridStack`` (same arguments) whose final norm is ``submodules.final_norm`` instead of ``TENorm``."""

    def __init__(self, config: TransformerConfig, submodules: LocalHybridStackSubmodules, *args: Any,
                 post_layer_norm: bool = True, post_process: bool = True, **kwargs: Any) -> None:
        if not isinstance(submodules, LocalHybridStackSubmodules) or submodules.final_norm is None:
            raise ValueError(f"LocalHybridStack: submodules={type(submodules).__name__}: must be "
                             f"LocalHybridStackSubmodules with final_norm set (its norm after the last layer)")
        super().__init__(config, submodules, *args, post_layer_norm=False, post_process=post_process, **kwargs)
        self.post_layer_norm = post_layer_norm
        if post_process and post_layer_norm:
            self.final_norm = build_module(submodules.final_norm, config=config, hidden_size=config.hidden_size,
                                           eps=config.layernorm_epsilon)


class UnavailableHybridLayer(MegatronModule):
    """A layer family of the hybrid pattern that this stack spec cannot build: constructing it raises.

    Args (``ModuleSpec`` params): ``symbol`` (the pattern symbol), ``family`` (its name), ``needs`` (what building it
    takes, and where to get it). The rest are the arguments ``HybridStack`` passes to every layer.
    """

    def __init__(self, config: TransformerConfig, symbol: str, family: str, needs: str,
                 layer_number: Optional[int] = None, **kwargs: Any) -> None:
        raise ValueError(f"hybrid layer {layer_number} ('{symbol}', {family}): not in the local hybrid stack spec (no "
                         f"TransformerEngine), which builds '*' attention, '-' MLP and 'E' MoE layers only; {needs}")
