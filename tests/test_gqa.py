"""Grouped-query attention without copies, query heads per kv head 1 to 16, against the expanded reference computed
here (k/v repeated to the query heads in the test, then multi-head attention, each kv head's gradient the sum of
its query heads'): the naive op, the fused steps (the backward's reduction over query heads included), the fused
selection, the fused op end to end; and the op never expands k/v itself. TRITON_INTERPRET=1 on CPU."""

from __future__ import annotations

import lighthouse_kernels as fused
import pytest
import torch

from megatron_lighthouse import attention as op
from megatron_lighthouse import lighthouse_attention, naive, select_indices

N, D = 512, 8
SETTINGS = dict(levels=3, pooling_factor=2, topk=128)  # N=512: 128 coarsest entries per tile, two finer levels
#: The chunked (context-parallel) cases: 2 chunks of 512 tokens, each with SETTINGS' tile.
CHUNKED = dict(SETTINGS, topk=2 * SETTINGS["topk"], chunks=2)
LEVELS, P = SETTINGS["levels"], SETTINGS["pooling_factor"]
RATIOS = (1, 2, 4, 8, 16)


def _inputs(b: int, heads: int, ratio: int, seed: int, dtype=torch.float32, n: int = N):
    """q ``[b, n, heads, D]``, k/v ``[b, n, heads/ratio, D]`` and an output gradient like q."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, n, heads, D, generator=gen)
    k, v = (torch.randn(b, n, heads // ratio, D, generator=gen) for _ in range(2))
    return [x.to(dtype) for x in (q, k, v, torch.randn(q.shape, generator=gen))]


def _expanded(x: torch.Tensor, ratio: int) -> torch.Tensor:
    """The reference's k/v: kv head j repeated for its query heads ``j*ratio .. j*ratio + ratio - 1``."""
    return x.repeat_interleave(ratio, dim=2)


def _group_sum(grad: torch.Tensor, ratio: int) -> torch.Tensor:
    """The gradient of unexpanded k/v from that of their expansion: the sum over each kv head's query heads."""
    b, n, h, d = grad.shape
    return grad.view(b, n, h // ratio, ratio, d).sum(3)


def _op(q, k, v, dout, backend: str, settings: dict):
    """out, dq, dk, dv through the op."""
    q, k, v = (x.clone().requires_grad_(True) for x in (q, k, v))
    out = lighthouse_attention(q, k, v, backend=backend, **settings)
    return (out.detach(), *torch.autograd.grad(out, (q, k, v), dout))


def _steps(steps, q, k, v, dout, indices):
    """The gathered q/k/v entries, out and dq, dk, dv through ``steps``' gather and scatter (a cheap stand-in for
    the dense attention between them that mixes all three)."""
    q, k, v = (x.clone().requires_grad_(True) for x in (q, k, v))
    picked = steps.gather_entries(q, k, v, indices, LEVELS, P)
    out = steps.scatter_to_tokens(picked[0] * picked[1] + picked[2], indices, N, LEVELS, P)
    return [x.detach() for x in picked] + [out.detach(), *torch.autograd.grad(out, (q, k, v), dout)]


@pytest.mark.parametrize("ratio,chunked", [(r, False) for r in RATIOS] + [(4, True)])
def test_naive_op_equals_the_expanded_reference(ratio, chunked):
    """Indices bit-exact, out and dq bitwise the expanded run's, dk/dv its group sums; also in 2 chunks (the
    context-parallel semantics). 2 kv heads (1 at the ratio 16)."""
    settings = CHUNKED if chunked else SETTINGS
    q, k, v, dout = _inputs(1, min(2 * ratio, 16), ratio, seed=ratio, n=N * (2 if chunked else 1))
    k_rep, v_rep = _expanded(k, ratio), _expanded(v, ratio)
    assert torch.equal(select_indices(q, k, **settings), select_indices(q, k_rep, **settings))
    out, dq, dk, dv = _op(q, k, v, dout, "torch", settings)
    want_out, want_dq, want_dk, want_dv = _op(q, k_rep, v_rep, dout, "torch", settings)
    assert torch.equal(out, want_out) and torch.equal(dq, want_dq)
    assert dk.shape == dv.shape == k.shape
    torch.testing.assert_close(dk, _group_sum(want_dk, ratio), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dv, _group_sum(want_dv, ratio), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("ratio,dtype", [(r, torch.float32) for r in RATIOS] + [(4, torch.bfloat16)])
def test_fused_steps_equal_the_expanded_reference(ratio, dtype):
    """The fused gather and scatter on kv heads (selection from the oracle): gathered entries, out and dq bitwise
    those of the fused steps on expanded k/v (the same arithmetic); dk/dv the group sums of the expanded ones (the
    kernel sums the query heads in fp32 and rounds once, where the expanded path rounds each head's share first);
    in fp32 all close to the naive steps, and bitwise the same when run again (ratios 4 and 16). 2 kv heads in 1
    batch row, or in 2 at the ratio 4; 1 kv head at the ratios 8 and 16."""
    b, heads = {1: (1, 2), 2: (1, 4), 4: (2, 8), 8: (1, 8), 16: (1, 16)}[ratio]
    q, k, v, dout = _inputs(b, heads, ratio, seed=100 + ratio, dtype=dtype)
    indices = select_indices(q, k, backend="torch", **SETTINGS)
    got = _steps(fused, q, k, v, dout, indices)
    ref = _steps(fused, q, _expanded(k, ratio), _expanded(v, ratio), dout, indices)
    for name, g, r in zip(("q entries", "k entries", "v entries", "out", "dq"), got, ref):
        assert torch.equal(g, r), name
    for g, r in zip(got[-2:], ref[-2:]):
        assert g.shape == k.shape
        # bf16: the expanded path rounds each of the `ratio` query heads' shares to bf16 (within one ulp here)
        # before summing them; the kernel sums them in fp32 and rounds once.
        tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(
            rtol=0, atol=ratio * 2**-7 * r.float().abs().max().item())
        torch.testing.assert_close(g.float(), _group_sum(r.float(), ratio), **tol)
    if dtype == torch.float32:
        for g, w in zip(got, _steps(naive, q, k, v, dout, indices)):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    if ratio in (4, 16) and dtype == torch.float32:
        again = _steps(fused, q, k, v, dout, indices)
        assert all(torch.equal(a, g) for a, g in zip(again, got)), "the fused GQA steps are not bitwise reproducible"


def test_fused_selection_scores_each_query_head_against_its_kv_head():
    """Query head h of 4 reads the key scores of kv head h // 2 (2 kv heads, 2 batch rows): the fused selection
    equals the oracle's, and both equal the selection on scores expanded to the query heads."""
    q, k, _, _ = _inputs(2, 4, 2, seed=7)
    sq, sk = fused.pool_scores(q, k, LEVELS, P)
    assert sq.shape == (2, 4, N + N // 2 + N // 4) and sk.shape == (2, 2, sq.shape[-1])
    for got, want in zip((sq, sk), naive.pool_scores(q, k, LEVELS, P)):
        torch.testing.assert_close(got, want, rtol=2e-6, atol=0)
    got = fused.select_entries(sq, sk, N, LEVELS, P, SETTINGS["topk"])
    assert torch.equal(got, naive.select_entries(sq, sk, N, LEVELS, P, SETTINGS["topk"]))
    assert torch.equal(got, naive.select_entries(sq, sk.repeat_interleave(2, dim=1), N, LEVELS, P, SETTINGS["topk"]))


def test_fused_op_with_chunks_equals_the_expanded_reference():
    """End to end through the fused path, 4 query heads per kv head, 2 chunks (the context-parallel semantics):
    indices bit-exact with the expanded reference's, out and gradients to fp32 rounding."""
    ratio = 4
    q, k, v, dout = _inputs(1, 4, ratio, seed=3, n=2 * N)
    k_rep, v_rep = _expanded(k, ratio), _expanded(v, ratio)
    assert torch.equal(select_indices(q, k, backend="triton", **CHUNKED),
                       select_indices(q, k_rep, backend="torch", **CHUNKED))
    got = _op(q, k, v, dout, "triton", CHUNKED)
    out, dq, dk, dv = _op(q, k_rep, v_rep, dout, "torch", CHUNKED)
    for g, w in zip(got, (out, dq, _group_sum(dk, ratio), _group_sum(dv, ratio))):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_the_op_never_expands_k_or_v(monkeypatch, backend):
    """No repeat of k/v to the query heads, forward or backward: expand_kv_heads and every repeat_interleave fail
    the test if called."""

    def expanded(*args, **kwargs):
        raise AssertionError("the op expanded k/v to the query heads")

    monkeypatch.setattr(op, "expand_kv_heads", expanded)
    monkeypatch.setattr(torch, "repeat_interleave", expanded)
    monkeypatch.setattr(torch.Tensor, "repeat_interleave", expanded)
    q, k, v, dout = _inputs(1, 4, 4, seed=0)
    _, _, dk, dv = _op(q, k, v, dout, backend, SETTINGS)
    assert dk.shape == dv.shape == k.shape and bool(dk.abs().sum() > 0)


def test_fused_steps_refuse_kv_heads_that_do_not_divide_the_query_heads():
    q, k, v, _ = _inputs(1, 4, 1, seed=0)
    k3, v3 = k[:, :, :3], v[:, :, :3]
    indices = torch.zeros(1, 4, 8, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"H % H_kv == 0"):
        fused.gather_entries(q, k3, v3, indices, LEVELS, P)
    sq, _ = fused.pool_scores(q, k, LEVELS, P)
    with pytest.raises(ValueError, match=r"score_k \(1, 3, 896\) must be \[B, H_kv, N_tot\]"):
        fused.select_entries(sq, sq[:, :3], N, LEVELS, P, SETTINGS["topk"])
