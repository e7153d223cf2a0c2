"""How the op's cost grows with the sequence: Lighthouse (fused kernels) vs dense causal cuDNN SDPA, one GPU.

B=1, H=8, D=128, bf16, topk=2048, pooling_factor=4, forward+backward at every length of ``--lengths`` (32K up to
8M by default; a length that runs out of memory ends the series), Lighthouse two ways:

- ``fixed``: the paper's pyramid, levels=3. The subsequence grows as ``N/p**(L-1)``, so the cost turns quadratic
  again at long lengths (256x smaller than dense);
- ``growing``: ``LighthouseConfig.for_sequence(N)``, the fewest levels whose top level has at most 16,384 entries
  (L=2 up to 64K, L=3 to 256K, L=4 to 1M, L=5 to 4M, L=6 at 8M), so the subsequence stays bounded and the cost
  near-linear;

and dense cuDNN SDPA until a length takes over 10 s or runs out of memory. The CUDA allocator runs with
``expandable_segments:True`` unless ``PYTORCH_CUDA_ALLOC_CONF`` is set: at 8M the tensors are 16 GiB each, and
without it fragmentation alone runs out of memory. Reports time and
peak memory per length, the subsequence length S, the forward stage breakdown of the fixed pyramid, and the fitted
growth exponent ``a`` of ``time ∝ N**a`` (dense over the lengths it ran, Lighthouse over 128K-4M, the range where
both pyramids are past their small-length overheads). ``--check``
first verifies on the device: goldens in fp32, bf16 against the oracle, bitwise determinism of the fused kernels,
the Triton selection equal to the oracle's. Prints a table; writes ``op_<gpu>.json`` and ``op_<gpu>.png``
(log-log time against length) under ``--out-dir``.

    PYTHONPATH=$PWD:$PWD/kernels python3 benchmarks/bench_op.py --check --golden-dir .golden --out-dir $OUT
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import math
import os
import statistics
from typing import Callable, Dict, List, Sequence

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # before torch touches CUDA

import torch  # noqa: E402

from megatron_lighthouse import LighthouseConfig, lighthouse_attention, naive, select_indices
from megatron_lighthouse.dense import dense_attention

B, H, D, P, TOPK, FIXED_LEVELS = 1, 8, 128, 4, 2048, 3
DTYPE = torch.bfloat16
FIT_RANGE = (131072, 4194304)  # Lighthouse exponents are fitted over these lengths, both ends included
DENSE_LIMIT_MS = 10_000.0  # dense runs until a length takes longer than this
#: The columns of the printed table after N, per series.
COLUMNS = {"fixed": ("levels", "S", "fwd_bwd_ms", "peak_gib"), "growing": ("levels", "S", "fwd_bwd_ms", "peak_gib"),
           "dense": ("fwd_bwd_ms", "peak_gib")}


def pyramid(n: int, kind: str) -> LighthouseConfig:
    """The settings of one series at length ``n``: ``"fixed"`` (levels=3) or ``"growing"``."""
    if kind == "fixed":
        return LighthouseConfig(levels=FIXED_LEVELS, pooling_factor=P, topk=TOPK)
    return LighthouseConfig.for_sequence(n, pooling_factor=P, topk=TOPK)


def fit_exponent(lengths: Sequence[float], times: Sequence[float]) -> float:
    """Least-squares slope of ``log(time)`` against ``log(length)``: the ``a`` of ``time ∝ N**a``."""
    if len(lengths) < 2:
        return float("nan")
    return statistics.linear_regression([math.log(n) for n in lengths], [math.log(t) for t in times]).slope


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def median_ms(fn: Callable[[], object], slow_ms: float = 200.0) -> float:
    """Median time of ``fn`` in ms: ``triton.testing.do_bench`` for fast calls; one warm-up and the median of 3
    CUDA-event timings for calls over ``slow_ms`` (a single one over 5 s)."""
    import triton.testing

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times: List[float] = []
    fn()
    for _ in range(3):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
        if times[0] < slow_ms:
            return float(triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median"))
        if times[0] > 5000:
            break
    return statistics.median(times)


def peak_gib(fn: Callable[[], object]) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**30


def _qkv(n: int, seed: int, grad: bool = True) -> List[torch.Tensor]:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(B, n, H, D, device="cuda", generator=gen, dtype=DTYPE).requires_grad_(grad)
            for _ in range(4)]


# ----------------------------------------------------------------------------------------------- device checks
def check(golden_dir: str) -> Dict[str, object]:
    """Goldens (fp32), bf16 agreement with the oracle, bitwise determinism; raises on failure."""
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
    n = 32768
    *base, dout = _qkv(n, 0, grad=False)
    config = pyramid(n, "fixed")
    runs = {}
    for backend in ("triton", "torch"):
        q, k, v = (x.clone().requires_grad_(True) for x in base)
        out = lighthouse_attention(q, k, v, config=config, backend=backend)
        out.backward(dout)
        runs[backend] = [out.detach(), q.grad, k.grad, v.grad]
    bf16 = [rel_l2(a, b) for a, b in zip(runs["triton"], runs["torch"])]
    steps = []  # our kernels alone, twice on the same inputs: bitwise equal
    for _ in range(2):
        q, k, v = (x.clone().requires_grad_(True) for x in base)
        sq, sk = fused.pool_scores(q.detach(), k.detach(), FIXED_LEVELS, P)
        idx = fused.select_entries(sq, sk, n, FIXED_LEVELS, P, TOPK)
        qs, ks, vs = fused.gather_entries(q, k, v, idx, FIXED_LEVELS, P)
        out = fused.scatter_to_tokens(qs * ks + vs, idx, n, FIXED_LEVELS, P)
        out.backward(dout)
        steps.append([sq, sk, idx, out.detach(), q.grad, k.grad, v.grad])
    deterministic = all(torch.equal(a, b) for a, b in zip(*steps))
    print(f"bf16 N={n}: rel-L2 vs oracle out/dq/dk/dv {['%.1e' % e for e in bf16]}; fused kernels bitwise "
          f"deterministic {deterministic}")
    assert deterministic and max(bf16) < 2e-2
    results["bf16_32k"] = {"kernels_deterministic": deterministic, "rel_l2_vs_oracle": bf16}
    for n in (32768, 131072, 524288):  # the Triton selection equals the oracle's on the same scores
        q, k, *_ = _qkv(n, n, grad=False)
        sq, sk = fused.pool_scores(q, k, FIXED_LEVELS, P)
        exact = torch.equal(fused.select_entries(sq, sk, n, FIXED_LEVELS, P, TOPK),
                            naive.select_entries(sq, sk, n, FIXED_LEVELS, P, TOPK))
        print(f"selection N={n}: equal to the oracle {exact}")
        results[f"selection_exact_{n}"] = exact
        assert exact, n
    return results


# ----------------------------------------------------------------------------------------------- timing
def bench_lighthouse(n: int, config: LighthouseConfig, stages: bool) -> Dict[str, float]:
    """Lighthouse forward, forward+backward and peak memory at length ``n`` (and the forward's stages)."""
    import lighthouse_kernels as fused

    q, k, v, dout = _qkv(n, n)
    attn = dense_attention("auto", "cuda")
    run = functools.partial(lighthouse_attention, q, k, v, config=config, attention=attn, backend="triton")

    def fwd_bwd():
        run().backward(dout)
        q.grad = k.grad = v.grad = None

    with torch.no_grad():
        row = {"levels": config.levels, "S": config.subsequence_length(n), "fwd_ms": median_ms(run)}
    row["fwd_bwd_ms"] = median_ms(fwd_bwd)
    row["peak_gib"] = peak_gib(fwd_bwd)
    if stages:
        levels, scale = config.levels, 1.0 / math.sqrt(D)
        with torch.no_grad():
            sq, sk = fused.pool_scores(q, k, levels, P)
            idx = fused.select_entries(sq, sk, n, levels, P, TOPK)
            picked = fused.gather_entries(q, k, v, idx, levels, P)
            sub_out = attn(*picked, scale)
            row.update(
                pool_score_ms=median_ms(lambda: fused.pool_scores(q, k, levels, P)),
                select_ms=median_ms(lambda: fused.select_entries(sq, sk, n, levels, P, TOPK)),
                gather_ms=median_ms(lambda: fused.gather_entries(q, k, v, idx, levels, P)),
                dense_sub_ms=median_ms(lambda: attn(*picked, scale)),
                scatter_ms=median_ms(lambda: fused.scatter_to_tokens(sub_out, idx, n, levels, P)))
    return row


def bench_dense(n: int) -> Dict[str, float]:
    """Causal cuDNN SDPA over all ``n`` tokens: forward+backward and peak memory."""
    q, k, v, dout = (x.transpose(1, 2) for x in _qkv(n, n))
    kernel = dense_attention("cudnn", "cuda")

    def fwd_bwd():
        kernel(q, k, v, 1.0 / math.sqrt(D)).backward(dout)

    return {"fwd_bwd_ms": median_ms(fwd_bwd), "peak_gib": peak_gib(fwd_bwd)}


def _attempt(fn: Callable[[], Dict[str, float]], what: str) -> Dict[str, float]:
    """``fn()``, or ``{"oom": True}`` when the GPU runs out of memory (printed)."""
    try:
        return fn()
    except torch.cuda.OutOfMemoryError as err:
        print(f"[bench_op] {what}: out of memory ({str(err).splitlines()[0]})", flush=True)
        return {"oom": True}
    finally:
        torch.cuda.empty_cache()


def run_series(lengths: Sequence[int]) -> Dict[str, List[Dict[str, float]]]:
    """Every series over ``lengths``; a series stops at its first out-of-memory (dense also past its limit)."""
    series: Dict[str, List[Dict[str, float]]] = {"fixed": [], "growing": [], "dense": []}
    for n in lengths:
        for kind in ("fixed", "growing"):
            if series[kind] and series[kind][-1].get("oom"):
                continue
            config = pyramid(n, kind)
            if kind == "growing" and config.levels == FIXED_LEVELS and series["fixed"][-1]["N"] == n:
                row = {k: v for k, v in series["fixed"][-1].items() if not k.endswith("_ms") or "fwd" in k}
            else:
                row = {"N": n, **_attempt(lambda: bench_lighthouse(n, config, kind == "fixed"), f"{kind} {n}")}
            series[kind].append(row)
            print(json.dumps({"series": kind, **row}), flush=True)
        last = series["dense"][-1] if series["dense"] else {}
        if not last.get("oom") and last.get("fwd_bwd_ms", 0.0) <= DENSE_LIMIT_MS:
            series["dense"].append({"N": n, **_attempt(lambda: bench_dense(n), f"dense {n}")})
            print(json.dumps({"series": "dense", **series["dense"][-1]}), flush=True)
    return series


def exponents(series: Dict[str, List[Dict[str, float]]]) -> Dict[str, float]:
    """The growth exponent of each series: dense over every length it ran, Lighthouse over ``FIT_RANGE``."""
    out = {}
    for kind, rows in series.items():
        ran = [r for r in rows if "fwd_bwd_ms" in r and (kind == "dense" or FIT_RANGE[0] <= r["N"] <= FIT_RANGE[1])]
        out[kind] = fit_exponent([r["N"] for r in ran], [r["fwd_bwd_ms"] for r in ran])
    return out


def print_table(series: Dict[str, List[Dict[str, float]]], fits: Dict[str, float]) -> None:
    print("| N | fixed L | fixed S | fixed f+b ms | fixed GiB | growing L | growing S | growing f+b ms | growing GiB "
          "| dense f+b ms | dense GiB |")
    print("|" + " --- |" * 11)
    by_n = {kind: {r["N"]: r for r in rows} for kind, rows in series.items()}
    for n in sorted({r["N"] for rows in series.values() for r in rows}):
        cells = [str(n)]
        for kind, keys in COLUMNS.items():
            row = by_n[kind].get(n, {})
            if row.get("oom"):
                cells += ["OOM"] + ["-"] * (len(keys) - 1)
            else:
                cells += ["%.4g" % row[k] if isinstance(row.get(k), float) else str(row.get(k, "-")) for k in keys]
        print("| " + " | ".join(cells) + " |")
    print("growth exponent a (time ∝ N^a): " + ", ".join(f"{k} {v:.3f}" for k, v in fits.items()))


def plot(series: Dict[str, List[Dict[str, float]]], fits: Dict[str, float], path: str, gpu: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    labels = {"fixed": "Lighthouse, fixed pyramid (L=3)", "growing": "Lighthouse, growing pyramid",
              "dense": "dense causal cuDNN SDPA"}
    for kind, rows in series.items():
        pts = [(r["N"], r["fwd_bwd_ms"]) for r in rows if "fwd_bwd_ms" in r]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=f"{labels[kind]} (a = {fits[kind]:.2f})")
    ax.set(xscale="log", yscale="log", xlabel="sequence length N", ylabel="forward+backward (ms, median)",
           title=f"Lighthouse op vs dense, {gpu}\nB={B} H={H} D={D} bf16 p={P} k={TOPK}")
    ax.set_xscale("log", base=2)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default=",".join(str(2**i) for i in range(15, 24)),
                        help="comma-separated sequence lengths (default: 32K to 8M, powers of two)")
    parser.add_argument("--out-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    parser.add_argument("--check", action="store_true", help="device correctness checks first")
    parser.add_argument("--golden-dir", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "golden"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_op.py needs a CUDA GPU (the fused kernels and cuDNN); none is visible")
    import triton

    gpu = torch.cuda.get_device_name()
    report = {"date": datetime.date.today().isoformat(), "gpu": gpu, "torch": torch.__version__,
              "triton": triton.__version__, "allocator": os.environ["PYTORCH_CUDA_ALLOC_CONF"],
              "config": dict(B=B, H=H, D=D, dtype="bf16", pooling_factor=P, topk=TOPK, fixed_levels=FIXED_LEVELS,
                             fit_range=FIT_RANGE)}
    if args.check:
        report["checks"] = check(args.golden_dir)
    report["series"] = run_series([int(x) for x in args.lengths.split(",")])
    report["exponents"] = exponents(report["series"])
    print_table(report["series"], report["exponents"])
    os.makedirs(args.out_dir, exist_ok=True)
    tag = gpu.replace(" ", "_").replace("/", "_")
    with open(os.path.join(args.out_dir, f"op_{tag}.json"), "w") as f:
        json.dump(report, f, indent=1)
    plot(report["series"], report["exponents"], os.path.join(args.out_dir, f"op_{tag}.png"), gpu)


if __name__ == "__main__":
    main()
