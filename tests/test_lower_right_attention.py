"""Lower-right causal attention from SDPA's fused kernels (LSE-merged blocks) equals the masked reference."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from conftest import rel_l2
from megatron_lighthouse.lower_right_attention import kernel_family, lower_right_causal_attention


def _reference(q, k, v, scale):
    """Float64 SDPA with an explicit lower-right causal mask."""
    mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool).tril(k.shape[2] - q.shape[2])
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def _compare(shape_q, keys, dtype, tol):
    b, h, s, d = shape_q
    gen = torch.Generator().manual_seed(s * keys + d)
    q, k, v = (torch.randn(b, h, n, d, generator=gen).to(dtype) for n in (s, keys, keys))
    dout = torch.randn(b, h, s, d, generator=gen).to(dtype)
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
    out = lower_right_causal_attention(*leaves, 0.3)
    grads = torch.autograd.grad(out, leaves, dout)
    ref_leaves = [x.double().requires_grad_(True) for x in (q, k, v)]
    ref = _reference(*ref_leaves, 0.3)
    ref_grads = torch.autograd.grad(ref, ref_leaves, dout.double())
    assert out.dtype == dtype and out.shape == q.shape
    for name, got, want in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref, *ref_grads)):
        assert rel_l2(got, want) < tol, (name, rel_l2(got, want))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize(
    "shape_q,keys",
    [((2, 3, 16, 8), 16), ((2, 3, 16, 16), 48), ((1, 2, 40, 8), 120), ((1, 1, 5, 16), 17)],
    ids=["square", "prefix-2-chunks", "prefix-uneven", "odd-lengths"],
)
def test_fused_blocks_equal_masked_reference(shape_q, keys, dtype, tol):
    q = torch.zeros(shape_q, dtype=dtype)
    assert kernel_family(q, q, q, 0.3) == "flash_cpu"  # the merged-LSE path runs on CPU too
    _compare(shape_q, keys, dtype, tol)


def test_fallback_when_sdpa_picks_no_lse_kernel():
    q = torch.zeros(1, 2, 16, 8)
    with sdpa_kernel(SDPBackend.MATH):
        assert kernel_family(q, q, q, 0.3) is None
        _compare((1, 2, 16, 8), 48, torch.float32, 1e-5)
    q = torch.zeros(1, 2, 16, 12)  # head dim SDPA would pad: no raw kernel
    assert kernel_family(q, q, q, 0.3) is None
    _compare((1, 2, 16, 12), 32, torch.float32, 1e-5)


def test_fewer_keys_than_queries():
    q = torch.zeros(1, 1, 8, 8)
    with pytest.raises(ValueError, match="4 keys for 8 queries"):
        lower_right_causal_attention(q, q[:, :, :4], q[:, :, :4], 0.3)


def _bound(op, args, kwargs) -> dict:
    """``args``/``kwargs`` bound to the argument names of the real aten ``op`` schema (catches wrong orders)."""
    schema = [a.name for a in op.default._schema.arguments]
    bound = dict(zip(schema, args))
    assert not set(bound) & set(kwargs) and set(kwargs) <= set(schema), (schema, kwargs)
    bound.update(kwargs)
    assert set(schema) - set(bound) <= {a.name for a in op.default._schema.arguments if a.has_default_value()}
    return bound


class _CudaKernelsOnCpu:
    """Stand-ins for the CUDA flash / cuDNN aten ops, computed by the CPU flash kernel, that check every argument
    against the real schemas and return the log-sum-exp the way the CUDA kernels do (flash: padded rows; cuDNN:
    a trailing unit dim)."""

    PAD = 3
    real = torch.ops.aten

    def __getattr__(self, name):
        return getattr(self.real, name)

    def _forward(self, op, args, kwargs):
        a = _bound(op, args, kwargs)
        assert all(a[n].is_contiguous() for n in ("query", "key", "value"))
        out, lse = self.real._scaled_dot_product_flash_attention_for_cpu(
            a["query"], a["key"], a["value"], 0.0, a["is_causal"], scale=a["scale"])
        return a, out, lse

    def _backward(self, op, args, kwargs, lse):
        a = _bound(op, args, kwargs)
        assert a["dropout_p"] == 0.0 and a["out"].is_contiguous() and a["grad_out"].is_contiguous()
        return self.real._scaled_dot_product_flash_attention_for_cpu_backward(
            a["grad_out"], a["query"], a["key"], a["value"], a["out"], lse, 0.0, a["is_causal"], scale=a["scale"])

    def _scaled_dot_product_flash_attention(self, *args, **kwargs):
        a, out, lse = self._forward(self.real._scaled_dot_product_flash_attention, args, kwargs)
        padded = torch.nn.functional.pad(lse, (0, self.PAD), value=float("nan"))
        none = torch.empty(0)
        return out, padded, none, none, 0, 0, torch.tensor(7), torch.tensor(8), none

    def _scaled_dot_product_flash_attention_backward(self, *args, **kwargs):
        a = _bound(self.real._scaled_dot_product_flash_attention_backward, args, kwargs)
        assert a["logsumexp"].shape[-1] == a["query"].shape[2] + self.PAD
        assert int(a["philox_seed"]) == 7 and int(a["philox_offset"]) == 8
        return self._backward(self.real._scaled_dot_product_flash_attention_backward, args, kwargs,
                              a["logsumexp"][..., : -self.PAD])

    def _scaled_dot_product_cudnn_attention(self, *args, **kwargs):
        a, out, lse = self._forward(self.real._scaled_dot_product_cudnn_attention, args, kwargs)
        assert a["attn_bias"] is None and a["compute_log_sumexp"]
        none = torch.empty(0)
        return out, lse.unsqueeze(-1).contiguous(), none, none, 0, 0, torch.tensor(7), torch.tensor(8), none

    def _scaled_dot_product_cudnn_attention_backward(self, *args, **kwargs):
        a = _bound(self.real._scaled_dot_product_cudnn_attention_backward, args, kwargs)
        assert a["attn_bias"] is None and a["logsumexp"].shape[-1] == 1
        assert int(a["philox_seed"]) == 7 and int(a["philox_offset"]) == 8
        return self._backward(self.real._scaled_dot_product_cudnn_attention_backward, args, kwargs,
                              a["logsumexp"].squeeze(-1))


@pytest.mark.parametrize("family", ["flash", "cudnn"])
def test_cuda_kernel_adapters_follow_the_aten_schemas(monkeypatch, family):
    from megatron_lighthouse import lower_right_attention as lra

    monkeypatch.setattr(lra, "aten", _CudaKernelsOnCpu())
    monkeypatch.setattr(lra, "kernel_family", lambda *args: family)
    _compare((2, 3, 16, 8), 48, torch.float32, 1e-5)
