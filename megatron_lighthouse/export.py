"""Export: the dense model spec and checkpoint of a Lighthouse-trained model.

Lighthouse adds no parameters and keeps the dense state-dict keys, so the dense checkpoint is the model's own
state dict; these helpers make that explicit and give the matching dense spec for fine-tuning and inference.
"""

from __future__ import annotations

import copy
import os
from typing import Dict, Union

import torch
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

from .atomic import write_atomic
from .core_attention import LighthouseCoreAttention
from .spec import replace_core_attention

Spec = Union[ModuleSpec, TransformerBlockSubmodules]


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """Strip DDP / ``Float16Module`` style wrappers (``.module`` attributes); ``ValueError`` unless ``model`` is a
    ``torch.nn.Module``."""
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"model: a {type(model).__name__}; must be a torch.nn.Module (possibly wrapped in DDP or "
                         f"Float16Module)")
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


def dense_state_dict(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """The state dict of the dense model (wrappers stripped): same keys and tensors as the Lighthouse model's."""
    return unwrap_model(model).state_dict()


def save_dense_checkpoint(model: torch.nn.Module, path: Union[str, os.PathLike]) -> None:
    """``torch.save`` :func:`dense_state_dict` to ``path``, atomically (:func:`~megatron_lighthouse.atomic.write_atomic`:
    a failed save leaves an earlier file whole); load it with ``dense_model.load_state_dict``. (Megatron-LM's own
    distributed checkpoints are already dense: the sharded keys are identical.) ``ValueError`` for a ``model`` that
    is no module or a ``path`` that is no path, before anything is written."""
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
        raise ValueError(f"path={path!r}: must be a file path (str or os.PathLike)")
    state = dense_state_dict(model)
    write_atomic(path, lambda f: torch.save(state, f))


def _dense_layer(spec: ModuleSpec) -> ModuleSpec:
    attn = getattr(getattr(spec, "submodules", None), "self_attention", None)
    sub = getattr(attn, "submodules", None)
    core = getattr(sub, "core_attention", None)
    if isinstance(core, ModuleSpec) and core.module is LighthouseCoreAttention:
        return replace_core_attention(spec, core.submodules.core_attention)
    return spec


def dense_spec_for(spec: Spec) -> Spec:
    """The dense counterpart of a Lighthouse layer, block or hybrid stack spec: each ``LighthouseCoreAttention``
    replaced by its inner core attention (state-dict compatible with the Lighthouse model)."""
    if isinstance(spec, TransformerBlockSubmodules):
        out = copy.copy(spec)
        out.layer_specs = [_dense_layer(s) for s in spec.layer_specs]
        return out
    if isinstance(spec, ModuleSpec) and hasattr(spec.submodules, "attention_layer"):  # a hybrid stack
        out = copy.copy(spec)
        out.submodules = copy.copy(spec.submodules)
        out.submodules.attention_layer = _dense_layer(spec.submodules.attention_layer)
        return out
    if isinstance(spec, ModuleSpec):
        return _dense_layer(spec)
    raise ValueError(f"dense_spec_for: expected a ModuleSpec (a layer or hybrid stack spec) or "
                     f"TransformerBlockSubmodules, got {type(spec).__name__}")
