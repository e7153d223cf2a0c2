"""The op against its floor, one GPU: Lighthouse (fused kernels) fwd+bwd vs dense attention on its subsequence alone.

B=1, D=128, bf16, topk=2048, pooling_factor=4. A row is a head layout (``--heads``, query/kv heads: grouped-query
attention when they differ), a length (``--lengths``) and a pyramid:

- ``fixed``: the paper's pyramid, levels=3 (the subsequence grows as ``N/p**(L-1)``);
- ``growing``: ``LighthouseConfig.for_sequence(N)``, the fewest levels whose top level has at most 16,384 entries
  (L=2 up to 64K, 3 to 256K, 4 to 1M: the subsequence stays bounded; at 128K and 256K it is ``fixed``, timed once).

The **floor** of a row, measured in the same run: the dense causal kernel (``--dense``, cuDNN by default; the op
runs the same one on its subsequence) fwd+bwd on ``S`` tokens with ``H`` heads, plus the byte floor: q, k, v, the
output and their four gradients moved once (``2 * N * D * (4*H + 4*H_kv)`` bytes) at the bandwidth of a device
copy. ``ratio`` = op / floor. The op, the floor's kernel, the copy (and ``--expanded-baseline``) are timed in
``--rounds`` interleaved rounds, each the median of enough calls to fill ~100 ms; a row reports the medians over
rounds and the range of the per-round ratios. Peak memory is that of one fwd+bwd with its inputs.

``--expanded-baseline`` also runs the op the way it served grouped-query attention before it took kv heads
natively: k/v repeated to the query heads (``repeat_interleave``, under autograd) inside the timed step, then the
op on ``H`` kv heads: the "before" time and peak memory, from the same process. ``--full-dense`` adds dense causal
attention on all ``N`` tokens per length (until a length takes over 10 s), and the growth exponent ``a`` of ``time
∝ N**a`` (Lighthouse over 128K-4M); the growth grid of the multi-head op against dense attention is ``--heads 8/8
--full-dense --dense auto --lengths 32768,65536,...,8388608``. Each row also has the op's stages (pool and score,
selection, gather, dense subsequence, scatter, and the backward of the scatter and of the gather). A run that goes
out of memory is recorded as such, and ends that series.

The CUDA allocator runs with ``expandable_segments:True`` unless ``PYTORCH_CUDA_ALLOC_CONF`` is set. ``--check``
first verifies on the device: goldens in fp32, bf16 against the oracle, bitwise determinism of the fused kernels,
the Triton selection equal to the oracle's, and grouped-query attention equal to the expanded path (indices, out
and dq bitwise; dk/dv its group sums), with SDPA's math backend as the dense kernel: cuDNN's and flash's backward
accumulate dq with atomics, so they are not bitwise reproducible themselves. Prints a table; writes
``op_<gpu>.json`` and ``op_<gpu>.png`` under ``--out-dir``. The default grid (4 head layouts, 128K/512K/1M, both
pyramids) is sized for about 4 minutes on one H100 with the checks and the expanded baseline:

    PYTHONPATH=$PWD:$PWD/kernels python3 benchmarks/bench_op.py --check --golden-dir .golden --expanded-baseline \\
        --out-dir $OUT
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
from typing import Callable, Dict, List, Optional, Sequence, Tuple

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # before torch touches CUDA

import torch  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from megatron_lighthouse import LighthouseConfig, lighthouse_attention, naive, select_indices  # noqa: E402
from megatron_lighthouse.dense import DENSE_KERNELS, DenseAttention, dense_attention  # noqa: E402
from megatron_lighthouse.dense import median_ms as events_median_ms  # noqa: E402

B, D, P, TOPK, FIXED_LEVELS = 1, 128, 4, 2048, 3
DTYPE = torch.bfloat16
PYRAMIDS = ("fixed", "growing")
DEFAULT_HEADS = "32/8,32/4,16/1,8/8"
DEFAULT_LENGTHS = "131072,524288,1048576"
FIT_RANGE = (131072, 4194304)  # Lighthouse exponents are fitted over these lengths, both ends included
DENSE_LIMIT_MS = 10_000.0  # --full-dense runs until a length takes longer than this
ROUND_MS = 100.0  # each contender's calls in one round fill about this long
COPY_BYTES = 2**30  # the bandwidth probe copies this many bytes (read and written once each)
CHECK_N = 32768  # --check: the length of the bf16 checks
#: --check, grouped-query attention against the expanded path: a length and top-k small enough for the math
#: backend (S = 4,608 with levels=3, p=4), the one dense kernel whose backward is bitwise reproducible.
CHECK_GQA_N, CHECK_GQA_TOPK = 8192, 512
CHECK_SELECTION_LENGTHS = (32768, 131072, 524288)  # --check: the Triton selection against the oracle's


def pyramid(n: int, kind: str) -> LighthouseConfig:
    """The settings of one series at length ``n``: ``"fixed"`` (levels=3) or ``"growing"``."""
    if kind == "fixed":
        return LighthouseConfig(levels=FIXED_LEVELS, pooling_factor=P, topk=TOPK)
    return LighthouseConfig.for_sequence(n, pooling_factor=P, topk=TOPK)


def parse_heads(text: str) -> List[Tuple[int, int]]:
    """``"32/8,8/8"`` -> ``[(32, 8), (8, 8)]`` (query heads / kv heads); ``ValueError`` naming the bad item."""
    layouts = []
    for item in text.split(","):
        parts = item.strip().split("/")
        if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts) or int(parts[0]) % int(parts[1]):
            raise ValueError(f"--heads item {item!r}: must be H/H_kv, positive ints with H a multiple of H_kv")
        layouts.append((int(parts[0]), int(parts[1])))
    return layouts


def floor_bytes(n: int, heads: int, kv_heads: int) -> int:
    """Bytes of q, k, v, the output and their four gradients at length ``n``, each moved once (bf16)."""
    return DTYPE.itemsize * B * n * D * (4 * heads + 4 * kv_heads)


def fit_exponent(lengths: Sequence[float], times: Sequence[float]) -> float:
    """Least-squares slope of ``log(time)`` against ``log(length)``: the ``a`` of ``time ∝ N**a``."""
    if len(lengths) < 2:
        return float("nan")
    return statistics.linear_regression([math.log(n) for n in lengths], [math.log(t) for t in times]).slope


def summarize_rounds(rounds: Dict[str, List[float]], bytes_moved: int) -> Dict[str, object]:
    """Medians over rounds of each contender's time (ms; ``copy`` moved ``COPY_BYTES`` twice), the byte floor at the
    copy's bandwidth, the floor (``dense`` + bytes) and the op's ratio to it: the median and range of the per-round
    ratios. ``expanded`` (when timed) gets its ratio too."""
    per_round = []
    for i, copy_ms in enumerate(rounds["copy"]):
        bytes_ms = bytes_moved / (2 * COPY_BYTES / copy_ms)
        per_round.append((bytes_ms, rounds["dense"][i] + bytes_ms))
    out: Dict[str, object] = {f"{name}_ms": statistics.median(times) for name, times in rounds.items()
                              if name != "copy"}
    out["bandwidth_gbs"] = 2 * COPY_BYTES / statistics.median(rounds["copy"]) / 1e6
    out["bytes_gib"] = bytes_moved / 2**30
    out["bytes_ms"] = statistics.median([b for b, _ in per_round])
    out["floor_ms"] = statistics.median([f for _, f in per_round])
    for name in ("op", "expanded"):
        if name in rounds:
            ratios = [t / f for t, (_, f) in zip(rounds[name], per_round)]
            out[f"{name}_ratio"] = statistics.median(ratios)
            out[f"{name}_ratio_range"] = [min(ratios), max(ratios)]
    out["rounds"] = len(per_round)
    return out


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# ----------------------------------------------------------------------------------------------- timing tools
def _event_ms(fn: Callable[[], object], calls: int) -> float:
    """Median over ``calls`` of one call's CUDA-event time, in ms."""
    return events_median_ms(fn, torch.device("cuda"), calls)


def interleaved_rounds(contenders: Dict[str, Callable[[], object]], rounds: int) -> Dict[str, List[float]]:
    """Each contender warmed up and sized once (calls to fill ``ROUND_MS``, at least 3), then timed in ``rounds``
    rounds that take every contender in turn: drifts of clock or temperature hit all of them alike."""
    calls = {}
    for name, fn in contenders.items():
        fn()
        calls[name] = max(3, math.ceil(ROUND_MS / max(_event_ms(fn, 1), 1e-3)))
    times: Dict[str, List[float]] = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, fn in contenders.items():
            times[name].append(_event_ms(fn, calls[name]))
    return times


def median_ms(fn: Callable[[], object], slow_ms: float = 200.0) -> float:
    """Median time of ``fn`` in ms: ``triton.testing.do_bench`` for fast calls; one warm-up and the median of 3
    CUDA-event timings for calls over ``slow_ms`` (a single one over 5 s)."""
    import triton.testing

    fn()
    first = _event_ms(fn, 1)
    if first < slow_ms:
        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    if first > 5000:
        return first
    return statistics.median([first, _event_ms(fn, 1), _event_ms(fn, 1)])


def peak_gib(fn: Callable[[], object]) -> float:
    """Peak allocated memory (GiB) during one call of ``fn``, counting what is allocated before it (its inputs)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**30


def _randn(*shape: int, seed: int, grad: bool = False) -> torch.Tensor:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(*shape, device="cuda", generator=gen, dtype=DTYPE).requires_grad_(grad)


def _qkv(n: int, heads: int, kv_heads: int, seed: int, grad: bool = True) -> List[torch.Tensor]:
    """q ``[B, n, heads, D]``, k, v ``[B, n, kv_heads, D]`` and an output gradient like q."""
    return [_randn(B, n, h, D, seed=seed + i, grad=grad and i < 3)
            for i, h in enumerate((heads, kv_heads, kv_heads, heads))]


def _expand(x: torch.Tensor, heads: int) -> torch.Tensor:
    """k/v repeated to ``heads`` heads: the expanded ("before") path, measured inside the timed step."""
    return x.repeat_interleave(heads // x.shape[2], dim=2)


# ----------------------------------------------------------------------------------------------- device checks
def check(golden_dir: str) -> Dict[str, object]:
    """Goldens (fp32), bf16 agreement with the oracle, bitwise determinism, grouped-query attention equal to the
    expanded path; raises on failure."""
    import lighthouse_kernels as fused

    results: Dict[str, object] = {}
    for path in sorted(os.listdir(golden_dir)):
        for name, rec in torch.load(os.path.join(golden_dir, path)).items():
            cfg = rec["config"]
            settings = {key: cfg[key] for key in ("levels", "pooling_factor", "topk", "chunks")}
            q, k, v = (rec[x].cuda().requires_grad_(True) for x in "qkv")
            out = lighthouse_attention(q, k, v, backend="triton", **settings)
            out.transpose(1, 2).backward(rec["dout"].cuda())
            errs = [rel_l2(out.detach().transpose(1, 2).cpu(), rec["out"])] + [
                rel_l2(x.grad.cpu(), rec["d" + n]) for x, n in zip((q, k, v), "qkv")]
            idx = select_indices(q.detach(), k.detach(), backend="triton", **settings)
            idx = [idx] if cfg["chunks"] == 1 else list(idx.unbind(1))
            same = all(torch.equal(a.cpu(), b.long()) for a, b in zip(idx, rec["indices"]))
            results[f"golden_{name}"] = {"indices_exact": same, "rel_l2_out_dq_dk_dv": errs}
            print(f"golden {name}: indices exact {same}, rel-L2 out/dq/dk/dv {['%.1e' % e for e in errs]}")
            assert same and max(errs) < 1e-4, name
    n = CHECK_N
    config = pyramid(n, "fixed")
    for heads, kv_heads in ((8, 8), (8, 2)):
        *base, dout = _qkv(n, heads, kv_heads, 0, grad=False)
        runs = {}
        for backend in ("triton", "torch"):
            q, k, v = (x.clone().requires_grad_(True) for x in base)
            out = lighthouse_attention(q, k, v, config=config, backend=backend)
            out.backward(dout)
            runs[backend] = [out.detach(), q.grad, k.grad, v.grad]
        bf16 = [rel_l2(a, b) for a, b in zip(runs["triton"], runs["torch"])]
        print(f"bf16 N={n} heads {heads}/{kv_heads}: rel-L2 vs oracle out/dq/dk/dv {['%.1e' % e for e in bf16]}")
        assert max(bf16) < 2e-2
        results[f"bf16_32k_{heads}_{kv_heads}"] = {"rel_l2_vs_oracle": bf16}
    steps = []  # our kernels alone, twice on the same grouped-query inputs: bitwise equal
    for _ in range(2):
        q, k, v = (x.clone().requires_grad_(True) for x in base)
        sq, sk = fused.pool_scores(q.detach(), k.detach(), FIXED_LEVELS, P)
        idx = fused.select_entries(sq, sk, n, FIXED_LEVELS, P, TOPK)
        qs, ks, vs = fused.gather_entries(q, k, v, idx, FIXED_LEVELS, P)
        out = fused.scatter_to_tokens(qs * ks + vs, idx, n, FIXED_LEVELS, P)
        out.backward(dout)
        steps.append([sq, sk, idx, out.detach(), q.grad, k.grad, v.grad])
    deterministic = all(torch.equal(a, b) for a, b in zip(*steps))
    print(f"fused kernels bitwise deterministic (heads 8/2): {deterministic}")
    assert deterministic
    results["kernels_deterministic"] = deterministic
    results["gqa_vs_expanded"] = check_gqa_against_expanded()
    for n in CHECK_SELECTION_LENGTHS:  # the Triton selection equals the oracle's on the same scores
        q, k, *_ = _qkv(n, 8, 2, n, grad=False)
        sq, sk = fused.pool_scores(q, k, FIXED_LEVELS, P)
        exact = torch.equal(fused.select_entries(sq, sk, n, FIXED_LEVELS, P, TOPK),
                            naive.select_entries(sq, sk, n, FIXED_LEVELS, P, TOPK))
        print(f"selection N={n} heads 8/2: equal to the oracle {exact}")
        results[f"selection_exact_{n}"] = exact
        assert exact, n
    return results


def math_attention(q, k, v, softmax_scale):
    """SDPA's math backend: plain matmuls and softmax, bitwise reproducible in the backward (cuDNN and flash
    accumulate dq with atomics, so two identical backward passes differ in the last bits)."""
    with sdpa_kernel([SDPBackend.MATH]):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=softmax_scale)


def check_gqa_against_expanded() -> Dict[str, object]:
    """32 query heads over 8, 4 and 2 kv heads, fused path with the math backend as the dense kernel: indices, out
    and dq bitwise those of the op on k/v expanded to the query heads; dk/dv its group sums, to bf16 rounding."""
    n, config = CHECK_GQA_N, LighthouseConfig(levels=FIXED_LEVELS, pooling_factor=P, topk=CHECK_GQA_TOPK)
    results = {}
    for kv_heads in (8, 4, 2):
        q, k, v, dout = _qkv(n, 32, kv_heads, 1, grad=False)
        group = 32 // kv_heads
        runs = []
        for kv in ((k, v), (_expand(k, 32), _expand(v, 32))):
            inputs = [x.clone().requires_grad_(True) for x in (q, *kv)]
            out = lighthouse_attention(*inputs, config=config, attention=math_attention, backend="triton")
            runs.append([select_indices(q, kv[0], config=config, backend="triton"), out.detach(),
                         *torch.autograd.grad(out, inputs, dout)])
        (idx, out, dq, dk, dv), (want_idx, want_out, want_dq, want_dk, want_dv) = runs
        bitwise = {name: torch.equal(a, b) for name, a, b in
                   (("indices", idx, want_idx), ("out", out, want_out), ("dq", dq, want_dq))}
        errs = [rel_l2(g, w.view(B, n, kv_heads, group, D).sum(3)) for g, w in ((dk, want_dk), (dv, want_dv))]
        print(f"GQA 32/{kv_heads} vs expanded (N={n}, topk={CHECK_GQA_TOPK}): bitwise {bitwise}; dk/dv rel-L2 to "
              f"the group sums {['%.1e' % e for e in errs]}")
        assert all(bitwise.values()) and max(errs) < 1e-2, kv_heads
        results[f"32_{kv_heads}"] = {"bitwise": bitwise, "rel_l2_dk_dv": errs}
    return results


# ----------------------------------------------------------------------------------------------- rows
def stage_times(q, k, v, config: LighthouseConfig, n: int, attention: DenseAttention) -> Dict[str, float]:
    """The op's stages, each alone (ms): forward pool and score, selection, gather, dense subsequence, scatter; then
    the backward of the scatter and of the gather (with its inverse map), each through autograd on its own graph."""
    import lighthouse_kernels as fused

    levels, scale = config.levels, 1.0 / math.sqrt(D)
    with torch.no_grad():
        sq, sk = fused.pool_scores(q, k, levels, P)
        idx = fused.select_entries(sq, sk, n, levels, P, TOPK)
        picked = fused.gather_entries(q, k, v, idx, levels, P)
        sub_out = attention(*picked, scale)
        times = dict(pool_score_ms=median_ms(lambda: fused.pool_scores(q, k, levels, P)),
                     select_ms=median_ms(lambda: fused.select_entries(sq, sk, n, levels, P, TOPK)),
                     gather_ms=median_ms(lambda: fused.gather_entries(q, k, v, idx, levels, P)),
                     dense_sub_ms=median_ms(lambda: attention(*picked, scale)),
                     scatter_ms=median_ms(lambda: fused.scatter_to_tokens(sub_out, idx, n, levels, P)))
    sub_leaf = sub_out.requires_grad_(True)
    out = fused.scatter_to_tokens(sub_leaf, idx, n, levels, P)
    dout = torch.ones_like(out)
    times["scatter_bwd_ms"] = median_ms(lambda: torch.autograd.grad(out, sub_leaf, dout, retain_graph=True))
    del out, dout
    leaves = [x.detach().requires_grad_(True) for x in (q, k, v)]
    picked = fused.gather_entries(*leaves, idx, levels, P)
    grads = [torch.ones_like(x) for x in picked]
    times["gather_bwd_ms"] = median_ms(lambda: torch.autograd.grad(picked, leaves, grads, retain_graph=True))
    return times


def bench_row(n: int, heads: int, kv_heads: int, kind: str, attention: DenseAttention, rounds: int,
              expanded: bool) -> Dict[str, object]:
    """One row: the op (and the expanded path) against its floor, fwd+bwd, peak memory, the forward's stages. The
    expanded path running out of memory is recorded in the row (``expanded_oom``), the rest of the row still runs."""
    config = pyramid(n, kind)
    s = config.subsequence_length(n)
    row: Dict[str, object] = {"levels": config.levels, "S": s}
    q, k, v, dout = _qkv(n, heads, kv_heads, n)

    def step(expand_kv: bool):
        try:
            key, value = (_expand(x, heads) if expand_kv else x for x in (k, v))
            out = lighthouse_attention(q, key, value, config=config, attention=attention, backend="triton")
            del key, value  # as the op before native GQA: its expanded k/v lived through the forward only
            out.backward(dout)
        finally:
            q.grad = k.grad = v.grad = None

    def expanded_step():
        step(True)

    contenders = {"op": lambda: step(False)}
    row["op_peak_gib"] = peak_gib(contenders["op"])  # before the floor's tensors exist: the op and its inputs
    if expanded:
        try:
            row["expanded_peak_gib"] = peak_gib(expanded_step)
            contenders["expanded"] = expanded_step
        except torch.cuda.OutOfMemoryError as err:
            _expanded_out_of_memory(row, err)
        torch.cuda.empty_cache()  # outside the handler: its traceback holds the expanded tensors
    sub = [_randn(B, heads, s, D, seed=i, grad=i < 3) for i in range(4)]
    src, dst = (torch.empty(COPY_BYTES, dtype=torch.uint8, device="cuda") for _ in range(2))
    scale = 1.0 / math.sqrt(D)

    def dense():
        attention(*sub[:3], scale).backward(sub[3])
        for x in sub[:3]:
            x.grad = None

    contenders.update(dense=dense, copy=lambda: dst.copy_(src))
    times = None
    try:
        times = interleaved_rounds(contenders, rounds)
    except torch.cuda.OutOfMemoryError as err:
        if "expanded" not in contenders:
            raise
        _expanded_out_of_memory(row, err)  # beside the floor's tensors: time the others again without it
    if times is None:
        contenders.pop("expanded")
        torch.cuda.empty_cache()
        times = interleaved_rounds(contenders, rounds)
    row.update(summarize_rounds(times, floor_bytes(n, heads, kv_heads)))
    row.update(stage_times(q.detach(), k.detach(), v.detach(), config, n, attention))
    return row


def _expanded_out_of_memory(row: Dict[str, object], err: Exception) -> None:
    """Record (and print) that the expanded path ran out of memory in this row."""
    print(f"[bench_op] expanded path: out of memory ({str(err).splitlines()[0]})", flush=True)
    row["expanded_oom"] = True


def bench_full_dense(n: int, heads: int, kv_heads: int) -> Dict[str, float]:
    """Causal cuDNN attention over all ``n`` tokens (kv heads expanded for the kernel): fwd+bwd and peak memory."""
    q, k, v, dout = _qkv(n, heads, kv_heads, n)
    attention = dense_attention("cudnn", "cuda")

    def fwd_bwd():
        attention(q.transpose(1, 2), _expand(k, heads).transpose(1, 2), _expand(v, heads).transpose(1, 2),
                  1.0 / math.sqrt(D)).backward(dout.transpose(1, 2))

    return {"fwd_bwd_ms": median_ms(fwd_bwd), "peak_gib": peak_gib(fwd_bwd)}


def _attempt(fn: Callable[[], Dict[str, object]], what: str) -> Dict[str, object]:
    """``fn()``, or ``{"oom": True}`` when the GPU runs out of memory (printed)."""
    try:
        return fn()
    except torch.cuda.OutOfMemoryError as err:
        print(f"[bench_op] {what}: out of memory ({str(err).splitlines()[0]})", flush=True)
        return {"oom": True}
    finally:
        torch.cuda.empty_cache()


def run_grid(layouts: Sequence[Tuple[int, int]], lengths: Sequence[int], attention: DenseAttention, rounds: int,
             expanded: bool, full_dense: bool) -> List[Dict[str, object]]:
    """Every row of the grid; a (heads, pyramid) series stops at its first out-of-memory, ``--full-dense`` also
    past ``DENSE_LIMIT_MS``. A growing pyramid equal to the fixed one at a length reuses its row."""
    rows: List[Dict[str, object]] = []
    for heads, kv_heads in layouts:
        stopped = set()
        for n in lengths:
            for kind in PYRAMIDS + (("dense",) if full_dense else ()):
                if kind in stopped:
                    continue
                key = {"heads": f"{heads}/{kv_heads}", "H": heads, "H_kv": kv_heads, "N": n, "pyramid": kind}
                if kind == "dense":
                    row = {**key, **_attempt(lambda: bench_full_dense(n, heads, kv_heads), f"dense {n}")}
                    if row.get("oom") or row["fwd_bwd_ms"] > DENSE_LIMIT_MS:
                        stopped.add(kind)
                elif kind == "growing" and pyramid(n, kind).levels == FIXED_LEVELS and (
                        rows[-1]["pyramid"], rows[-1]["N"]) == ("fixed", n):
                    row = {**rows[-1], "pyramid": kind}
                else:
                    what = f"{heads}/{kv_heads} {n} {kind}"
                    row = {**key, **_attempt(lambda: bench_row(n, heads, kv_heads, kind, attention, rounds,
                                                               expanded), what)}
                if row.get("oom"):
                    stopped.add(kind)
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def exponents(rows: Sequence[Dict[str, object]]) -> Dict[str, float]:
    """The growth exponent of each (heads, pyramid) series: dense over every length it ran, Lighthouse over
    ``FIT_RANGE``; series with fewer than two such lengths are left out."""
    out = {}
    for series in sorted({(r["heads"], r["pyramid"]) for r in rows}):
        ran = [r for r in rows if (r["heads"], r["pyramid"]) == series and not r.get("oom")
               and (series[1] == "dense" or FIT_RANGE[0] <= r["N"] <= FIT_RANGE[1])]
        times = [r["fwd_bwd_ms"] if series[1] == "dense" else r["op_ms"] for r in ran]
        if len(ran) >= 2:
            out[" ".join(series)] = fit_exponent([r["N"] for r in ran], times)
    return out


def _cell(row: Dict[str, object], key: str, fmt: str = "%.4g") -> str:
    value = row.get(key)
    if isinstance(value, float):
        return "%.0f" % value if fmt == "%.4g" and value >= 1e4 else fmt % value
    return "-" if value is None else str(value)


def print_table(rows: Sequence[Dict[str, object]], fits: Dict[str, float]) -> None:
    """The rows as a markdown table (op vs floor; the expanded path when timed), then the full dense rows."""
    print("| heads | N | pyramid | L | S | op f+b ms | floor ms (dense S + bytes) | op / floor | op GiB "
          "| expanded f+b ms | expanded / floor | expanded GiB |")
    print("|" + " --- |" * 12)
    for r in rows:
        if r["pyramid"] == "dense":
            continue
        cells = [r["heads"], str(r["N"]), r["pyramid"]]
        if r.get("oom"):
            cells += ["out of memory"] + ["-"] * 8
        else:
            floor = f"{_cell(r, 'floor_ms')} ({_cell(r, 'dense_ms')} + {_cell(r, 'bytes_ms', '%.2f')})"
            ratio = f"{_cell(r, 'op_ratio', '%.3f')} [{'%.3f-%.3f' % tuple(r['op_ratio_range'])}]"
            expanded = (["out of memory", "-", "-"] if r.get("expanded_oom") else
                        [_cell(r, "expanded_ms"), _cell(r, "expanded_ratio", "%.3f"), _cell(r, "expanded_peak_gib")])
            cells += [str(r["levels"]), str(r["S"]), _cell(r, "op_ms"), floor, ratio, _cell(r, "op_peak_gib"),
                      *expanded]
        print("| " + " | ".join(cells) + " |")
    dense = [r for r in rows if r["pyramid"] == "dense"]
    if dense:
        print("\n| heads | N | full dense f+b ms | full dense GiB |\n| --- | --- | --- | --- |")
        for r in dense:
            print(f"| {r['heads']} | {r['N']} | " + ("out of memory | - |" if r.get("oom") else
                                                     f"{_cell(r, 'fwd_bwd_ms')} | {_cell(r, 'peak_gib')} |"))
    if fits:
        print("growth exponent a (time ∝ N^a): " + ", ".join(f"{k} {v:.3f}" for k, v in fits.items()))


def plot(rows: Sequence[Dict[str, object]], path: str, gpu: str) -> None:
    """Time against length, log-log: the op (solid) and its floor (dashed) per series; full dense if run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    for series in sorted({(r["heads"], r["pyramid"]) for r in rows}):
        ran = [r for r in rows if (r["heads"], r["pyramid"]) == series and not r.get("oom")]
        if not ran:
            continue
        if series[1] == "dense":
            ax.plot([r["N"] for r in ran], [r["fwd_bwd_ms"] for r in ran], "k:", marker="x",
                    label=f"dense, all tokens, {series[0]}")
            continue
        (line,) = ax.plot([r["N"] for r in ran], [r["op_ms"] for r in ran], marker="o", label=" ".join(series))
        ax.plot([r["N"] for r in ran], [r["floor_ms"] for r in ran], "--", color=line.get_color(), alpha=0.6)
    ax.set(xscale="log", yscale="log", xlabel="sequence length N", ylabel="forward+backward (ms, median)",
           title=f"Lighthouse op (solid) vs its floor (dashed), {gpu}\nB={B} D={D} bf16 p={P} k={TOPK}")
    ax.set_xscale("log", base=2)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default=DEFAULT_LENGTHS, help="comma-separated sequence lengths")
    parser.add_argument("--heads", default=DEFAULT_HEADS, help="comma-separated query/kv heads, e.g. 32/8,8/8")
    parser.add_argument("--dense", default="cudnn", choices=DENSE_KERNELS,
                        help="the dense kernel of the op's subsequence and of the floor (auto: the fastest for the "
                             "shape, the same for both)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds per row (>= 1)")
    parser.add_argument("--expanded-baseline", action="store_true",
                        help="also time the op on k/v expanded to the query heads (the path before native GQA)")
    parser.add_argument("--full-dense", action="store_true", help="dense attention on all N tokens per length")
    parser.add_argument("--out-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    parser.add_argument("--check", action="store_true", help="device correctness checks first")
    parser.add_argument("--golden-dir", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "golden"))
    args = parser.parse_args(argv)
    try:
        args.layouts = parse_heads(args.heads)
        args.length_list = [int(x) for x in args.lengths.split(",")]
    except ValueError as err:
        parser.error(str(err))
    if args.rounds < 1:
        parser.error(f"--rounds {args.rounds}: must be >= 1")
    return args


def main() -> None:
    args = parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_op.py needs a CUDA GPU (the fused kernels and cuDNN); none is visible")
    import triton

    gpu = torch.cuda.get_device_name()
    report = {"date": datetime.date.today().isoformat(), "gpu": gpu, "torch": torch.__version__,
              "triton": triton.__version__, "allocator": os.environ["PYTORCH_CUDA_ALLOC_CONF"],
              "config": dict(B=B, D=D, dtype="bf16", pooling_factor=P, topk=TOPK, fixed_levels=FIXED_LEVELS,
                             dense=args.dense, rounds=args.rounds, fit_range=FIT_RANGE, heads=args.heads)}
    if args.check:
        report["checks"] = check(args.golden_dir)
    attention = dense_attention(args.dense, "cuda")
    report["rows"] = run_grid(args.layouts, args.length_list, attention, args.rounds, args.expanded_baseline,
                              args.full_dense)
    report["exponents"] = exponents(report["rows"])
    print_table(report["rows"], report["exponents"])
    os.makedirs(args.out_dir, exist_ok=True)
    tag = gpu.replace(" ", "_").replace("/", "_")
    with open(os.path.join(args.out_dir, f"op_{tag}.json"), "w") as f:
        json.dump(report, f, indent=1)
    plot(report["rows"], os.path.join(args.out_dir, f"op_{tag}.png"), gpu)


if __name__ == "__main__":
    main()
