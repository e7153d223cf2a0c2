"""Lighthouse settings riding on Megatron-Core's ``TransformerConfig``.

:class:`LighthouseTransformerConfig` is a ``TransformerConfig`` with one extra field, ``lighthouse``
(a :class:`~megatron_lighthouse.config.LighthouseConfig`). The spec provider and
:class:`~megatron_lighthouse.core_attention.LighthouseCoreAttention` read it from there when the spec does not
carry the settings itself. Megatron-LM's ``pretrain_gpt.py`` builds a plain ``TransformerConfig`` from its
command line; there the settings come from ``LIGHTHOUSE_*`` environment variables (:func:`lighthouse_config_from_env`).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from typing import Mapping, Optional

from megatron.core.transformer.transformer_config import TransformerConfig

from .config import LighthouseConfig
from .dense import DENSE_KERNEL_ENV

_PREFIX = "LIGHTHOUSE_"
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
    ``LIGHTHOUSE_DENSE_LAYERS`` (comma-separated ints, may be empty); unset variables keep the defaults.

    ``ValueError`` names the variable, its value and the rule (``LIGHTHOUSE_TOPK=100: must be ...``); a variable
    spelled close to one of them or to ``LIGHTHOUSE_DENSE_KERNEL`` (the dense kernel, read by the core attention
    itself: :mod:`megatron_lighthouse.dense`), such as ``LIGHTHOUSE_POOLNG_FACTOR``, is refused too, as it would be
    silently ignored.
    """
    environ = os.environ if environ is None else environ
    settings = (*ENV_FIELDS, DENSE_KERNEL_ENV)
    for var in environ:
        if var.startswith(_PREFIX) and var not in settings:
            close = difflib.get_close_matches(var[len(_PREFIX):], [v[len(_PREFIX):] for v in settings], n=1,
                                              cutoff=0.75)
            if close:
                raise ValueError(f"{var}={environ[var]!r}: not a Lighthouse setting; did you mean {_PREFIX}{close[0]}? "
                                 f"(the settings: {', '.join(settings)})")
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
    try:
        return LighthouseConfig(**kwargs)
    except ValueError as err:  # "LighthouseConfig.topk=100: ..." -> "LIGHTHOUSE_TOPK=100: ..."
        message = str(err)
        for var, field in ENV_FIELDS.items():
            message = message.replace(f"LighthouseConfig.{field}=", f"{var}=")
        raise ValueError(message) from None


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
