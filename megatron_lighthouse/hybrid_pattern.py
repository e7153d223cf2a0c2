"""Which layers of a Megatron-Core hybrid stack run Lighthouse: its attention layers, counted.

Megatron's ``HybridModel`` builds one layer per symbol of ``--hybrid-layer-pattern`` (``*`` attention, ``-`` MLP,
``E`` MoE, ``M`` Mamba, ``G`` Gated DeltaNet, ``D`` DeepSeek Sparse Attention, ``+`` MLA; ``|`` separates pipeline
segments and ``/`` starts the multi-token-prediction part, neither a layer) and numbers them from 1 across all
pipeline segments and virtual stages: in ``*-*-|*-*-`` the attention layers are 1, 3, 5 and 7. Lighthouse replaces
the core attention of the ``*`` layers, and :attr:`LighthouseConfig.dense_layers` counts those: the paper's rule
(the first two and the last two attention layers stay dense) means the same layers of a ``*-`` pattern as of the
GPT model it mirrors, and of a pattern with Mamba layers between its attention layers.

:func:`hybrid_attention_layers` resolves a pattern once into the hybrid layer numbers that run Lighthouse and those
kept dense; the spec provider, the start-up checks and each core attention use it. Standard library only (the
launch examples load this file without torch).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING, Tuple

if TYPE_CHECKING:
    from .config import LighthouseConfig

#: Megatron's layer symbols (``megatron.core.models.hybrid.hybrid_layer_allocation.Symbols``) this module reads.
ATTENTION = "*"
PIPE = "|"
MTP_SEPARATOR = "/"


@dataclasses.dataclass(frozen=True)
class HybridAttentionLayers:
    """The attention layers of a hybrid layer pattern, each a 1-based hybrid layer number (Megatron's
    ``layer_number``, the same under pipeline segments and virtual stages).

    Attributes:
        pattern: the hybrid layer pattern.
        num_layers: layers of its main part (``|`` and the ``/`` part left out): Megatron's ``num_layers``.
        attention: the ``*`` layers, in order.
        lighthouse: those that run Lighthouse.
        dense: those kept dense by ``dense_layers`` (indices into :attr:`attention`).
    """

    pattern: str
    num_layers: int
    attention: Tuple[int, ...]
    lighthouse: Tuple[int, ...]
    dense: Tuple[int, ...]

    def describe(self) -> str:
        """``"4 of 8 attention layers run Lighthouse (hybrid layers 5, 7, 9, 11); dense: 1, 3, 13, 15"``."""
        return (f"{len(self.lighthouse)} of {len(self.attention)} attention layers run Lighthouse (hybrid layers "
                f"{_numbers(self.lighthouse)}); dense: {_numbers(self.dense) or 'none'}")


def _numbers(layers: Tuple[int, ...]) -> str:
    return ", ".join(map(str, layers))


@functools.lru_cache(maxsize=None)
def hybrid_attention_layers(pattern: str, lighthouse: "LighthouseConfig") -> HybridAttentionLayers:
    """Resolve ``pattern`` (Megatron's ``--hybrid-layer-pattern``) with ``lighthouse.dense_layers`` counted among
    its attention layers (computed once per pattern and settings).

    ``ValueError`` (the message names neither the pattern nor ``dense_layers``: callers say where the two came
    from) when the pattern is not a string, its main part has no attention layer, its multi-token-prediction part
    has attention layers (they would be built from the same attention-layer spec, numbered from 1 like the main
    stack's first layers), a ``dense_layers`` entry is out of range for the attention layers, or every attention
    layer is kept dense.
    """
    if not isinstance(pattern, str):
        raise ValueError(f"{pattern!r}: not a string such as '*-*-*-*-*-'")
    main, _, mtp = pattern.partition(MTP_SEPARATOR)
    layers = main.replace(PIPE, "")
    if ATTENTION in mtp:
        raise ValueError(f"its multi-token-prediction part ('{MTP_SEPARATOR}{mtp}') has attention layers "
                         f"('{ATTENTION}'), which Megatron builds from the same attention layer spec and numbers from "
                         f"1 like the main stack's; Lighthouse cannot tell them apart: leave '{ATTENTION}' out of the "
                         f"multi-token-prediction part")
    attention = tuple(i + 1 for i, symbol in enumerate(layers) if symbol == ATTENTION)
    if not attention:
        raise ValueError(f"no attention layer ('{ATTENTION}') in its main part: no layer would run Lighthouse")
    kept = lighthouse.dense_layer_set(len(attention), unit="attention layers")
    dense = tuple(n for i, n in enumerate(attention) if i in kept)
    if len(dense) == len(attention):
        raise ValueError(f"keeps all {len(attention)} attention layers (hybrid layers {_numbers(attention)}) dense: "
                         f"no layer would run Lighthouse")
    return HybridAttentionLayers(pattern=pattern, num_layers=len(layers), attention=attention,
                                 lighthouse=tuple(n for n in attention if n not in dense), dense=dense)
