"""Causality, gradients, GQA, dtypes and chunking of the functional API (pure-PyTorch path)."""

from __future__ import annotations

import pytest
import torch

from megatron_lighthouse import LighthouseConfig, lighthouse_attention, naive, select_indices
from megatron_lighthouse.attention import _attend_selected
from megatron_lighthouse.dense import sdpa_causal

# (N, levels, pooling_factor, topk): every one selects (tiles own more than 128 coarsest entries).
CONFIGS = [(1024, 2, 2, 128), (2048, 3, 2, 256), (4096, 3, 4, 128), (2048, 2, 4, 128)]


def _qkv(n, h=2, d=8, b=1, h_kv=None, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, n, h, d, generator=g, dtype=dtype)
    k = torch.randn(b, n, h_kv or h, d, generator=g, dtype=dtype)
    v = torch.randn(b, n, h_kv or h, d, generator=g, dtype=dtype)
    return q, k, v


def _settings(levels, p, topk):
    return dict(levels=levels, pooling_factor=p, topk=topk)


def attend_selected(q, k, v, idx, *, levels, pooling_factor, chunks=1):
    """The op's gather -> dense attention -> scatter for a fixed selection ``idx`` (oracle steps, SDPA)."""
    config = LighthouseConfig(levels=levels, pooling_factor=pooling_factor)
    return _attend_selected(naive, q, k, v, idx, config, chunks, q.shape[-1] ** -0.5, sdpa_causal, None)


@pytest.mark.parametrize("n,levels,p,topk", CONFIGS)
def test_value_change_never_reaches_earlier_tokens(n, levels, p, topk):
    """Values do not enter selection, so a change of v[t] through the public API is invisible before t."""
    q, k, v = _qkv(n, seed=n + levels)
    base = lighthouse_attention(q, k, v, **_settings(levels, p, topk))
    gen = torch.Generator().manual_seed(1)
    for t in torch.randint(1, n, (6,), generator=gen).tolist():
        v2 = v.clone()
        v2[:, t] += torch.randn(v2[:, t].shape, generator=gen)
        out = lighthouse_attention(q, k, v2, **_settings(levels, p, topk))
        assert torch.equal(out[:, :t], base[:, :t]), f"token {t} leaked into earlier outputs"
        assert not torch.equal(out, base)


@pytest.mark.parametrize("n,levels,p,topk", CONFIGS)
def test_norm_preserving_qk_change_never_reaches_earlier_tokens(n, levels, p, topk):
    """Selection reads only norms: rotating q[t], k[t] keeps it, and nothing before t may change."""
    q, k, v = _qkv(n, seed=n * levels)
    base = lighthouse_attention(q, k, v, **_settings(levels, p, topk))
    gen = torch.Generator().manual_seed(2)
    for t in torch.randint(1, n, (6,), generator=gen).tolist():
        q2, k2 = q.clone(), k.clone()
        q2[:, t] = q2[:, t].flip(-1)
        k2[:, t] = k2[:, t].roll(1, dims=-1)
        out = lighthouse_attention(q2, k2, v, **_settings(levels, p, topk))
        assert torch.equal(out[:, :t], base[:, :t]), f"token {t} leaked into earlier outputs"


@pytest.mark.parametrize("n,levels,p,topk", CONFIGS)
def test_any_qkv_change_is_causal_for_fixed_selection(n, levels, p, topk):
    """With the selection held, attention + scatter carry no information backwards in time."""
    q, k, v = _qkv(n, seed=7 * n)
    idx = select_indices(q, k, **_settings(levels, p, topk))
    base = attend_selected(q, k, v, idx, levels=levels, pooling_factor=p)
    gen = torch.Generator().manual_seed(3)
    for t in torch.randint(1, n, (5,), generator=gen).tolist():
        q2, k2, v2 = (x.clone() for x in (q, k, v))
        for x in (q2, k2, v2):
            x[:, t] = torch.randn(x[:, t].shape, generator=gen) * 5
        out = attend_selected(q2, k2, v2, idx, levels=levels, pooling_factor=p)
        assert torch.equal(out[:, :t], base[:, :t]), f"token {t} leaked into earlier outputs"


def test_selection_reads_future_norms_within_a_tile():
    """Documented property of the published method: the *choice* of entries uses max-pooled norms of
    whole spans, so a norm change at t can change which earlier tokens are resolved finely."""
    q, k, v = _qkv(1024, h=1, seed=0)
    settings = _settings(2, 2, 128)
    base = select_indices(q, k, **settings)
    changed = 0
    for t in range(3, 1024, 31):
        q2 = q.clone()
        q2[:, t] *= 4
        changed += int(not torch.equal(select_indices(q2, k, **settings), base))
    assert changed > 0


def test_gradcheck_float64_fixed_selection():
    q, k, v = (x.double().requires_grad_(True) for x in _qkv(256, h=1, d=3, seed=11))
    idx = select_indices(q.detach(), k.detach(), levels=2, pooling_factor=2, topk=128)

    def fn(q, k, v):
        return attend_selected(q, k, v, idx, levels=2, pooling_factor=2)

    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-6, fast_mode=True)


def test_gradcheck_float64_chunked():
    q, k, v = (x.double().requires_grad_(True) for x in _qkv(512, h=1, d=2, seed=12))
    idx = select_indices(q.detach(), k.detach(), levels=2, pooling_factor=2, topk=256, chunks=2)

    def fn(q, k, v):
        return attend_selected(q, k, v, idx.flatten(0, 1), levels=2, pooling_factor=2, chunks=2)

    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-6, fast_mode=True)


@pytest.mark.parametrize("h,h_kv", [(4, 1), (4, 2), (6, 3)])
def test_gqa_equals_explicit_repeat(h, h_kv):
    q, k, v = _qkv(1024, h=h, h_kv=h_kv, seed=h * 10 + h_kv)
    settings = _settings(2, 2, 128)
    k_rep, v_rep = (x.repeat_interleave(h // h_kv, dim=2) for x in (k, v))
    q1, k1, v1 = (x.clone().requires_grad_(True) for x in (q, k, v))
    q2, k2, v2 = (x.clone().requires_grad_(True) for x in (q, k_rep, v_rep))
    out1 = lighthouse_attention(q1, k1, v1, **settings)
    out2 = lighthouse_attention(q2, k2, v2, **settings)
    assert torch.equal(out1, out2)
    assert torch.equal(select_indices(q, k, **settings), select_indices(q, k_rep, **settings))
    g = torch.randn_like(out1)
    out1.backward(g)
    out2.backward(g)
    torch.testing.assert_close(q1.grad, q2.grad)
    torch.testing.assert_close(k1.grad, k2.grad.view(*k.shape[:2], h_kv, h // h_kv, -1).sum(3))
    torch.testing.assert_close(v1.grad, v2.grad.view(*v.shape[:2], h_kv, h // h_kv, -1).sum(3))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_follows_fp32(dtype):
    q, k, v = _qkv(1024, seed=5, dtype=dtype)
    settings = _settings(2, 2, 128)
    out = lighthouse_attention(q, k, v, **settings)
    assert out.dtype == dtype
    # Selection runs in fp32 on the same (rounded) values, so it equals the fp32 run's.
    assert torch.equal(select_indices(q, k, **settings), select_indices(q.float(), k.float(), **settings))
    ref = lighthouse_attention(q.float(), k.float(), v.float(), **settings)
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=3e-2)


def test_softmax_scale_and_custom_attention_are_used():
    q, k, v = _qkv(1024, seed=9)
    settings = _settings(2, 2, 128)
    seen = {}

    def attention(q, k, v, scale):
        seen["shape"], seen["scale"] = tuple(q.shape), scale
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)

    out = lighthouse_attention(q, k, v, softmax_scale=0.5, attention=attention, **settings)
    s = LighthouseConfig(**settings).subsequence_length(1024)
    assert seen == {"shape": (1, 2, s, 8), "scale": 0.5}
    assert not torch.allclose(out, lighthouse_attention(q, k, v, **settings))


def test_chunks_select_each_chunk_alone():
    q, k, v = _qkv(2048, seed=4)
    idx = select_indices(q, k, levels=2, pooling_factor=2, topk=256, chunks=2)
    for c in range(2):
        part = slice(c * 1024, (c + 1) * 1024)
        alone = select_indices(q[:, part], k[:, part], levels=2, pooling_factor=2, topk=128)
        assert torch.equal(idx[:, c], alone)


def test_subsequence_length_formula():
    cfg = LighthouseConfig(levels=3, pooling_factor=4, topk=2048)
    assert cfg.subsequence_length(512 * 1024) == 49152
    q, k, _ = _qkv(2048, seed=1)
    idx = select_indices(q, k, levels=3, pooling_factor=2, topk=256)
    assert idx.shape[-1] == LighthouseConfig(levels=3, pooling_factor=2, topk=256).subsequence_length(2048)
    # Every row is a strictly causal-ordered set of distinct pyramid entries.
    assert (idx.sort(-1).values.diff(dim=-1) > 0).all()
    cost = cfg.attention_cost(512 * 1024, num_heads=8, head_dim=128)
    assert cost["ratio"] == pytest.approx((49152 / (512 * 1024)) ** 2)
