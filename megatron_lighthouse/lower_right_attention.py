"""Lower-right aligned causal attention from SDPA's own fused kernels, merged by log-sum-exp.

A context-parallel rank's query chunk holds the *last* ``s`` positions of a prefix of ``L`` keys: row ``i`` sees
keys ``0 .. L - s + i``. SDPA's ``is_causal`` is upper-left aligned, and its lower-right ``CausalBias`` only
reaches FlashAttention-2, never cuDNN (the fastest kernel on Hopper, the one SDPA picks for the square causal
case). So the attention is split into the two blocks every kernel supports, a square causal block (the last
``s`` keys) and a full rectangular block (the ``L - s`` keys before them), each run by the fused kernel SDPA
itself would choose, and merged exactly through their log-sum-exps (as ring attention does). Backward runs each
kernel's own backward with the merged output and log-sum-exp.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch.nn.attention import SDPBackend

aten = torch.ops.aten

#: Fused SDPA kernels that return their log-sum-exp, by the name :func:`kernel_family` gives them.
FAMILIES = ("cudnn", "flash", "flash_cpu")


def kernel_family(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float) -> Optional[str]:
    """The fused kernel SDPA would run for square causal attention on these tensors, if it exposes its LSE."""
    if q.shape[-1] % 8 != 0:  # SDPA pads such head dims itself; the raw kernels do not
        return None
    choice = torch._fused_sdp_choice(q, k, v, is_causal=True, scale=softmax_scale)
    if choice == int(SDPBackend.CUDNN_ATTENTION) and q.is_cuda:
        return "cudnn"
    if choice == int(SDPBackend.FLASH_ATTENTION):
        return "flash" if q.is_cuda else "flash_cpu"
    return None


def _kernel_forward(family: str, q, k, v, causal: bool, scale: float) -> Tuple[torch.Tensor, torch.Tensor, tuple]:
    """``(out [B,H,S,D], lse [B,H,S] float32, saved)`` of one block; ``saved`` feeds :func:`_kernel_backward`.

    All inputs contiguous ``[B, H, S, D]`` (the raw cuDNN op gives wrong results otherwise)."""
    if family == "flash_cpu":
        out, lse = aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
        saved = ()
    elif family == "flash":
        out, lse, cum_q, cum_k, max_q, max_k, rng_state, unused, _ = aten._scaled_dot_product_flash_attention(
            q, k, v, 0.0, causal, False, scale=scale
        )
        saved = (cum_q, cum_k, max_q, max_k, rng_state, unused)
    else:
        out, lse, cum_q, cum_k, max_q, max_k, seed, offset, _ = aten._scaled_dot_product_cudnn_attention(
            q, k, v, None, True, 0.0, causal, False, scale=scale
        )
        saved = (cum_q, cum_k, max_q, max_k, seed, offset)
    # cuDNN keeps a trailing unit dim, some FlashAttention builds pad the rows: merge on [B, H, S] only
    rows = lse.reshape(*q.shape[:2], -1)[..., : q.shape[2]]
    return out, rows, saved + (lse.shape,)


def _kernel_lse(lse: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The merged ``[B, H, S]`` log-sum-exp in the layout the kernel returned (``shape``), contiguous."""
    rows = shape[2] if len(shape) == 3 else lse.shape[2]
    if rows > lse.shape[2]:
        lse = torch.nn.functional.pad(lse, (0, rows - lse.shape[2]))
    return lse.reshape(shape).contiguous()


def _kernel_backward(family: str, dout, q, k, v, out, lse, causal: bool, scale: float, saved: tuple):
    """``(dq, dk, dv)`` of one block, given the *merged* output and log-sum-exp of the whole row."""
    *saved, lse_shape = saved
    lse = _kernel_lse(lse, lse_shape)
    if family == "flash_cpu":
        return aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, k, v, out, lse, 0.0, causal, scale=scale
        )
    if family == "flash":
        cum_q, cum_k, max_q, max_k, rng_state, unused = saved
        return aten._scaled_dot_product_flash_attention_backward(
            dout, q, k, v, out, lse, cum_q, cum_k, max_q, max_k, 0.0, causal, rng_state, unused, scale=scale
        )
    cum_q, cum_k, max_q, max_k, seed, offset = saved
    return aten._scaled_dot_product_cudnn_attention_backward(
        dout, q, k, v, out, lse, seed, offset, None, cum_q, cum_k, max_q, max_k, 0.0, causal, scale=scale
    )


def _blocks(k: torch.Tensor, v: torch.Tensor, s: int) -> List[Tuple[torch.Tensor, torch.Tensor, bool]]:
    """``(k, v, causal)``: the square causal block of the last ``s`` keys, then the full block before it."""
    split = k.shape[2] - s
    blocks = [(k[:, :, split:].contiguous(), v[:, :, split:].contiguous(), True)]
    if split > 0:
        blocks.append((k[:, :, :split].contiguous(), v[:, :, :split].contiguous(), False))
    return blocks


class _LowerRightCausal(torch.autograd.Function):
    """``q`` against the square causal block and the full block before it, merged by log-sum-exp."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, family: str):
        q = q.contiguous()
        blocks = _blocks(k, v, q.shape[2])
        results = [_kernel_forward(family, q, bk, bv, causal, scale) for bk, bv, causal in blocks]
        lses = torch.stack([lse.float() for _, lse, _ in results])
        lse = torch.logsumexp(lses, dim=0)
        weights = (lses - lse).exp().unsqueeze(-1)
        out = sum(w * o.float() for w, (o, _, _) in zip(weights, results)).to(q.dtype).contiguous()
        ctx.scale, ctx.family, ctx.saved = scale, family, [saved for _, _, saved in results]
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, dout: torch.Tensor):
        q, k, v, out, lse = ctx.saved_tensors
        dout = dout.contiguous()
        dq = torch.zeros_like(q, dtype=torch.float32)
        dkv = []
        for (bk, bv, causal), saved in zip(_blocks(k, v, q.shape[2]), ctx.saved):
            dq_b, dk_b, dv_b = _kernel_backward(ctx.family, dout, q, bk, bv, out, lse, causal, ctx.scale, saved)
            dq += dq_b
            dkv.append((dk_b, dv_b))
        dk = torch.cat([dk_b for dk_b, _ in reversed(dkv)], dim=2)
        dv = torch.cat([dv_b for _, dv_b in reversed(dkv)], dim=2)
        return dq.to(q.dtype), dk, dv, None, None


def lower_right_causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float
) -> torch.Tensor:
    """Causal attention of the last ``S_q`` positions of a sequence against all its ``S_k`` keys.

    Args:
        q: ``[B, H, S_q, D]``; k, v: ``[B, H, S_k, D]`` with ``S_k >= S_q``; one dtype and device.
        softmax_scale: scale applied to ``q k^T``.
    Returns:
        ``[B, H, S_q, D]``: row ``i`` attends to keys ``0 .. S_k - S_q + i``. Differentiable in q, k, v. Runs
        SDPA's fused kernel (cuDNN or FlashAttention) on the two blocks and merges them; where SDPA would pick
        none of those, SDPA with a lower-right ``CausalBias``.
    """
    if k.shape[2] < q.shape[2]:
        raise ValueError(f"lower_right_causal_attention: {k.shape[2]} keys for {q.shape[2]} queries (needs >=)")
    diag = [x[:, :, k.shape[2] - q.shape[2] :].contiguous() for x in (k, v)]  # probe: the square causal block
    family = kernel_family(q.contiguous(), *diag, softmax_scale)
    if family is None:
        from torch.nn.attention.bias import causal_lower_right  # imports torch._dynamo (~1.5 s): only here

        mask = causal_lower_right(q.shape[2], k.shape[2])
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=softmax_scale)
    return _LowerRightCausal.apply(q, k, v, softmax_scale, family)
