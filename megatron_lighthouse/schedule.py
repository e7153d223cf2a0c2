"""The two-stage recipe: Lighthouse first, then dense attention, switched at run time.

:class:`LighthouseSchedule` says when a model's Lighthouse layers switch to dense attention;
:func:`set_lighthouse_enabled` and :func:`lighthouse_enabled` flip them. Nothing is rebuilt:
:class:`~megatron_lighthouse.core_attention.LighthouseCoreAttention` has no parameters, so the optimizer, its state
and the checkpoint stay as they are. Layers kept dense by ``LighthouseConfig.dense_layers`` are never switched on.

Importing this module does not import megatron-core (the core attention is imported on first use).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import TYPE_CHECKING, Iterator, List, Optional, Sequence, Union

import torch

if TYPE_CHECKING:
    from .core_attention import LighthouseCoreAttention

__all__ = ["LighthouseSchedule", "Model", "lighthouse_enabled", "lighthouse_modules", "set_lighthouse_enabled"]

#: A model: one module (possibly wrapped in DDP / ``Float16Module``) or a list of model chunks.
Model = Union[torch.nn.Module, Sequence[torch.nn.Module]]


@dataclasses.dataclass(frozen=True)
class LighthouseSchedule:
    """The paper's two stages: Lighthouse for iterations ``< dense_from_iteration``, dense from then on.

    ``dense_from_iteration=None`` keeps Lighthouse on throughout. Call :meth:`apply` once per iteration (cheap).
    ``ValueError`` at construction names the field and the rule.
    """

    dense_from_iteration: Optional[int] = None

    def __post_init__(self) -> None:
        it = self.dense_from_iteration
        if it is not None and (not isinstance(it, int) or isinstance(it, bool) or it < 0):
            raise ValueError(f"LighthouseSchedule.dense_from_iteration={it!r}: must be None or an int >= 0")

    def enabled_at(self, iteration: int) -> bool:
        """Whether the Lighthouse layers run Lighthouse at ``iteration`` (0-based: an int >= 0, else
        ``ValueError``)."""
        if isinstance(iteration, bool) or not isinstance(iteration, int) or iteration < 0:
            raise ValueError(f"iteration={iteration!r}: must be an int >= 0 (0-based training iteration)")
        return self.dense_from_iteration is None or iteration < self.dense_from_iteration

    def apply(self, model: Model, iteration: int) -> int:
        """Set ``model``'s Lighthouse layers for ``iteration``; returns how many run Lighthouse (0: all dense).
        ``ValueError`` for a bad ``iteration`` or a ``model`` that is no module or list of modules."""
        enabled = self.enabled_at(iteration)
        count = set_lighthouse_enabled(model, enabled)
        return count if enabled else 0


def model_chunks(model: Model) -> List[torch.nn.Module]:
    """``model`` as a list of modules: ``[model]`` for one module (e.g. wrapped in DDP / ``Float16Module``), the
    chunks of a list or tuple of them; ``ValueError`` for anything else (``None``, a string, a state dict)."""
    if isinstance(model, torch.nn.Module):
        return [model]
    if isinstance(model, (list, tuple)) and all(isinstance(chunk, torch.nn.Module) for chunk in model):
        return list(model)
    raise ValueError(f"model: a {type(model).__name__}; must be a torch.nn.Module (possibly wrapped) or a list of "
                     f"them (the model chunks of virtual pipelining)")


def lighthouse_modules(model: Model) -> List["LighthouseCoreAttention"]:
    """Every switchable :class:`~megatron_lighthouse.core_attention.LighthouseCoreAttention` in ``model`` (a module,
    e.g. wrapped in DDP / ``Float16Module``, or a list of model chunks), in module order; ``ValueError`` for a
    ``model`` that is neither (:func:`model_chunks`)."""
    chunks = model_chunks(model)
    from .core_attention import LighthouseCoreAttention  # megatron-core, on first use

    return [m for chunk in chunks for m in chunk.modules()
            if isinstance(m, LighthouseCoreAttention) and not m.dense_layer]


def set_lighthouse_enabled(model: Model, enabled: bool) -> int:
    """Run every Lighthouse layer of ``model`` with Lighthouse (``True``) or dense attention (``False``).

    Returns the number of Lighthouse layers set (0: the model has none). ``enabled`` other than ``True`` /
    ``False`` is a ``ValueError`` (a string such as ``"False"`` would switch them on).
    """
    if not isinstance(enabled, bool):
        raise ValueError(f"enabled={enabled!r}: must be True or False")
    modules = lighthouse_modules(model)
    for module in modules:
        module.enabled = enabled
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
