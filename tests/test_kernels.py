"""Fused Triton kernels (``lighthouse_kernels``) against the pure-PyTorch oracle (``megatron_lighthouse.naive``),
step by step through their shared signatures; TRITON_INTERPRET=1 on CPU."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys

import lighthouse_kernels as fused
import pytest
import torch

from conftest import GOLDENS, golden_names, rel_l2
from megatron_lighthouse import config, lighthouse_attention, naive, select_indices

#: Golden cases small enough for the interpreter.
TRITON_GOLDENS = golden_names(["a", "b", "c", "f", "cp2"], max_tokens=4096)
# (N, levels, pooling_factor, topk): small settings that satisfy spec section 8.
SETTINGS = [(256, 2, 2, 128), (1024, 3, 2, 128), (2048, 3, 4, 128)]


def _inputs(n: int, dtype=torch.float32, b: int = 1, h: int = 2, d: int = 16, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(b, n, h, d, generator=gen).to(dtype) for _ in range(3)]


def _oracle_indices(q, k, n, levels, p, topk):
    sq, sk = naive.pool_scores(q, k, levels, p)
    return naive.select_entries(sq, sk, n, levels, p, topk)


STEPS = ("pool_scores", "select_entries", "gather_entries", "scatter_to_tokens")


@pytest.mark.parametrize("step", STEPS)
def test_fused_steps_share_the_oracles_signatures(step):
    """The op dispatches to either module through one point: same names, same parameters."""
    assert list(inspect.signature(getattr(fused, step)).parameters) == \
        list(inspect.signature(getattr(naive, step)).parameters)


def test_kernels_package_imports_no_megatron_lighthouse():
    """The kernels are the layer below the op: importing them must not import the package they serve."""
    code = ("import sys, lighthouse_kernels; bad = sorted(m for m in sys.modules if m.startswith('megatron_lighthouse'));"
            " print(bad); sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "TRITON_INTERPRET": "1"})
    assert done.returncode == 0, done.stdout + done.stderr


def test_kernel_tile_equals_the_config_tile():
    from lighthouse_kernels import select

    assert (select.TILE_SELECT, select.TILE_HALF) == (config.TILE_SELECT, config.TILE_HALF)


@pytest.mark.parametrize("n,levels,p,topk", SETTINGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pool_scores_match_oracle(n, levels, p, topk, dtype):
    q, k, _ = _inputs(n, dtype, d=24)  # a head dim that is not a power of two exercises the masks
    got = fused.pool_scores(q, k, levels, p)
    want = naive.pool_scores(q, k, levels, p)
    for g, w in zip(got, want):
        assert g.dtype == torch.float32 and g.shape == w.shape
        torch.testing.assert_close(g, w, rtol=2e-6, atol=0)


# Extra selection settings: 384 coarsest entries per tile (not a power of two), and four levels.
@pytest.mark.parametrize("n,levels,p,topk", SETTINGS + [(768, 2, 2, 128), (4096, 3, 2, 256), (8192, 4, 2, 256)])
def test_selection_matches_oracle_with_ties(n, levels, p, topk):
    gen = torch.Generator().manual_seed(n)
    sq, sk = (torch.randn(2, 3, n, generator=gen) for _ in range(2))
    sq, sk = naive.pool_scores(sq.view(2, n, 3, 1), sk.view(2, n, 3, 1), levels, p)
    sq[..., ::3] = 1.0  # many exact ties: the lower candidate position must win, as in the oracle
    sk[..., ::5] = 2.0
    got = fused.select_entries(sq, sk, n, levels, p, topk)
    assert torch.equal(got, naive.select_entries(sq, sk, n, levels, p, topk))


@pytest.mark.parametrize("n,levels,p,topk", SETTINGS)
def test_gather_and_scatter_match_oracle(n, levels, p, topk):
    q, k, v = (x.requires_grad_(True) for x in _inputs(n))
    indices = _oracle_indices(q.detach(), k.detach(), n, levels, p, topk)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(1))

    picked = fused.gather_entries(q, k, v, indices, levels, p)
    out = fused.scatter_to_tokens(picked[0] * picked[1] + picked[2], indices, n, levels, p)
    out.backward(dout)
    got_grads = [x.grad.clone() for x in (q, k, v)]
    for x in (q, k, v):
        x.grad = None

    want_picked = naive.gather_entries(q, k, v, indices, levels, p)
    want = naive.scatter_to_tokens(want_picked[0] * want_picked[1] + want_picked[2], indices, n, levels, p)
    want.backward(dout)

    for g, w in zip(picked, want_picked):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    for g, x in zip(got_grads, (q, k, v)):
        torch.testing.assert_close(g, x.grad, rtol=1e-5, atol=1e-5)


def test_gather_backward_with_small_blocks_matches_oracle(monkeypatch):
    """On a GPU a program of the gather's backward covers fewer tokens than the coarser entries span, which the
    interpreter's blocks (512 tokens) never do: this runs blocks of 8 tokens (entries of 1 and 4 tokens share a
    block, one of 16 spans two), with two query heads per kv head."""
    from lighthouse_kernels import gather, launch

    monkeypatch.setattr(launch, "INTERPRETER_ROWS", 1)
    monkeypatch.setattr(gather, "GATHER_BACKWARD_GEOMETRY", launch.Geometry(8, 8))
    n, levels, p, topk = SETTINGS[2]
    q, k, v = _inputs(n, h=2)
    k, v = (x[:, :, :1].clone().requires_grad_(True) for x in (k, v))
    q.requires_grad_(True)
    indices = _oracle_indices(q.detach(), k.detach(), n, levels, p, topk)
    grads = [torch.randn(1, 2, indices.shape[-1], 16, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    got = torch.autograd.grad(fused.gather_entries(q, k, v, indices, levels, p), (q, k, v), grads)
    want = torch.autograd.grad(naive.gather_entries(q, k, v, indices, levels, p), (q, k, v), grads)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)


def test_scatter_bf16_matches_oracle():
    n, levels, p, topk = SETTINGS[1]
    q, k, _ = _inputs(n)
    indices = _oracle_indices(q, k, n, levels, p, topk)
    sub = torch.randn(1, 2, indices.shape[-1], 16).to(torch.bfloat16)
    got = fused.scatter_to_tokens(sub, indices, n, levels, p)
    assert got.dtype == torch.bfloat16
    # Both sum the levels in fp32 and round once to bf16: at most one bf16 ulp apart (rounding mode).
    want = naive.scatter_to_tokens(sub, indices, n, levels, p)
    torch.testing.assert_close(got.float(), want.float(), rtol=2**-7, atol=1e-6)


@pytest.mark.parametrize("name", TRITON_GOLDENS)
def test_triton_path_reproduces_goldens(goldens, name):
    rec = goldens[name]
    cfg = rec["config"]
    settings = dict(levels=cfg["levels"], pooling_factor=cfg["pooling_factor"], topk=cfg["topk"], chunks=cfg["chunks"])
    q, k, v = (rec[x].clone().requires_grad_(True) for x in "qkv")

    indices = select_indices(q.detach(), k.detach(), backend="triton", **settings)
    per_chunk = [indices] if cfg["chunks"] == 1 else list(indices.unbind(1))
    assert len(per_chunk) == len(rec["indices"])
    for got, want in zip(per_chunk, rec["indices"]):
        assert torch.equal(got, want.long())

    out = lighthouse_attention(q, k, v, backend="triton", **settings)
    out.transpose(1, 2).backward(rec["dout"])
    assert rel_l2(out.detach().transpose(1, 2), rec["out"]) < 1e-4
    assert rel_l2(q.grad, rec["dq"]) < 1e-4
    assert rel_l2(k.grad, rec["dk"]) < 1e-4
    assert rel_l2(v.grad, rec["dv"]) < 1e-4


def test_triton_path_chunked_and_gqa_match_oracle():
    """chunks=2 and 2 query heads per kv head: the triton path equals the torch path."""
    n = 2048
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(1, n, 2, 8, generator=gen, requires_grad=True)
    k, v = (torch.randn(1, n, 1, 8, generator=gen, requires_grad=True) for _ in range(2))
    settings = dict(levels=2, pooling_factor=4, topk=256, chunks=2)
    dout = torch.randn(q.shape, generator=gen)
    results = []
    for backend in ("triton", "torch"):
        out = lighthouse_attention(q, k, v, backend=backend, **settings)
        grads = torch.autograd.grad(out, (q, k, v), dout)
        results.append((out, *grads))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_triton_path_is_deterministic():
    rec = GOLDENS[TRITON_GOLDENS[0]]
    cfg = rec["config"]
    settings = dict(levels=cfg["levels"], pooling_factor=cfg["pooling_factor"], topk=cfg["topk"], chunks=cfg["chunks"])
    runs = []
    for _ in range(2):
        q, k, v = (rec[x].clone().requires_grad_(True) for x in "qkv")
        out = lighthouse_attention(q, k, v, backend="triton", **settings)
        out.transpose(1, 2).backward(rec["dout"])
        runs.append([out.detach(), q.grad, k.grad, v.grad])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_backend_validation():
    q, k, v = _inputs(256)
    with pytest.raises(ValueError, match="backend='cuda'"):
        lighthouse_attention(q, k, v, levels=2, pooling_factor=2, topk=128, backend="cuda")


def test_max_tile_entries_is_tritons_block_limit():
    import triton.language as tl

    assert fused.MAX_TILE_ENTRIES == tl.TRITON_MAX_TENSOR_NUMEL == 2**20


class _NoLaunch:
    """Stands in for the selection kernel: records the launches instead of running them."""

    def __init__(self):
        self.launches = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((grid, kwargs))


def test_selection_refuses_tiles_over_the_block_limit_before_any_work(monkeypatch):
    """N=2**22, levels=2, p=2, topk=128 is a valid configuration, but its one tile owns 2**21 coarsest entries: the
    kernel entry raises a ValueError that names the count, the limit and the fix, before allocating or launching
    (the scores here are zero-stride views: any copy of them would allocate 24 MB per tensor)."""
    from lighthouse_kernels import select

    kernel = _NoLaunch()
    monkeypatch.setattr(select, "_select_kernel", kernel)
    n, levels, p, topk = 2**22, 2, 2, 128
    total = n + n // 2
    scores = torch.zeros(()).expand(1, 1, total)

    def no_work(*args, **kwargs):
        raise AssertionError("select_entries allocated or copied before refusing the configuration")

    with monkeypatch.context() as patch, pytest.raises(ValueError) as info:
        patch.setattr(torch, "empty", no_work)
        patch.setattr(torch.Tensor, "contiguous", no_work)
        fused.select_entries(scores, scores, n, levels, p, topk)
    message = str(info.value)
    for part in ("2097152", "MAX_TILE_ENTRIES=1048576", "raise topk", "levels", "pooling_factor"):
        assert part in message, message
    assert kernel.launches == []


def test_pooling_refuses_entries_over_the_block_limit_before_any_work(monkeypatch):
    """p=2, levels=15, D=128: one coarsest entry covers 2**14 tokens, a block of 2**21 elements, over Triton's
    largest; the kernel entry refuses it before allocating or launching. One level less fits."""
    from lighthouse_kernels import pool_score

    kernel = _NoLaunch()
    monkeypatch.setattr(pool_score, "_pool_score_kernel", kernel)
    n = 128 * 2**14
    q = torch.zeros(128).expand(1, n, 1, 128)  # zero-stride: no memory behind it

    def no_work(*args, **kwargs):
        raise AssertionError("pool_scores allocated or copied before refusing the configuration")

    with monkeypatch.context() as patch, pytest.raises(ValueError) as info:
        patch.setattr(torch, "empty", no_work)
        patch.setattr(torch.Tensor, "contiguous", no_work)
        fused.pool_scores(q, q, 15, 2)
    for part in ("2**14 = 16384 tokens", "2097152 elements", "D=128", "(1048576)", "fewer levels"):
        assert part in str(info.value), str(info.value)
    assert kernel.launches == []
    fused.pool_scores(q, q, 14, 2)
    assert len(kernel.launches) == 2  # q's heads, then k's
    assert all(kwargs["BLOCK_T"] * kwargs["BLOCK_D"] == 2**20 for _, kwargs in kernel.launches)


@pytest.mark.parametrize("n,levels,p,topk", [(2**21, 2, 2, 128), (2**22, 2, 2, 256), (2**22, 3, 2, 128)])
def test_selection_accepts_tiles_at_the_block_limit(monkeypatch, n, levels, p, topk):
    """Up to MAX_TILE_ENTRIES entries per tile pass the check and launch with a block of at most 2**20."""
    from lighthouse_kernels import select

    kernel = _NoLaunch()
    monkeypatch.setattr(select, "_select_kernel", kernel)
    total = sum(n // p**level for level in range(levels))
    scores = torch.zeros(()).expand(1, 1, total)
    fused.select_entries(scores, scores, n, levels, p, topk)
    ((grid, kwargs),) = kernel.launches
    assert grid == (1, topk // 128) and kwargs["BLOCK_C"] == n // p ** (levels - 1) // (topk // 128) <= 2**20
