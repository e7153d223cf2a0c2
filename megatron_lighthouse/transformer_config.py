"""Lighthouse settings riding on Megatron-Core's ``TransformerConfig``.

:class:`LighthouseTransformerConfig` is a ``TransformerConfig`` with one extra field, ``lighthouse``
(a :class:`~megatron_lighthouse.config.LighthouseConfig`). The spec provider and
:class:`~megatron_lighthouse.core_attention.LighthouseCoreAttention` read it from there when the spec does not
carry the settings itself. Megatron-LM's ``pretrain_gpt.py`` builds a plain ``TransformerConfig`` from its
command line; there the settings come from ``LIGHTHOUSE_*`` environment variables (:func:`lighthouse_config_from_env`).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, List, Mapping, Optional

from megatron.core import parallel_state
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import is_layer_window_attention

from .config import LighthouseConfig

#: Environment variable -> ``LighthouseConfig`` field read by :func:`lighthouse_config_from_env`.
ENV_FIELDS = {
    "LIGHTHOUSE_LEVELS": "levels",
    "LIGHTHOUSE_POOLING_FACTOR": "pooling_factor",
    "LIGHTHOUSE_TOPK": "topk",
    "LIGHTHOUSE_DENSE_LAYERS": "dense_layers",
}


@dataclasses.dataclass
class LighthouseTransformerConfig(TransformerConfig):
    """``TransformerConfig`` plus the Lighthouse settings (``None``: the model has no Lighthouse layers)."""

    lighthouse: Optional[LighthouseConfig] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.lighthouse is not None and not isinstance(self.lighthouse, LighthouseConfig):
            raise ValueError(
                f"LighthouseTransformerConfig.lighthouse={self.lighthouse!r}: must be a LighthouseConfig or None"
            )


def lighthouse_config_from_env(environ: Optional[Mapping[str, str]] = None) -> LighthouseConfig:
    """``LighthouseConfig`` from ``LIGHTHOUSE_LEVELS``, ``LIGHTHOUSE_POOLING_FACTOR``, ``LIGHTHOUSE_TOPK`` and
    ``LIGHTHOUSE_DENSE_LAYERS`` (comma-separated ints, may be empty); unset variables keep the defaults."""
    environ = os.environ if environ is None else environ
    kwargs = {}
    for var, field in ENV_FIELDS.items():
        raw = environ.get(var)
        if raw is None:
            continue
        try:
            if field == "dense_layers":
                kwargs[field] = tuple(int(x) for x in raw.split(",") if x.strip())
            else:
                kwargs[field] = int(raw)
        except ValueError:
            raise ValueError(f"{var}={raw!r}: must be an int" + (" list, comma-separated" if field == "dense_layers"
                                                                   else "")) from None
    return LighthouseConfig(**kwargs)


def resolve_lighthouse(config: TransformerConfig, lighthouse: Optional[LighthouseConfig]) -> LighthouseConfig:
    """The settings to use: ``lighthouse`` if given, else ``config.lighthouse``; ``ValueError`` if neither."""
    if lighthouse is None:
        lighthouse = getattr(config, "lighthouse", None)
    if lighthouse is None:
        raise ValueError(
            "no Lighthouse settings: pass lighthouse=LighthouseConfig(...) to the spec, or use a "
            "LighthouseTransformerConfig with its `lighthouse` field set"
        )
    if not isinstance(lighthouse, LighthouseConfig):
        raise ValueError(f"lighthouse={lighthouse!r}: must be a LighthouseConfig")
    return lighthouse


def unsupported_attention_settings(config: TransformerConfig, layer_number: Optional[int]) -> List[str]:
    """The ``config`` settings a causal core attention of this package cannot honour at (1-based)
    ``layer_number``: sliding-window attention on that layer (not checked when ``layer_number`` is ``None``), and
    ``qk_clip`` / ``log_max_attention_logit`` (Megatron reads the max logit back from the core attention, which
    these modules do not compute). Returns ``"name=value"`` strings, empty when all is supported."""
    found = []
    window = getattr(config, "window_size", None)
    if window and layer_number is not None and is_layer_window_attention(
        window, getattr(config, "window_attn_skip_freq", None), layer_number
    ):
        found.append(f"window_size={window}")
    found += [f"{name}=True" for name in ("qk_clip", "log_max_attention_logit") if getattr(config, name, False)]
    return found


def context_parallel_group(config: TransformerConfig, pg_collection: Optional[Any], owner: str) -> Optional[Any]:
    """The CP process group a core attention runs over (``None`` without context parallelism):
    ``pg_collection.cp`` when given, else Megatron's global CP group.

    ``ValueError`` naming ``owner`` when the group's size is not ``config.context_parallel_size`` (each rank would
    hold a shard of another layout: a wrong answer, or a hang in the inner attention's collectives).
    """
    group = getattr(pg_collection, "cp", None) if pg_collection is not None else None
    if group is None and config.context_parallel_size > 1:
        group = parallel_state.get_context_parallel_group()
    size = 1 if group is None else group.size()
    if size != config.context_parallel_size:
        raise ValueError(
            f"{owner}: the context-parallel group has {size} ranks but config.context_parallel_size="
            f"{config.context_parallel_size}: they must be equal (pass pg_collection.cp of that size, or set "
            f"context_parallel_size to the group's size)"
        )
    return group if size > 1 else None


def check_cp_comm_type(cp_comm_type: Any, context_parallel_size: int) -> None:
    """``ValueError`` unless ``cp_comm_type`` is a context-parallel communication type TransformerEngine accepts.

    Megatron hands ``cp_comm_type`` to TE's ``DotProductAttention`` unchanged, and TE only rejects an unknown
    value at the first forward under context parallelism, so it is checked here, whatever
    ``context_parallel_size`` (a config that is wrong at CP=1 breaks the day CP is switched on).

    Args:
        cp_comm_type: ``None`` (Megatron's default: ``"p2p"`` under CP), one of TE's ``"p2p"``,
            ``"all_gather"``, ``"a2a"``, ``"a2a+p2p"``, or a list / tuple of those per layer (as
            ``TransformerConfig.cp_comm_type`` allows). ``"allgather"`` is refused, not normalised: TE spells
            it ``"all_gather"``.
        context_parallel_size: the CP size the value is for (a positive int; named in the messages).
    """
    accepted = ("p2p", "all_gather", "a2a", "a2a+p2p")
    if isinstance(context_parallel_size, bool) or not isinstance(context_parallel_size, int) \
            or context_parallel_size < 1:
        raise ValueError(f"context_parallel_size={context_parallel_size!r}: must be a positive int")

    def check(value: Any, where: str) -> None:
        if value is None or (isinstance(value, str) and value in accepted):
            return
        hint = ""
        if isinstance(value, str):
            plain = value.lower().replace("-", "").replace("_", "").replace(" ", "")
            close = [name for name in accepted if name.replace("_", "") == plain]
            if close:
                hint = f"; use {close[0]!r} (TransformerEngine's spelling)"
        raise ValueError(
            f"{where}={value!r} (context_parallel_size={context_parallel_size}): not a context-parallel "
            f"communication type of TransformerEngine, which accepts {', '.join(map(repr, accepted))}{hint}. "
            f"Megatron passes the value to TE unchanged, and TE would only fail at the first forward under "
            f"context parallelism"
        )

    if isinstance(cp_comm_type, (list, tuple)):
        for layer, value in enumerate(cp_comm_type):
            check(value, f"cp_comm_type[{layer}]")
    else:
        check(cp_comm_type, "cp_comm_type")
