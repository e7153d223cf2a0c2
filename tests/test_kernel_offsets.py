"""The fused kernels address tensors past 2**31 elements: every pointer offset is computed in int64.

A 2M-token ``[B, N, H, D]`` (``stride_n = H*D = 1024``) or Megatron's ``[s, b, h, d]`` seen as ``[b, s, h, d]``
puts elements beyond 2**31; an int32 ``tok * stride_n``, ``b * stride_b``, ``h * stride_h`` or ``row * row_stride``
wraps there and reads or writes the wrong memory. These tests reach such offsets cheaply: small tensors laid out as
``as_strided`` views on a large uninitialised ``torch.empty`` base (virtual memory; only the few thousand elements
of the views are written, the rest stays unbacked), checked against the naive oracle under TRITON_INTERPRET=1.

A wrong offset usually segfaults the interpreter, so each case runs in a child process (this file run as a script)
and the test asserts on its exit status and output. The views of one case share one base (strides are multiples
of ``4 * D``, so views at offsets ``0, D, 2D`` never overlap). The child reports its peak resident memory, which
must stay under 2 GiB (the bases take 4-9 GiB of address space, not of memory).

Where the op itself allocates (gather backward's dq/dk/dv, the gather's pooled coarsest level, scatter forward's
output, and the inverse map), the private launchers, which write into given views, and a wide inverse map (a
``[B*H, N_tot]`` view of rows ``W`` apart) put the same offsets there.

k and v have half of q's heads (grouped-query attention: dk/dv are sums over query heads, written per kv head),
except in the ``heads`` layout, whose head offsets pass 2**31 only with all four heads.
"""

from __future__ import annotations

import ctypes
import os
import resource
import subprocess
import sys

if __name__ == "__main__":  # the child: the cases run under the interpreter (set before triton is imported)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import lighthouse_kernels as fused
import pytest
import torch
from lighthouse_kernels.gather import _launch_gather_backward, _launch_pool_coarsest
from lighthouse_kernels.pyramid_index import inverse_map
from lighthouse_kernels.scatter import _launch_scatter_forward

from megatron_lighthouse import naive

N, LEVELS, P, S, D = 64, 3, 2, 40, 8  # N_tot = 64 + 32 + 16 = 112 pyramid entries, 40 picked per row
TOTAL = N + N // 2 + N // 4
#: Smallest offset every layout reaches, in elements.
BEYOND = 2**31 + 2**16


def _above(count: int) -> int:
    """A stride (multiple of 4*D, below 2**31: an int32 kernel argument) with ``count * stride >= BEYOND``."""
    step = 4 * D
    stride = -(-BEYOND // count // step) * step
    while count * stride < BEYOND:
        stride += step
    assert stride < 2**31
    return stride


#: ``[B, N, H, D]`` layouts, each with one dimension whose offsets pass 2**31 (and B*H >= 3, see the wide inverse map).
LAYOUTS = {
    # Megatron's [s, b, h, d] as [b, s, h, d] (b=1): the token stride; also the 2M-token contiguous case.
    "tokens": ((1, N, 4, D), (4 * 4 * D, _above(N - 1), 4 * D, 1)),
    # A transposed [B, H, N, D] buffer: the head stride.
    "heads": ((1, N, 4, D), (0, 4 * D, _above(3), 1)),
    # Large batches: the batch stride.
    "batch": ((3, N, 2, D), (_above(2), 2 * 4 * D, 4 * D, 1)),
}
#: Query heads per kv head in each layout (k/v views keep the layout's strides with fewer heads).
GROUPS = {"tokens": 2, "heads": 1, "batch": 2}


def _sparse_empty(numel: int, dtype):
    """An uninitialised base of ``numel`` elements that stays virtual: untouched pages cost no memory. Transparent
    huge pages are refused for it (best effort), so each written row costs a 4 KiB page, not 2 MiB."""
    base = torch.empty(numel, dtype=dtype)
    try:
        page = os.sysconf("SC_PAGE_SIZE")
        start = base.data_ptr() // page * page
        length = -(-(base.data_ptr() + numel * base.element_size() - start) // page) * page
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(length), 15)  # MADV_NOHUGEPAGE
    except (OSError, AttributeError, ValueError):
        pass
    return base


def _views(layout: str, sources):
    """``sources`` (small contiguous ``[B, N, H, D]`` with at most ``layout``'s heads, one dtype) copied into views
    with ``layout``'s strides on one base (at offsets 0, D, 2D: strides are multiples of 4D, so they never
    overlap)."""
    shape, strides = LAYOUTS[layout]
    span = sum((n - 1) * s for n, s in zip(shape, strides)) + 1
    assert span > BEYOND - 4 * D, (layout, span)
    base = _sparse_empty(span + len(sources) * D, sources[0].dtype)
    views = [base.as_strided(src.shape, strides, i * D) for i, src in enumerate(sources)]
    for view, src in zip(views, sources):
        view.copy_(src)
    return views


def _wide_inverse_map(indices):
    """The inverse map of ``indices`` as a ``[B*H, N_tot]`` view whose rows lie ``W`` apart, ``(B*H-1) * W >=
    BEYOND``: ``row * row_stride`` passes 2**31."""
    inv = inverse_map(indices, TOTAL)
    rows = inv.shape[0]
    width = _above(rows - 1)
    wide = _sparse_empty((rows - 1) * width + TOTAL, inv.dtype).as_strided(inv.shape, (width, 1))
    wide.copy_(inv)
    return wide


def _coarsest_view(layout: str, heads: int):
    """A ``[B, N / P**(LEVELS-1), heads, D]`` view on its own base whose offsets along ``layout``'s dimension pass
    2**31: where the gather writes the pooled coarsest level."""
    b = LAYOUTS[layout][0][0]
    shape = (b, N // P ** (LEVELS - 1), heads, D)
    step = 4 * D
    if layout == "tokens":
        strides = (0, _above(shape[1] - 1), step, 1)
    elif layout == "heads":
        strides = (0, step, _above(heads - 1), 1)
    else:
        strides = (_above(b - 1), heads * step, step, 1)
    span = sum((n - 1) * s for n, s in zip(shape, strides)) + D
    assert span > BEYOND, (layout, span)
    return _sparse_empty(span, torch.half).as_strided(shape, strides)


def _problem(layout: str, seed: int):
    """Small random inputs for ``layout``'s shape: q ``[B, N, H, D]``, k, v ``[B, N, H / GROUPS[layout], D]`` and
    unique positions ``[B, H, S]``."""
    shape = LAYOUTS[layout][0]
    b, _, h, _ = shape
    gen = torch.Generator().manual_seed(seed)
    kv_shape = (b, N, h // GROUPS[layout], D)
    qkv = [torch.randn(s, generator=gen) for s in (shape, kv_shape, kv_shape)]
    indices = torch.stack([torch.randperm(TOTAL, generator=gen)[:S].sort().values for _ in range(b * h)])
    return qkv, indices.view(b, h, S)


# --------------------------------------------------------------------------------------------------------------
# Cases, run in the child process.


def _case_pool_scores(layout):
    (q, k, _), _ = _problem(layout, 0)
    q, k = q.half(), k.half()
    got = fused.pool_scores(*_views(layout, [q, k]), LEVELS, P)
    for g, w in zip(got, naive.pool_scores(q, k, LEVELS, P)):
        torch.testing.assert_close(g, w, rtol=2e-6, atol=0)


def _case_gather_entries(layout):
    """Forward reads q/k/v past 2**31 (public API); backward against the oracle on the same strided inputs; the
    coarsest level of k written past 2**31 (into a view)."""
    qkv, indices = _problem(layout, 1)
    qkv = [x.half() for x in qkv]
    views = [x.requires_grad_(True) for x in _views(layout, qkv)]
    grads = [torch.randn(indices.shape + (D,)).half() for _ in range(3)]
    got = fused.gather_entries(*views, indices, LEVELS, P)
    got_grads = torch.autograd.grad(got, views, grads)

    ref = [x.float().requires_grad_(True) for x in qkv]
    want = naive.gather_entries(*ref, indices, LEVELS, P)
    want_grads = torch.autograd.grad(want, ref, [g.float() for g in grads])
    for g, w in zip(got + got_grads, want + want_grads):
        torch.testing.assert_close(g, w.half())

    coarsest = _coarsest_view(layout, qkv[1].shape[2])
    _launch_pool_coarsest(views[1], coarsest, LEVELS, P)
    top = naive.build_pyramid(qkv[1].float(), LEVELS, P)[:, :, TOTAL - coarsest.shape[1]:].transpose(1, 2)
    torch.testing.assert_close(coarsest, top.half())


def _case_gather_backward(layout):
    """dq/dk/dv written past 2**31 (into views) and the inverse map read past 2**31 (a wide view)."""
    qkv, indices = _problem(layout, 2)
    grads = [torch.randn(indices.shape + (D,)).half() for _ in range(3)]
    ref = [x.requires_grad_(True) for x in qkv]
    want = torch.autograd.grad(naive.gather_entries(*ref, indices, LEVELS, P), ref, [g.float() for g in grads])

    out = _views(layout, [torch.zeros_like(x, dtype=torch.half) for x in qkv])
    _launch_gather_backward(*grads, _wide_inverse_map(indices), out, LEVELS, P)
    for g, w in zip(out, want):
        torch.testing.assert_close(g, w.half())


def _case_scatter_forward(layout):
    """The output written past 2**31 (into a view) and the inverse map read past 2**31 (a wide view)."""
    (q, _, _), indices = _problem(layout, 3)
    sub = torch.randn(indices.shape + (D,)).half()
    (out,) = _views(layout, [torch.zeros_like(q, dtype=torch.half)])
    _launch_scatter_forward(sub, _wide_inverse_map(indices), out, LEVELS, P)
    torch.testing.assert_close(out, naive.scatter_to_tokens(sub, indices, N, LEVELS, P))


def _case_scatter_to_tokens(layout):
    """Backward reads ``dout`` past 2**31 (public API: autograd hands the strided gradient to the kernel)."""
    (q, _, _), indices = _problem(layout, 4)
    sub = torch.randn(indices.shape + (D,)).half().requires_grad_(True)
    dout = q.half()
    (dout_view,) = _views(layout, [dout])
    got = fused.scatter_to_tokens(sub, indices, N, LEVELS, P)
    (got_grad,) = torch.autograd.grad(got, sub, dout_view)

    ref = sub.detach().float().requires_grad_(True)
    want = naive.scatter_to_tokens(ref, indices, N, LEVELS, P)
    (want_grad,) = torch.autograd.grad(want, ref, dout.float())
    torch.testing.assert_close(got, want.half())
    torch.testing.assert_close(got_grad, want_grad.half())


CASES = {name[len("_case_"):]: fn for name, fn in globals().items() if name.startswith("_case_")}


def _child(case: str) -> None:
    """Run ``case`` on every layout, one line per layout, then the peak resident memory in KiB. A machine that
    refuses the address space (``vm.overcommit_memory=2``, a small ``ulimit -v``) prints ``skip`` instead."""
    for layout in LAYOUTS:
        try:
            CASES[case](layout)
        except RuntimeError as error:
            if "can't allocate memory" not in str(error):
                raise
            print(f"skip: this machine refuses the virtual memory of a {layout} base: {error}", flush=True)
            return
        print(f"ok {case} {layout}", flush=True)
    print(f"maxrss_kib {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}", flush=True)


# --------------------------------------------------------------------------------------------------------------
# Tests.


@pytest.mark.parametrize("case", sorted(CASES))
def test_offsets_past_2_31_elements_match_the_oracle(case):
    done = subprocess.run([sys.executable, os.path.abspath(__file__), case], capture_output=True, text=True,
                          check=False, timeout=300, env={**os.environ, "TRITON_INTERPRET": "1"})
    log = f"exit status {done.returncode} (negative: killed by that signal)\n{done.stdout}\n{done.stderr[-4000:]}"
    assert done.returncode == 0, log
    if "skip: " in done.stdout:
        pytest.skip(done.stdout.split("skip: ", 1)[1].strip())
    for layout in LAYOUTS:
        assert f"ok {case} {layout}" in done.stdout, log
    rss_kib = int(done.stdout.split("maxrss_kib ")[1].split()[0])
    assert rss_kib < 2 * 2**20, f"peak resident memory {rss_kib} KiB: the bases must stay virtual\n{log}"


def test_layouts_reach_past_2_31_with_int32_strides():
    """Every stride is an int32 kernel argument (an int64 one would hide an int32 product) and some offset of
    every layout passes 2**31: the cases above test the widening, not Triton's argument types."""
    for layout, (shape, strides) in LAYOUTS.items():
        assert all(0 <= s < 2**31 for s in strides)
        kv_shape = shape[:2] + (shape[2] // GROUPS[layout],) + shape[3:]  # k/v's offsets pass 2**31 too
        for dims in (shape, kv_shape):
            assert sum((n - 1) * s for n, s in zip(dims, strides)) >= BEYOND
        assert all(s % (4 * D) == 0 for s in strides[:3])
    assert all(shape[0] * shape[2] >= 3 for shape, _ in LAYOUTS.values())  # (B*H - 1) * W passes 2**31, W int32


if __name__ == "__main__":
    _child(sys.argv[1])
