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
