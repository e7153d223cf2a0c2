"""Ready-made layer specs for Megatron-LM's unpatched ``pretrain_gpt.py --spec MODULE NAME``.

``--spec`` imports ``MODULE`` and takes its attribute ``NAME`` as the layer spec, without calling anything, so this
module builds its three specs when it is imported, which ``pretrain_gpt.py`` does after parsing its arguments.
Import it for nothing else. The settings come from the environment and from Megatron-LM's parsed arguments:

- ``LIGHTHOUSE_LEVELS``, ``LIGHTHOUSE_POOLING_FACTOR``, ``LIGHTHOUSE_TOPK``, ``LIGHTHOUSE_DENSE_LAYERS``
  (:func:`~megatron_lighthouse.transformer_config.lighthouse_config_from_env`; unset ones keep the defaults);
- ``--qk-layernorm``, ``--num-experts``, ``--normalization`` and the other layer-spec options of Megatron-LM.

``--spec megatron_lighthouse.env_spec lighthouse_layer_spec``: the TE layer spec (the local one without
TransformerEngine); ``lighthouse_local_layer_spec``: the local one (``--transformer-impl local``);
``dense_local_layer_spec``: its dense counterpart for stage two without TransformerEngine (with TE, stage two
drops ``--spec``). Megatron-LM's patched ``pretrain_gpt.py`` (``patches/``) needs none of this.
"""

from __future__ import annotations

import logging

from .spec import (
    get_gpt_layer_dense_spec,
    get_gpt_layer_with_lighthouse_spec,
    have_transformer_engine,
    layer_spec_kwargs,
)
from .transformer_config import lighthouse_config_from_env

logger = logging.getLogger(__name__)


def _megatron_lm_layer_kwargs() -> dict:
    """Layer-spec options from Megatron-LM's parsed arguments (``{}`` before Megatron-LM has parsed them)."""
    try:
        from megatron.training import global_vars
    except ImportError:
        return {}
    args = getattr(global_vars, "_GLOBAL_ARGS", None)
    return {} if args is None else layer_spec_kwargs(args)


_LIGHTHOUSE = lighthouse_config_from_env()
_LAYER_KWARGS = _megatron_lm_layer_kwargs()

#: The local Lighthouse layer spec (inner ``SDPACoreAttention``).
lighthouse_local_layer_spec = get_gpt_layer_with_lighthouse_spec(lighthouse=_LIGHTHOUSE, use_transformer_engine=False,
                                                                 **_LAYER_KWARGS)
#: The TE Lighthouse layer spec (inner ``TEDotProductAttention``), or the local one without TransformerEngine.
lighthouse_layer_spec = (get_gpt_layer_with_lighthouse_spec(lighthouse=_LIGHTHOUSE, use_transformer_engine=True,
                                                            **_LAYER_KWARGS)
                         if have_transformer_engine() else lighthouse_local_layer_spec)
#: The dense local layer spec (``SDPACoreAttention``): stage two without TransformerEngine.
dense_local_layer_spec = get_gpt_layer_dense_spec(use_transformer_engine=False, **_LAYER_KWARGS)

logger.info("megatron_lighthouse.env_spec: %s, layer-spec options %s, TransformerEngine %s", _LIGHTHOUSE,
            _LAYER_KWARGS, "found" if have_transformer_engine() else "not found (lighthouse_layer_spec is local)")
