"""``LighthouseSelfAttention``: Megatron's ``SelfAttention`` that lets a Lighthouse core attention place RoPE.

Megatron rotates q and k before its core attention is called. The published Lighthouse model pools and selects
them un-rotated and rotates each selected entry at its last token's position (``LighthouseConfig.rope ==
"entries"``). While its core attention is a :class:`~megatron_lighthouse.core_attention.LighthouseCoreAttention`
running Lighthouse with that setting, this module hands Megatron's rotary table to the core attention and runs
``SelfAttention.forward`` without it; in every other case (dense layers, the dense stage, ``rope == "tokens"``, no
RoPE) it is ``SelfAttention`` unchanged. Inference through Megatron's ``inference_context`` is refused while
Lighthouse runs (it is training-only). It has no parameters or state of its own: checkpoints are the dense model's.
"""

from __future__ import annotations

import inspect
from typing import Any

from megatron.core.transformer.attention import SelfAttention

from .core_attention import TRAINING_ONLY, LighthouseCoreAttention

_FORWARD = inspect.signature(SelfAttention.forward)


def _layer_skips_rope(config: Any, layer_number: int) -> bool:
    """Megatron's ``no_rope_freq``: this (1-based) layer has no RoPE."""
    no_rope = getattr(config, "no_rope_freq", None)
    return bool(no_rope) and bool(no_rope[layer_number - 1])


class LighthouseSelfAttention(SelfAttention):
    """``SelfAttention`` (same constructor) whose Lighthouse core attention rotates the selected entries."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if isinstance(self.core_attention, LighthouseCoreAttention):
            self.core_attention.rotary_handoff = True

    def forward(self, *args: Any, **kwargs: Any):
        """``SelfAttention.forward``; see the module docstring for what happens to ``rotary_pos_emb``."""
        core = self.core_attention
        if not (isinstance(core, LighthouseCoreAttention) and core.enabled):
            return super().forward(*args, **kwargs)
        call = _FORWARD.bind(self, *args, **kwargs)
        if call.arguments.get("inference_context") is not None or call.arguments.get("inference_params") is not None:
            raise ValueError(f"LighthouseSelfAttention (layer {self.layer_number}): {TRAINING_ONLY}")
        if core.lighthouse.rope != "entries":
            return super().forward(*args, **kwargs)
        rotary = call.arguments.get("rotary_pos_emb")
        if isinstance(rotary, tuple):
            q_emb, k_emb = rotary
            if q_emb is not k_emb and not (q_emb is not None and k_emb is not None and q_emb.equal(k_emb)):
                raise ValueError(f"LighthouseSelfAttention (layer {self.layer_number}): rope='entries' rotates q "
                                 f"and k entries at one position each, so rotary_pos_emb must be one table for "
                                 f"both (got different q and k tables)")
            rotary = q_emb
        if _layer_skips_rope(self.config, self.layer_number):
            rotary = None
        core.rotary_freqs = rotary
        call.arguments["rotary_pos_emb"] = None
        return super().forward(*call.args[1:], **call.kwargs)
