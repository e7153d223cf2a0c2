"""Ready-made specs for Megatron-LM's unpatched ``pretrain_gpt.py`` / ``pretrain_hybrid.py --spec MODULE NAME``.

``--spec`` imports ``MODULE`` after Megatron-LM has parsed its arguments and takes ``vars(module)[NAME]`` as the
layer spec (``pretrain_hybrid.py``: the hybrid stack spec), without calling anything
(``megatron.core.transformer.spec_utils.import_module``). Each spec is built when first asked for and kept: the
one ``--spec`` names, when this module is imported (``vars`` does not consult a module ``__getattr__``); the
others on first attribute access (PEP 562). An unknown name is an ``AttributeError``, and a ``--spec`` naming one a
``ValueError`` at import. The settings come from the environment and from Megatron-LM's parsed arguments:

- ``LIGHTHOUSE_LEVELS``, ``LIGHTHOUSE_POOLING_FACTOR``, ``LIGHTHOUSE_TOPK``, ``LIGHTHOUSE_DENSE_LAYERS``,
  ``LIGHTHOUSE_ROPE`` (:func:`~megatron_lighthouse.transformer_config.lighthouse_config_from_env`; unset ones keep
  the defaults, a misspelt or unknown ``LIGHTHOUSE_*`` variable is refused),
  checked against ``--seq-length``, ``--context-parallel-size``, ``--num-layers`` and the Megatron-LM flags that
  cannot work with Lighthouse as the patched hook checks its flags
  (:func:`~megatron_lighthouse.megatron_lm.check_lighthouse_against_args`; the messages name the variables);
- ``--qk-layernorm``, ``--num-experts``, ``--normalization`` and the other layer-spec options of Megatron-LM.

``--spec megatron_lighthouse.env_spec lighthouse_layer_spec``: the TE layer spec (the local one without
TransformerEngine); ``lighthouse_local_layer_spec``: the local one (``--transformer-impl local``);
``dense_local_layer_spec``: its dense counterpart for stage two without TransformerEngine (with TE, stage two
drops ``--spec``), which reads no ``LIGHTHOUSE_*`` variable.

For ``pretrain_hybrid.py`` (megatron-core >= 0.19), hybrid stack specs for its ``--hybrid-layer-pattern``, whose
attention layers ``LIGHTHOUSE_DENSE_LAYERS`` count (:mod:`megatron_lighthouse.hybrid_spec`):
``lighthouse_hybrid_stack_spec`` (Megatron's ``hybrid_stack_spec`` with Lighthouse; the local stack without
TransformerEngine), ``lighthouse_local_hybrid_stack_spec`` (the local stack, ``--transformer-impl local``) and
``dense_local_hybrid_stack_spec`` (its dense counterpart for stage two without TransformerEngine; with TE stage two
takes Megatron's own ``hybrid_stack_spec``). Megatron-LM's patched scripts (``patches/``) need none of this.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

from megatron.core.transformer.spec_utils import ModuleSpec

from .config import LighthouseConfig
from .hybrid_spec import get_hybrid_stack_dense_spec, get_hybrid_stack_with_lighthouse_spec, require_hybrid_model
from .megatron_lm import check_lighthouse_against_args
from .spec import (
    get_gpt_layer_dense_spec,
    get_gpt_layer_with_lighthouse_spec,
    have_transformer_engine,
    layer_spec_kwargs,
)
from .transformer_config import ENV_FIELDS, lighthouse_config_from_env

logger = logging.getLogger(__name__)

#: The GPT layer specs and hybrid stack specs this module serves.
LAYER_SPECS = ("lighthouse_layer_spec", "lighthouse_local_layer_spec", "dense_local_layer_spec")
HYBRID_STACK_SPECS = ("lighthouse_hybrid_stack_spec", "lighthouse_local_hybrid_stack_spec",
                      "dense_local_hybrid_stack_spec")
NAMES = LAYER_SPECS + HYBRID_STACK_SPECS


def _megatron_lm_args() -> Optional[Any]:
    """Megatron-LM's parsed arguments (``None`` before Megatron-LM has parsed them, or without Megatron-LM)."""
    try:
        from megatron.training import global_vars
    except ImportError:
        return None
    return getattr(global_vars, "_GLOBAL_ARGS", None)


def _lighthouse_from_env(name: str, args: Optional[Any]) -> LighthouseConfig:
    """The ``LIGHTHOUSE_*`` settings, checked against Megatron-LM's arguments when there are any."""
    lighthouse = lighthouse_config_from_env()
    if args is not None:
        check_lighthouse_against_args(lighthouse, args, f"--spec {__name__} {name}",
                                      {field: f"{var}=" for var, field in ENV_FIELDS.items()})
    return lighthouse


def _build_hybrid_stack(name: str, args: Optional[Any]) -> ModuleSpec:
    """The hybrid stack spec ``name`` (one of :data:`HYBRID_STACK_SPECS`) for ``pretrain_hybrid.py``'s arguments."""
    require_hybrid_model()
    pattern = getattr(args, "hybrid_layer_pattern", None)
    if not pattern:
        raise ValueError(f"--spec {__name__} {name}: a hybrid stack spec for pretrain_hybrid.py, built for its "
                         f"--hybrid-layer-pattern; Megatron-LM's parsed arguments have none")
    normalization = getattr(args, "normalization", None)
    if name == "dense_local_hybrid_stack_spec":
        logger.info("megatron_lighthouse.env_spec: %s", name)
        return get_hybrid_stack_dense_spec(use_transformer_engine=False, normalization=normalization)
    lighthouse = _lighthouse_from_env(name, args)
    use_te = name == "lighthouse_hybrid_stack_spec" and have_transformer_engine()
    logger.info("megatron_lighthouse.env_spec: %s, %s, --hybrid-layer-pattern %s, %s", name, lighthouse, pattern,
                "TransformerEngine" if use_te else "local")
    return get_hybrid_stack_with_lighthouse_spec(lighthouse, pattern, use_transformer_engine=use_te,
                                                 normalization=normalization)


def _build(name: str) -> ModuleSpec:
    """The spec ``name`` (one of :data:`NAMES`) for the environment and Megatron-LM's arguments."""
    args = _megatron_lm_args()
    if name in HYBRID_STACK_SPECS:
        return _build_hybrid_stack(name, args)
    kwargs = {} if args is None else layer_spec_kwargs(args)
    if name == "dense_local_layer_spec":
        logger.info("megatron_lighthouse.env_spec: %s, layer-spec options %s", name, kwargs)
        return get_gpt_layer_dense_spec(use_transformer_engine=False, **kwargs)
    lighthouse = _lighthouse_from_env(name, args)
    use_te = name == "lighthouse_layer_spec" and have_transformer_engine()
    logger.info("megatron_lighthouse.env_spec: %s, %s, layer-spec options %s, %s", name, lighthouse, kwargs,
                "TransformerEngine" if use_te else "local")
    return get_gpt_layer_with_lighthouse_spec(lighthouse=lighthouse, use_transformer_engine=use_te, **kwargs)


def __getattr__(name: str) -> ModuleSpec:
    """PEP 562: build one of :data:`NAMES` on first access and keep it as a module attribute."""
    if name not in NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}; its specs: {', '.join(NAMES)}")
    spec = globals()[name] = _build(name)
    return spec


_REQUESTED = getattr(_megatron_lm_args(), "spec", None) or ()
if len(_REQUESTED) == 2 and _REQUESTED[0] == __name__:  # imported for --spec: build that spec now (see above)
    if _REQUESTED[1] not in NAMES:
        raise ValueError(f"--spec {__name__} {_REQUESTED[1]}: not a spec of this module; use one of "
                         f"{', '.join(NAMES)}")
    __getattr__(_REQUESTED[1])
