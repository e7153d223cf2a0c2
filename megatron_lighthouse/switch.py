"""The two-stage switch: flip Lighthouse layers to their inner dense attention at run time.

Nothing is rebuilt: :class:`~megatron_lighthouse.core_attention.LighthouseCoreAttention` has no parameters, so
the optimizer, its state and the checkpoint stay as they are. Layers kept dense by ``dense_layers`` are never
switched on.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterator, List, Sequence, Union

import torch

from .core_attention import LighthouseCoreAttention

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
    return len(modules)


@contextlib.contextmanager
def lighthouse_enabled(model: Model, enabled: bool) -> Iterator[int]:
    """Context manager: :func:`set_lighthouse_enabled` inside, each layer's previous state restored on exit.
    Yields the number of Lighthouse layers set."""
    modules = lighthouse_modules(model)
    previous = [m.enabled for m in modules]
    try:
        yield set_lighthouse_enabled(modules, enabled)
    finally:
        for module, state in zip(modules, previous):
            module.enabled = state


@dataclasses.dataclass(frozen=True)
class LighthouseSchedule:
    """The paper's recipe: Lighthouse for iterations ``< dense_from_iteration``, dense from then on.

    ``dense_from_iteration=None`` keeps Lighthouse on throughout. ``dense_every=N`` (not in the paper) also runs
    every ``N``-th iteration of the Lighthouse stage densely (iterations with ``(iteration + 1) % N == 0``), so
    the model keeps training its dense attention while Lighthouse does most steps. Call :meth:`apply` once per
    iteration (cheap).
    """

    dense_from_iteration: Union[int, None] = None
    dense_every: Union[int, None] = None

    def __post_init__(self) -> None:
        it = self.dense_from_iteration
        if it is not None and (not isinstance(it, int) or isinstance(it, bool) or it < 0):
            raise ValueError(f"LighthouseSchedule.dense_from_iteration={it!r}: must be None or an int >= 0")
        every = self.dense_every
        if every is not None and (not isinstance(every, int) or isinstance(every, bool) or every < 2):
            raise ValueError(f"LighthouseSchedule.dense_every={every!r}: must be None or an int >= 2 (1 would make "
                             "every iteration dense)")

    def in_lighthouse_stage(self, iteration: int) -> bool:
        """Whether ``iteration`` is before the switch (``dense_every`` steps included)."""
        return self.dense_from_iteration is None or iteration < self.dense_from_iteration

    def enabled_at(self, iteration: int) -> bool:
        """Whether Lighthouse runs at ``iteration``."""
        interleaved_dense = self.dense_every is not None and (iteration + 1) % self.dense_every == 0
        return self.in_lighthouse_stage(iteration) and not interleaved_dense

    def apply(self, model: Model, iteration: int) -> bool:
        """Set ``model``'s Lighthouse layers for ``iteration``; returns whether Lighthouse is on."""
        enabled = self.enabled_at(iteration)
        set_lighthouse_enabled(model, enabled)
        return enabled
