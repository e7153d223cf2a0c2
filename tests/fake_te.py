"""A stand-in for TransformerEngine (not installable here) that records how Megatron drives it.

:func:`install` must run before anything imports ``megatron.core.extensions.transformer_engine`` (use a fresh
process). Every ``transformer_engine.*`` import then resolves to a ``MagicMock`` module, except
``transformer_engine.pytorch.DotProductAttention``: :class:`FakeDotProductAttention`, which records its
constructor arguments and forward calls and computes what TE's documented API promises: causal attention on
``qkv_format="sbhd"`` inputs ``[S, B, H, D]`` (k/v with ``num_gqa_groups`` heads), returning ``[S, B, H*D]``;
with a CP group, over the load-balanced shards of the group's ranks.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import math
import sys
from typing import Any, Dict, List, Optional
from unittest.mock import MagicMock

import torch

#: The version the fake reports (new enough for every CP communication type Megatron passes).
TE_VERSION = "2.9.0"


class FakeDotProductAttention(torch.nn.Module):
    """``transformer_engine.pytorch.DotProductAttention`` as documented, recording every call."""

    #: ``("init", kwargs)``, ``("forward", info)`` and ``("set_context_parallel_group", args)`` in call order.
    calls: List[tuple] = []

    def __init__(self, num_attention_heads: int, kv_channels: int, **kwargs: Any) -> None:
        super().__init__()
        self.num_heads = num_attention_heads
        self.kv_channels = kv_channels
        self.qkv_format = kwargs.get("qkv_format", "sbhd")
        self.kwargs = kwargs
        self.cp_group = kwargs.get("cp_group")
        FakeDotProductAttention.calls.append(("init", dict(num_attention_heads=num_attention_heads,
                                                           kv_channels=kv_channels, **kwargs)))

    def set_context_parallel_group(self, cp_group, cp_global_ranks, cp_stream, cp_comm_type="p2p") -> None:
        self.cp_group = cp_group
        FakeDotProductAttention.calls.append(("set_context_parallel_group",
                                              (cp_group, cp_global_ranks, cp_stream, cp_comm_type)))

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: Optional[torch.Tensor] = None, **kwargs: Any) -> torch.Tensor:
        from megatron_lighthouse.dense import sdpa_causal
        from megatron_lighthouse.context_parallel import cp_causal_attention

        info: Dict[str, Any] = dict(query=tuple(query.shape), key=tuple(key.shape), value=tuple(value.shape),
                                    attention_mask=attention_mask, cp_group=self.cp_group, **kwargs)
        FakeDotProductAttention.calls.append(("forward", info))
        fmt = kwargs.get("qkv_format") or self.qkv_format
        mask_type = kwargs.get("attn_mask_type", self.kwargs.get("attn_mask_type"))
        if fmt != "sbhd" or mask_type != "causal":
            raise NotImplementedError(f"fake TE: only sbhd causal attention (got {fmt}, {mask_type})")
        s, b, h, d = query.shape
        groups = h // key.shape[2]
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))  # [B, H, S, D]
        k, v = (x.repeat_interleave(groups, dim=1) for x in (k, v))
        scale = self.kwargs.get("softmax_scale") or 1.0 / math.sqrt(self.kv_channels)
        group = self.cp_group
        if isinstance(group, (list, tuple)):  # "a2a+p2p": hierarchical groups spanning the whole CP group
            from megatron.core import parallel_state

            group = parallel_state.get_context_parallel_group()
        if group is not None and torch.distributed.get_world_size(group) > 1:
            out = cp_causal_attention(q, k, v, scale, group)
        else:
            out = sdpa_causal(q, k, v, scale)
        return out.permute(2, 0, 1, 3).reshape(s, b, h * d)


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolves ``transformer_engine`` and all its submodules to attributes of one ``MagicMock``."""

    def __init__(self, root: MagicMock) -> None:
        self.root = root

    def find_spec(self, name, path, target=None):
        if name == "transformer_engine" or name.startswith("transformer_engine."):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        module = self.root
        for part in spec.name.split(".")[1:]:
            module = getattr(module, part)
        return module

    def exec_module(self, module) -> None:
        pass


def install() -> type:
    """Make ``import transformer_engine`` succeed with the fake (once per process); returns
    :class:`FakeDotProductAttention`."""
    if any(isinstance(finder, _Finder) for finder in sys.meta_path):
        return FakeDotProductAttention
    if "megatron.core.extensions.transformer_engine" in sys.modules:
        raise RuntimeError("fake TE must be installed before megatron.core.extensions.transformer_engine is imported")
    root = MagicMock(name="transformer_engine")
    root.__version__ = TE_VERSION
    root.pytorch.DotProductAttention = FakeDotProductAttention
    sys.meta_path.insert(0, _Finder(root))
    return FakeDotProductAttention
