"""Op benchmark of Lighthouse attention with the fused Triton kernels vs dense causal SDPA (issue 3).

One run, on the GPU it is given: B=1, H=8, D=128, bf16, levels=3, pooling_factor=4, topk=2048, N in 32K..1M
(``--lengths``). For each N: forward and forward+backward medians (``triton.testing.do_bench`` after warm-up; a
median of CUDA-event timings for calls over ``--slow-ms``), peak memory of forward+backward, dense causal SDPA with the
cuDNN and the flash backends (up to ``--dense-max``), and a forward stage breakdown (pool/score, select, gather,
dense, scatter; backward = fwd+bwd minus fwd); the dense kernel on the subsequence is ``"auto"`` (the fastest
available, timed once; the choice is recorded). Before timing, ``--check`` verifies on the device: goldens in fp32,
bf16 agreement with the oracle, bitwise determinism of outputs and gradients, and the Triton selection equal to the
oracle's up to 512K.

Prints a table; writes ``<out-dir>/op_<gpu>.json`` and ``op_<gpu>.png`` (time vs N, log-log).

    PYTHONPATH=$PWD:$PWD/kernels python3 benchmarks/bench_op.py --check --golden-dir .golden
Needs torch, triton and this package (no megatron-core).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import math
import os
import statistics
import sys
from typing import Callable, Dict, List

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kernels"))

import torch  # noqa: E402
import triton.testing  # noqa: E402

import lighthouse_kernels as fused  # noqa: E402
from megatron_lighthouse import lighthouse_attention  # noqa: E402
from megatron_lighthouse.naive import select_pyramid_indices  # noqa: E402

LEVELS, P, TOPK, B, H, D = 3, 4, 2048, 1, 8, 128
DTYPE = torch.bfloat16


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def median_ms(fn: Callable[[], object], slow_ms: float) -> float:
    """Median time of ``fn`` in ms: do_bench for fast calls, 3 CUDA-event timings after one warm-up for slow ones."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    fn()
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    once = start.elapsed_time(end)
    if once < slow_ms:
        return float(triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median"))
    times = []
    for _ in range(3):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def peak_gib(fn: Callable[[], object]) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**30


# ----------------------------------------------------------------------------------------------- device checks
def check(golden_dir: str) -> Dict[str, object]:
    """Goldens (fp32), bf16 agreement with the oracle, bitwise determinism; raises on failure."""
    results: Dict[str, object] = {}
    for path in sorted(os.listdir(golden_dir)):
        for name, rec in torch.load(os.path.join(golden_dir, path)).items():
            cfg = rec["config"]
            settings = dict(levels=cfg["levels"], pooling_factor=cfg["pooling_factor"], topk=cfg["topk"],
                            chunks=cfg["chunks"])
            q, k, v = (rec[x].cuda().requires_grad_(True) for x in "qkv")
            out = lighthouse_attention(q, k, v, backend="triton", **settings)
            out.transpose(1, 2).backward(rec["dout"].cuda())
            errs = [rel_l2(out.detach().transpose(1, 2).cpu(), rec["out"])] + [
                rel_l2(x.grad.cpu(), rec["d" + n]) for x, n in zip((q, k, v), "qkv")]
            idx = fused_indices(q.detach(), k.detach(), settings)
            same = all(torch.equal(a.cpu(), b.long()) for a, b in zip(idx, rec["indices"]))
            results[f"golden_{name}"] = {"indices_exact": same, "rel_l2_out_dq_dk_dv": errs}
            print(f"golden {name}: indices exact {same}, rel-L2 out/dq/dk/dv {['%.1e' % e for e in errs]}")
            assert same and max(errs) < 1e-4, name
    n = 32768
    gen = torch.Generator(device="cuda").manual_seed(0)
    base = [torch.randn(B, n, H, D, device="cuda", generator=gen, dtype=DTYPE) for _ in range(3)]
    dout = torch.randn(B, n, H, D, device="cuda", generator=gen, dtype=DTYPE)
    settings = dict(levels=LEVELS, pooling_factor=P, topk=TOPK)
    runs = {}
    for tag, backend in (("triton1", "triton"), ("triton2", "triton"), ("torch", "torch")):
        q, k, v = (x.clone().requires_grad_(True) for x in base)
        out = lighthouse_attention(q, k, v, backend=backend, **settings)
        out.backward(dout)
        runs[tag] = [out.detach(), q.grad, k.grad, v.grad]
    same = [torch.equal(a, b) for a, b in zip(runs["triton1"], runs["triton2"])]
    bf16 = [rel_l2(a, b) for a, b in zip(runs["triton1"], runs["torch"])]
    print(f"bf16 N={n}: whole op bitwise equal out/dq/dk/dv {same} (the dense kernel's backward may not be "
          f"deterministic); rel-L2 vs oracle out/dq/dk/dv {['%.1e' % e for e in bf16]}")
    # Our kernels alone (pool/score, gather fwd+bwd, scatter fwd+bwd), twice on the same inputs: bitwise equal.
    kernel_runs = []
    for _ in range(2):
        q, k, v = (x.clone().requires_grad_(True) for x in base)
        sq, sk = fused.pool_scores(q.detach(), k.detach(), LEVELS, P)
        idx = fused.select_indices_fused(sq, sk, n, LEVELS, P, TOPK)
        qs, ks, vs = fused.gather_from_tokens(q, k, v, idx, LEVELS, P)
        out = fused.scatter_to_tokens(qs * ks + vs, idx, n, LEVELS, P)
        out.backward(dout)
        kernel_runs.append([sq, sk, idx, out.detach(), q.grad, k.grad, v.grad])
    det = all(torch.equal(a, b) for a, b in zip(*kernel_runs))
    print(f"fused kernels bitwise deterministic (scores, indices, out, dq, dk, dv): {det}")
    assert det and same[0] and max(bf16) < 2e-2
    results["bf16_32k"] = {"kernels_deterministic": det, "whole_op_bitwise_equal_out_dq_dk_dv": same,
                           "rel_l2_vs_oracle": bf16}
    # The Triton selection equals the oracle's on the same scores, up to the longest benchmarked length.
    for n in (32768, 131072, 524288):
        q, k = (torch.randn(B, n, H, D, device="cuda", generator=gen, dtype=DTYPE) for _ in range(2))
        sq, sk = fused.pool_scores(q, k, LEVELS, P)
        exact = torch.equal(fused.select_indices_fused(sq, sk, n, LEVELS, P, TOPK),
                            select_pyramid_indices(sq, sk, n, LEVELS, P, TOPK))
        print(f"selection N={n}: equal to the oracle {exact}")
        results[f"selection_exact_{n}"] = exact
        assert exact, n
        del q, k, sq, sk
    return results


def fused_indices(q, k, settings):
    from megatron_lighthouse import select_indices

    idx = select_indices(q, k, backend="triton", **settings)
    return [idx] if settings["chunks"] == 1 else list(idx.unbind(1))


# ----------------------------------------------------------------------------------------------- timing
def bench_length(n: int, slow_ms: float, dense: bool) -> Dict[str, float]:
    """One row of the table: Lighthouse at length ``n`` (and the dense kernels when ``dense``)."""
    row: Dict[str, float] = {"N": n, **bench_lighthouse(n, slow_ms)}
    torch.cuda.empty_cache()  # the Lighthouse tensors died with bench_lighthouse's frame
    if dense:
        row.update(bench_dense(n, slow_ms))
        torch.cuda.empty_cache()
    return row


def bench_lighthouse(n: int, slow_ms: float) -> Dict[str, float]:
    """Lighthouse forward, forward+backward, peak memory and the forward's stage breakdown at length ``n``."""
    row: Dict[str, float] = {}
    gen = torch.Generator(device="cuda").manual_seed(n)
    q, k, v = (torch.randn(B, n, H, D, device="cuda", generator=gen, dtype=DTYPE).requires_grad_(True)
               for _ in range(3))
    dout = torch.randn(B, n, H, D, device="cuda", generator=gen, dtype=DTYPE)
    scale = 1.0 / math.sqrt(D)
    attn = fused.dense_attention("auto", "cuda")
    run = functools.partial(lighthouse_attention, q, k, v, levels=LEVELS, pooling_factor=P, topk=TOPK,
                            attention=attn, backend="triton")

    def fwd():
        with torch.no_grad():
            return run()

    def fwd_bwd():
        out = run()
        out.backward(dout)
        q.grad = k.grad = v.grad = None

    row["lighthouse_fwd_ms"] = median_ms(fwd, slow_ms)
    row["lighthouse_fwd_bwd_ms"] = median_ms(fwd_bwd, slow_ms)
    row["lighthouse_peak_gib"] = peak_gib(fwd_bwd)

    # Forward stage breakdown.
    with torch.no_grad():
        sq, sk = fused.pool_scores(q, k, LEVELS, P)
        idx = fused.select_indices_fused(sq, sk, n, LEVELS, P, TOPK)
        inv = fused.inverse_map_for(idx, n, LEVELS, P)
        picked = fused.gather_from_tokens(q, k, v, idx, LEVELS, P, inv)
        sub_out = attn(*picked, scale)
        row["stage_pool_score_ms"] = median_ms(lambda: fused.pool_scores(q, k, LEVELS, P), slow_ms)
        row["stage_select_ms"] = median_ms(lambda: fused.select_indices_fused(sq, sk, n, LEVELS, P, TOPK), slow_ms)
        row["stage_gather_ms"] = median_ms(
            lambda: fused.gather_from_tokens(q, k, v, idx, LEVELS, P, fused.inverse_map_for(idx, n, LEVELS, P)),
            slow_ms)
        row["stage_dense_ms"] = median_ms(lambda: attn(*picked, scale), slow_ms)
        row["stage_scatter_ms"] = median_ms(lambda: fused.scatter_to_tokens(sub_out, idx, n, LEVELS, P, inv), slow_ms)
    sub = [x.detach().clone().requires_grad_(True) for x in picked]
    d_sub = torch.randn_like(sub_out)

    def dense_sub_fwd_bwd():
        attn(*sub, scale).backward(d_sub)
        for x in sub:
            x.grad = None

    row["stage_dense_fwd_bwd_ms"] = median_ms(dense_sub_fwd_bwd, slow_ms)
    row["stage_backward_ms"] = row["lighthouse_fwd_bwd_ms"] - row["lighthouse_fwd_ms"]
    row["subsequence_length"] = idx.shape[-1]
    row["dense_kernel_auto_choice"] = attn.choices[(tuple(picked[0].shape), tuple(picked[1].shape), DTYPE,
                                                    picked[0].device)]
    row["around_attention_fraction_fwd_bwd"] = 1 - row["stage_dense_fwd_bwd_ms"] / row["lighthouse_fwd_bwd_ms"]
    return row


def bench_dense(n: int, slow_ms: float) -> Dict[str, float]:
    """Causal dense attention over all ``n`` tokens, cuDNN and flash SDPA: forward, forward+backward, peak memory."""
    row: Dict[str, float] = {}
    gen = torch.Generator(device="cuda").manual_seed(n)
    dq, dk, dv = (torch.randn(B, H, n, D, device="cuda", generator=gen, dtype=DTYPE).requires_grad_(True)
                  for _ in range(3))
    ddo = torch.randn(B, H, n, D, device="cuda", generator=gen, dtype=DTYPE)
    scale = 1.0 / math.sqrt(D)
    for name in ("cudnn", "flash"):
        kernel = fused.dense_attention(name, "cuda")

        def dfwd():
            with torch.no_grad():
                return kernel(dq, dk, dv, scale)

        def dfwd_bwd():
            kernel(dq, dk, dv, scale).backward(ddo)
            dq.grad = dk.grad = dv.grad = None

        row[f"dense_{name}_fwd_ms"] = median_ms(dfwd, slow_ms)
        row[f"dense_{name}_fwd_bwd_ms"] = median_ms(dfwd_bwd, slow_ms)
        row[f"dense_{name}_peak_gib"] = peak_gib(dfwd_bwd)
    return row


def plot(rows: List[Dict[str, float]], path: str, gpu: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    for key, label in (("lighthouse_fwd_bwd_ms", "Lighthouse (Triton) fwd+bwd"),
                       ("lighthouse_fwd_ms", "Lighthouse fwd"),
                       ("dense_cudnn_fwd_bwd_ms", "dense SDPA cuDNN fwd+bwd"),
                       ("dense_flash_fwd_bwd_ms", "dense SDPA flash fwd+bwd"),
                       ("dense_cudnn_fwd_ms", "dense cuDNN fwd")):
        pts = [(r["N"], r[key]) for r in rows if key in r]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length N")
    ax.set_ylabel("median time (ms)")
    ax.set_title(f"Lighthouse op vs dense causal attention, {gpu}\nB={B} H={H} D={D} bf16 L={LEVELS} p={P} k={TOPK}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="32768,65536,131072,262144,524288,1048576")
    parser.add_argument("--out-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    parser.add_argument("--check", action="store_true", help="device correctness checks first")
    parser.add_argument("--golden-dir", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "golden"))
    parser.add_argument("--dense-max", type=int, default=524288,
                        help="dense baselines only up to this N (dense at 1M costs ~15 s per call)")
    parser.add_argument("--slow-ms", type=float, default=200.0)
    args = parser.parse_args()

    gpu = torch.cuda.get_device_name()
    tag = gpu.replace(" ", "_").replace("/", "_")
    report = {"date": datetime.date.today().isoformat(), "gpu": gpu, "torch": torch.__version__,
              "triton": triton.__version__, "config": dict(B=B, H=H, D=D, dtype="bf16", levels=LEVELS,
                                                           pooling_factor=P, topk=TOPK)}
    if args.check:
        report["checks"] = check(args.golden_dir)
    rows = []
    for n in (int(x) for x in args.lengths.split(",")):
        row = bench_length(n, args.slow_ms, n <= args.dense_max)
        rows.append(row)
        print(json.dumps(row), flush=True)
    report["rows"] = rows

    cols = [("N", "N"), ("lighthouse_fwd_ms", "LH fwd"), ("lighthouse_fwd_bwd_ms", "LH f+b"),
            ("lighthouse_peak_gib", "LH GiB"), ("dense_cudnn_fwd_ms", "cuDNN fwd"),
            ("dense_cudnn_fwd_bwd_ms", "cuDNN f+b"),
            ("dense_cudnn_peak_gib", "cuDNN GiB"), ("dense_flash_fwd_bwd_ms", "flash f+b"),
            ("stage_pool_score_ms", "pool/score"), ("stage_select_ms", "select"), ("stage_gather_ms", "gather"),
            ("stage_dense_ms", "dense sub fwd"), ("stage_scatter_ms", "scatter"),
            ("stage_dense_fwd_bwd_ms", "dense sub f+b"), ("stage_backward_ms", "backward"),
            ("around_attention_fraction_fwd_bwd", "around %")]
    print("| " + " | ".join(c[1] for c in cols) + " |")
    print("|" + " --- |" * len(cols))
    for r in rows:
        print("| " + " | ".join(("%.3g" % r[c[0]]) if c[0] in r else "-" for c in cols) + " |")
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, f"op_{tag}.json"), "w") as f:
        json.dump(report, f, indent=1)
    plot(rows, os.path.join(args.out_dir, f"op_{tag}.png"), gpu)


if __name__ == "__main__":
    main()
