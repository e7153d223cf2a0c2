"""The two-stage switch: flip Lighthouse layers to their inner dense attention at run time.

Nothing is rebuilt: :class:`~megatron_lighthouse.core_attention.LighthouseCoreAttention` has no parameters, so
the optimizer, its state and the checkpoint stay as they are. Layers kept dense by ``dense_layers`` are never
switched on. When each layer switches is :class:`~megatron_lighthouse.schedule.LighthouseSchedule` (also
importable from here).
"""

from __future__ import annotations

import contextlib
from typing import Iterator, List, Sequence, Union

import torch

from .core_attention import LighthouseCoreAttention
from .schedule import LighthouseSchedule

__all__ = ["LighthouseSchedule", "Model", "lighthouse_enabled", "lighthouse_modules", "set_lighthouse_enabled"]

Model = Union[torch.nn.Module, Sequence[torch.nn.Module]]


def lighthouse_modules(model: Model) -> List[LighthouseCoreAttention]:
    """Every switchable :class:`LighthouseCoreAttention` in ``model`` (a module, e.g. wrapped in DDP /
    ``Float16Module``, or a list of model chunks), in module order."""
    chunks = [model] if isinstance(model, torch.nn.Module) else list(model)
    return [m for chunk in chunks for m in chunk.modules()
            if isinstance(m, LighthouseCoreAttention) and not m.dense_layer]


def set_lighthouse_enabled(model: Model, enabled: bool) -> int:
    """Run every Lighthouse layer of ``model`` with Lighthouse (``True``) or dense attention (``False``).

    Returns the number of Lighthouse layers set (0: the model has none).
    """
    modules = lighthouse_modules(model)
    for module in modules:
        module.enabled = bool(enabled)
        module.dense_weight = 0.0
    return len(modules)


@contextlib.contextmanager
def lighthouse_enabled(model: Model, enabled: bool) -> Iterator[int]:
    """Context manager: :func:`set_lighthouse_enabled` inside, each layer's previous state restored on exit.
    Yields the number of Lighthouse layers set."""
    modules = lighthouse_modules(model)
    previous = [(m.enabled, m.dense_weight) for m in modules]
    try:
        yield set_lighthouse_enabled(modules, enabled)
    finally:
        for module, (state, weight) in zip(modules, previous):
            module.enabled, module.dense_weight = state, weight
