"""Dense-kernel choice of ``megatron_lighthouse.dense``: names, and the timed ``"auto"`` pick (CPU-timed here)."""

from __future__ import annotations

import time

import pytest
import torch

from megatron_lighthouse import lighthouse_attention
from megatron_lighthouse.dense import DENSE_KERNELS, available_kernels, dense_attention, pick_fastest, sdpa_causal


def _qkv(s: int = 64):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(1, 2, s, 8, generator=gen) for _ in range(3)]


def _slow(q, k, v, softmax_scale):
    time.sleep(0.02)
    return sdpa_causal(q, k, v, softmax_scale)


def _broken(q, k, v, softmax_scale):
    raise RuntimeError("unsupported here")


def test_pick_fastest_skips_failing_and_slow_kernels():
    q, k, v = _qkv()
    kernels = {"slow": _slow, "broken": _broken, "sdpa": sdpa_causal}
    state = torch.get_rng_state()
    assert pick_fastest(kernels, q, k, v, 0.5) == "sdpa"
    assert torch.equal(torch.get_rng_state(), state)  # the timing draws from its own generator


def test_pick_fastest_raises_when_nothing_runs():
    q, k, v = _qkv()
    with pytest.raises(RuntimeError, match="no dense kernel"):
        pick_fastest({"broken": _broken}, q, k, v, 0.5)


@pytest.mark.parametrize("name", ["auto", "sdpa"])
def test_cpu_dense_kernels_are_causal_sdpa(name):
    q, k, v = _qkv()
    torch.testing.assert_close(dense_attention(name, "cpu")(q, k, v, 0.3), sdpa_causal(q, k, v, 0.3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_auto_candidates_always_hold_a_kernel_for_the_dtype(dtype):
    """``"auto"`` on CUDA times these; fp32 has no cuDNN/flash kernel, so SDPA's own choice must be among them
    (found on an H200: fp32 inputs raised 'no dense kernel among cudnn, flash')."""
    kernels = available_kernels(dtype)
    assert "sdpa" in kernels
    assert ("cudnn" in kernels) == (dtype == torch.bfloat16)
    q, k, v = (x.to(dtype) for x in _qkv())
    picked = pick_fastest({"broken": _broken, **kernels}, q, k, v, 0.5)
    torch.testing.assert_close(kernels[picked](q, k, v, 0.5), sdpa_causal(q, k, v, 0.5))


def test_dense_name_validation():
    assert "auto" in DENSE_KERNELS
    with pytest.raises(ValueError, match="dense='cudnn2'"):
        dense_attention("cudnn2")


def test_explicit_dense_kernel_through_the_op():
    """A dense kernel passed as ``attention=`` is the one the op calls on the subsequence."""
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 256, 2, 8, generator=gen) for _ in range(3))
    calls = []

    def recording(qs, ks, vs, scale):
        calls.append(qs.shape)
        return dense_attention("sdpa", "cpu")(qs, ks, vs, scale)

    settings = dict(levels=2, pooling_factor=2, topk=128, backend="triton")
    out = lighthouse_attention(q, k, v, attention=recording, **settings)
    torch.testing.assert_close(out, lighthouse_attention(q, k, v, **settings))
    assert calls == [torch.Size([1, 2, 384, 8])]
