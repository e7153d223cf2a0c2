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
    "LIGHTHOUSE_ROPE": "rope",
}
#: ``LIGHTHOUSE_*`` variables of this project that are not settings (they may be in the environment of a launch):
#: the variable -> what reads it.
OTHER_VARIABLES = {
    "LIGHTHOUSE_CHECKPOINT": "examples/resume_dense.sh",
    "LIGHTHOUSE_GOLDEN_DIR": "the tests",
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
    """``LighthouseConfig`` from ``LIGHTHOUSE_LEVELS``, ``LIGHTHOUSE_POOLING_FACTOR``, ``LIGHTHOUSE_TOPK``,
    ``LIGHTHOUSE_DENSE_LAYERS`` (comma-separated ints, may be empty) and ``LIGHTHOUSE_ROPE`` (``entries`` or
    ``tokens``); unset variables keep the defaults.

    ``ValueError`` names the variable, its value and the rule (``LIGHTHOUSE_TOPK=100: must be ...``). Every other
    ``LIGHTHOUSE_*`` variable is refused as well (it would be silently ignored), with the setting it likely meant
    when it is spelled close to one (``LIGHTHOUSE_POOLNG_FACTOR``), except ``LIGHTHOUSE_DENSE_KERNEL`` (the dense
    kernel, read by the core attention itself: :mod:`megatron_lighthouse.dense`) and the project's own
    :data:`OTHER_VARIABLES`.
    """
    environ = os.environ if environ is None else environ
    settings = (*ENV_FIELDS, DENSE_KERNEL_ENV)
    for var in environ:
        if var.startswith(_PREFIX) and var not in settings and var not in OTHER_VARIABLES:
            close = difflib.get_close_matches(var[len(_PREFIX):], [v[len(_PREFIX):] for v in settings], n=1,
                                              cutoff=0.75)
            meant = f"did you mean {_PREFIX}{close[0]}? " if close else ""
            raise ValueError(f"{var}={environ[var]!r}: not a Lighthouse setting; {meant}(the settings: "
                             f"{', '.join(settings)}; the other LIGHTHOUSE_* variables: "
                             f"{', '.join(f'{v} of {who}' for v, who in OTHER_VARIABLES.items())})")
    kwargs = {}
    for var, field in ENV_FIELDS.items():
        raw = environ.get(var)
        if raw is None:
            continue
        try:
            if field == "dense_layers":
                kwargs[field] = tuple(int(x) for x in raw.split(",") if x.strip())
            elif field == "rope":
                kwargs[field] = raw
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
