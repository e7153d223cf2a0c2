"""Context-parallel Lighthouse attention: equality under the real backend, then strong scaling of one layer.

Run once per CP size ``W`` with one process per GPU (``W = 1`` and ``W = --max-cp``). Every run computes the same
thing: the sequence cut into ``2 * max_cp`` chunks, each selected alone with ``topk / (2 * max_cp)``, one causal
attention over the chunk subsequences (``W = 1``: ``lighthouse_attention(..., chunks=2*max_cp)`` on one device;
``W = max_cp``: ``lighthouse_attention(..., cp_group=...)`` on the load-balanced shards). So the work is identical
and ``t1 / (W * tW)`` is the strong-scaling efficiency.

1. Check (``W > 1``): indices, output and q/k/v gradients of the CP run equal the single-process chunked run
   (in the benchmark dtype and in float32), for Lighthouse and for dense CP attention.
2. Timing: one Lighthouse attention layer forward+backward (default 1M tokens, B=1, H=8, D=128, k=2048, p=4, L=3)
   and dense causal attention on the same tokens (``W = 1``: SDPA; ``W > 1``: :func:`cp_causal_attention`).

Prints a table; writes ``<out-dir>/cp_<device>_w<W>.json``. The ``W > 1`` run reads the ``W = 1`` JSON
(``--baseline``) for the efficiency.

GPU (see benchmarks/run_cp_gpu.sh):
    python3 -m torch.distributed.run --standalone --nproc-per-node 1 benchmarks/bench_cp.py --max-cp 2
    python3 -m torch.distributed.run --standalone --nproc-per-node 2 benchmarks/bench_cp.py --max-cp 2
CPU logic check (gloo, tiny sizes):
    python -m torch.distributed.run --standalone --nproc-per-node 2 benchmarks/bench_cp.py --device cpu --tiny
Needs torch and this package only (no megatron-core).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [_ROOT, os.path.join(_ROOT, "kernels")]  # this package and its Triton kernels, uninstalled

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.nn.attention import SDPBackend  # noqa: E402

from megatron_lighthouse import (  # noqa: E402
    LighthouseConfig,
    cp_causal_attention,
    lighthouse_attention,
    select_indices,
    split_for_cp,
)
from megatron_lighthouse.attention import resolve_backend  # noqa: E402
from megatron_lighthouse.dense import sdpa_causal  # noqa: E402
from megatron_lighthouse.cp_layout import cp_chunk_ids  # noqa: E402
from megatron_lighthouse.lower_right_attention import kernel_family  # noqa: E402

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
#: ``--tiny``: smallest settings valid for ``2 * max_cp`` chunks (each chunk: budget 128, 1024 tokens).
_TINY = dict(heads=2, head_dim=16, pooling_factor=2, levels=3, iters=2, warmup=1, dense_iters=1, dense_warmup=1)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny sizes for a logic check (CPU)")
    p.add_argument("--max-cp", type=int, default=2, help="largest CP size compared; every run uses 2*max_cp chunks")
    p.add_argument("--seq-len", type=int, default=1 << 20)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--topk", type=int, default=2048)
    p.add_argument("--pooling-factor", type=int, default=4)
    p.add_argument("--levels", type=int, default=3)
    p.add_argument("--dtype", choices=tuple(_DTYPES), default=None, help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--backend", default="auto", help="lighthouse_attention backend")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--dense-iters", type=int, default=2)
    p.add_argument("--dense-warmup", type=int, default=1)
    p.add_argument("--no-dense", action="store_true", help="skip the dense baseline")
    p.add_argument("--check-seq-len", type=int, default=1 << 16, help="tokens of the equality check")
    p.add_argument("--check-dense-seq-len", type=int, default=1 << 14, help="tokens of the dense equality check")
    p.add_argument("--no-check", action="store_true")
    p.add_argument("--out-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    p.add_argument("--baseline", default=None, help="W=1 JSON for the efficiency (default: <out-dir>/cp_<dev>_w1.json)")
    args = p.parse_args(argv)
    if args.tiny:
        for key, value in _TINY.items():
            setattr(args, key, value)
        args.seq_len = args.check_seq_len = args.check_dense_seq_len = 2048 * args.max_cp
        args.topk = 256 * args.max_cp
    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    return args


# ---------------------------------------------------------------------------------------------------- helpers
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _global_rel_l2(got: torch.Tensor, want: torch.Tensor) -> float:
    """Relative L2 error over the whole sequence: squared norms of every rank's shard summed."""
    sums = torch.stack([(got.double() - want.double()).square().sum(), want.double().square().sum()])
    dist.all_reduce(sums)
    return (sums[0].sqrt() / sums[1].sqrt()).item()


def _inputs(args: argparse.Namespace, n: int, seed: int) -> List[torch.Tensor]:
    """q, k, v, dout ``[B, n, H, D]`` float32 on CPU, identical on every rank."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(args.batch, n, args.heads, args.head_dim, generator=gen) for _ in range(4)]


def _fwd_bwd(fn: Callable, q, k, v, dout) -> List[torch.Tensor]:
    """``[out, dq, dk, dv]`` of ``fn(q, k, v)`` with upstream gradient ``dout``."""
    q, k, v = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
    out = fn(q, k, v)
    out.backward(dout)
    return [out.detach(), q.grad, k.grad, v.grad]


def _lighthouse(args: argparse.Namespace, **kwargs) -> Callable:
    settings = dict(levels=args.levels, pooling_factor=args.pooling_factor, topk=args.topk, backend=args.backend)
    return lambda q, k, v: lighthouse_attention(q, k, v, **settings, **kwargs)


def _dense(group: Optional[dist.ProcessGroup], scale: float) -> Callable:
    """Dense causal attention on ``[B, H, S, D]``: SDPA on one device, :func:`cp_causal_attention` over ``group``."""
    if group is None:
        return lambda q, k, v: sdpa_causal(q, k, v, scale)
    return lambda q, k, v: cp_causal_attention(q, k, v, scale, group)


# ---------------------------------------------------------------------------------------------------- check
def _compare(name: str, got: List[torch.Tensor], same: List[torch.Tensor], exact: List[torch.Tensor], low: bool):
    """Errors of the CP run against the single-process run in the same dtype and in float32."""
    rows = []
    for field, g, s, e in zip(("out", "dq", "dk", "dv"), got, same, exact):
        vs_same, vs_fp32, single_vs_fp32 = _global_rel_l2(g, s), _global_rel_l2(g, e), _global_rel_l2(s, e)
        # CP must equal the single-process run to the dtype's rounding and be no less accurate than it.
        ok = (vs_same < 2e-2 and vs_fp32 <= 2 * single_vs_fp32 + 1e-3) if low else vs_same < 1e-5
        rows.append(dict(case=name, field=field, cp_vs_single=vs_same, cp_vs_fp32=vs_fp32,
                         single_vs_fp32=single_vs_fp32, passed=bool(ok)))
    return rows


def run_check(args: argparse.Namespace, group, device: torch.device, dtype: torch.dtype) -> Dict:
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    low = dtype != torch.float32
    rows, indices_equal = [], True

    n = args.check_seq_len
    full = _inputs(args, n, seed=1)
    local = [split_for_cp(x, rank, world).to(device, dtype) for x in full]
    want_idx = select_indices(full[0].to(device, dtype), full[1].to(device, dtype), levels=args.levels,
                              pooling_factor=args.pooling_factor, topk=args.topk, chunks=2 * world)
    got_idx = select_indices(local[0], local[1], levels=args.levels, pooling_factor=args.pooling_factor,
                             topk=args.topk // world, chunks=2)
    for i, chunk in enumerate(cp_chunk_ids(rank, world)):
        indices_equal &= torch.equal(got_idx[:, i], want_idx[:, chunk])
    single = _lighthouse(args, chunks=2 * world)
    # float32 reference from the same (rounded) inputs: same selection, only the arithmetic differs
    same = [split_for_cp(x, rank, world) for x in _fwd_bwd(single, *(x.to(device, dtype) for x in full))]
    exact = [split_for_cp(x, rank, world) for x in _fwd_bwd(single, *(x.to(device, dtype).float() for x in full))]
    got = _fwd_bwd(_lighthouse(args, cp_group=group), *local)
    rows += _compare(f"lighthouse N={n}", got, same, exact, low)
    del full, local, same, exact, got

    n = args.check_dense_seq_len
    full = [x.transpose(1, 2) for x in _inputs(args, n, seed=2)]  # [B, H, n, D]
    dense = _dense(None, args.head_dim**-0.5)
    local = [split_for_cp(x, rank, world, seq_dim=2).to(device, dtype) for x in full]
    same = [split_for_cp(x, rank, world, 2) for x in _fwd_bwd(dense, *(x.to(device, dtype) for x in full))]
    exact = [split_for_cp(x, rank, world, 2) for x in _fwd_bwd(dense, *(x.to(device, dtype).float() for x in full))]
    got = _fwd_bwd(_dense(group, args.head_dim**-0.5), *local)
    rows += _compare(f"dense N={n}", got, same, exact, low)

    flag = torch.tensor([int(indices_equal)], device=device if dist.get_backend(group) != "gloo" else "cpu")
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    indices_equal = bool(flag.item())
    return dict(indices_equal=indices_equal, rows=rows, passed=indices_equal and all(r["passed"] for r in rows))


# ---------------------------------------------------------------------------------------------------- timing
def time_step(step: Callable[[], None], warmup: int, iters: int, device: torch.device) -> Dict:
    """Seconds per call of ``step`` (the slowest rank each iteration); peak memory (largest rank)."""
    times = []
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(warmup + iters):
        dist.barrier()
        _sync(device)
        start = time.perf_counter()
        step()
        _sync(device)
        elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64, device=device)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        if i >= warmup:
            times.append(elapsed.item())
    peak = torch.tensor(
        [torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0], dtype=torch.float64, device=device
    )
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    return dict(median_s=statistics.median(times), min_s=min(times), times_s=times, peak_gib=peak.item() / 2**30)


def run_timing(args: argparse.Namespace, group, device: torch.device, dtype: torch.dtype) -> Dict:
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    gen = torch.Generator(device=device).manual_seed(100 + rank)
    shape = (args.batch, args.seq_len // world, args.heads, args.head_dim)

    def randn(*size):
        return torch.randn(*size, generator=gen, device=device, dtype=dtype)

    results = {}
    q, k, v, dout = (randn(*shape) for _ in range(4))
    q, k, v = (x.requires_grad_(True) for x in (q, k, v))
    layer = _lighthouse(args, chunks=2 * args.max_cp) if world == 1 else _lighthouse(args, cp_group=group)

    def lighthouse_step():
        for x in (q, k, v):
            x.grad = None
        layer(q, k, v).backward(dout)

    results["lighthouse"] = time_step(lighthouse_step, args.warmup, args.iters, device)
    del q, k, v, dout
    if not args.no_dense:
        q, k, v, dout = (randn(*shape).transpose(1, 2).contiguous() for _ in range(4))  # [B, H, S/W, D]
        q, k, v = (x.requires_grad_(True) for x in (q, k, v))
        dense = _dense(group if world > 1 else None, args.head_dim**-0.5)

        def dense_step():
            for x in (q, k, v):
                x.grad = None
            dense(q, k, v).backward(dout)

        try:
            results["dense"] = time_step(dense_step, args.dense_warmup, args.dense_iters, device)
        except torch.cuda.OutOfMemoryError as err:
            results["dense"] = dict(error=f"out of memory: {err}".splitlines()[0])
        del q, k, v, dout
    return results


def kernel_choices(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> Dict[str, str]:
    """SDPA's kernel for square causal attention on one CP chunk (the block the CP attention runs), per method."""
    cfg = LighthouseConfig(levels=args.levels, pooling_factor=args.pooling_factor, topk=args.topk)
    chunks = 2 * args.max_cp
    lengths = dict(lighthouse=cfg.subsequence_length(args.seq_len, chunks) // chunks, dense=args.seq_len // chunks)
    out = {}
    for method, n in lengths.items():
        x = torch.empty(args.batch, args.heads, n, args.head_dim, device=device, dtype=dtype, requires_grad=True)
        choice = torch._fused_sdp_choice(x, x, x, is_causal=True, scale=args.head_dim**-0.5)
        out[method] = f"{SDPBackend(choice).name} (cp blocks: {kernel_family(x, x, x, args.head_dim**-0.5)})"
    return out


# ---------------------------------------------------------------------------------------------------- report
def _load_baseline(record: Dict, baseline_path: str) -> Optional[Dict]:
    """The ``W = 1`` record of the same settings for a ``W > 1`` run (``None``: W = 1, or none written yet)."""
    if record["world"] == 1 or not os.path.exists(baseline_path):
        return None
    with open(baseline_path) as f:
        base = json.load(f)
    if base["settings"] != record["settings"] or base["world"] != 1:
        raise SystemExit(f"baseline {baseline_path} has other settings or W != 1: {base['settings']}")
    return dict(path=baseline_path, date=base["date"], device_name=base["device_name"], results=base["results"])


def _efficiency(record: Dict, base: Optional[Dict]) -> Dict[str, float]:
    """``t1 / (W * tW)`` per method against the ``W = 1`` baseline."""
    out = {}
    for method, res in record["results"].items():
        ref = {} if base is None else base["results"].get(method, {})
        if "median_s" in res and "median_s" in ref:
            out[method] = ref["median_s"] / (record["world"] * res["median_s"])
    return out


def print_report(record: Dict) -> None:
    if "check" in record:
        chk = record["check"]
        print(f"\nequality check (W={record['world']}, {record['settings']['dtype']}): indices equal: "
              f"{chk['indices_equal']}; passed: {chk['passed']}")
        print(f"{'case':<22}{'field':<7}{'cp vs single':>14}{'cp vs fp32':>12}{'single vs fp32':>16}  ok")
        for r in chk["rows"]:
            print(f"{r['case']:<22}{r['field']:<7}{r['cp_vs_single']:>14.2e}{r['cp_vs_fp32']:>12.2e}"
                  f"{r['single_vs_fp32']:>16.2e}  {'yes' if r['passed'] else 'NO'}")
    print(f"\nlighthouse backend: {record['lighthouse_backend']}; SDPA kernel for one causal chunk: "
          + "; ".join(f"{m}: {k}" for m, k in record["kernels"].items()))
    s = record["settings"]
    print(f"\nfwd+bwd of one attention layer: {s['seq_len']} tokens, B={s['batch']} H={s['heads']} D={s['head_dim']} "
          f"k={s['topk']} p={s['pooling_factor']} L={s['levels']} chunks={2 * s['max_cp']}, {s['dtype']}, "
          f"{record['device_name']}")
    print(f"{'method':<12}{'W':>3}{'median ms':>12}{'min ms':>10}{'peak GiB':>10}{'t1/(W*tW)':>11}")
    for method, res in record["results"].items():
        if "error" in res:
            print(f"{method:<12}{record['world']:>3}  {res['error']}")
            continue
        eff = record["efficiency"].get(method)
        print(f"{method:<12}{record['world']:>3}{res['median_s'] * 1e3:>12.1f}{res['min_s'] * 1e3:>10.1f}"
              f"{res['peak_gib']:>10.2f}{'' if eff is None else f'{eff:.1%}':>11}")
    dense, light = record["results"].get("dense", {}), record["results"]["lighthouse"]
    if "median_s" in dense:
        print(f"lighthouse speedup over dense at W={record['world']}: {dense['median_s'] / light['median_s']:.1f}x")


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    device_type = args.device
    if device_type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device (use --device cpu --tiny for a logic check)")
    if "RANK" not in os.environ:  # plain `python bench_cp.py`: a group of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29511")
    local_rank = int(os.environ["LOCAL_RANK"])
    if device_type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    group = dist.group.WORLD
    world, rank = dist.get_world_size(), dist.get_rank()
    if world not in (1, args.max_cp):
        raise SystemExit(f"world size {world}: run with 1 or --max-cp={args.max_cp} processes (same chunked work)")
    dtype = _DTYPES[args.dtype]
    LighthouseConfig(levels=args.levels, pooling_factor=args.pooling_factor, topk=args.topk).validate(
        args.seq_len, 2 * args.max_cp
    )

    record = dict(
        date=datetime.date.today().isoformat(),
        command=" ".join([os.path.basename(sys.executable), *sys.argv]),
        world=world,
        device_name=torch.cuda.get_device_name(device) if device_type == "cuda" else "cpu",
        torch=torch.__version__,
        settings=dict(seq_len=args.seq_len, batch=args.batch, heads=args.heads, head_dim=args.head_dim,
                      topk=args.topk, pooling_factor=args.pooling_factor, levels=args.levels, max_cp=args.max_cp,
                      dtype=args.dtype, backend=args.backend, device=device_type),
    )
    record["lighthouse_backend"] = resolve_backend(args.backend, torch.empty(0, device=device))
    record["kernels"] = kernel_choices(args, device, dtype)
    if world > 1 and not args.no_check:
        record["check"] = run_check(args, group, device, dtype)
    record["results"] = run_timing(args, group, device, dtype)
    baseline = args.baseline or os.path.join(args.out_dir, f"cp_{device_type}_w1.json")
    record["baseline"] = _load_baseline(record, baseline)
    record["efficiency"] = _efficiency(record, record["baseline"])
    if rank == 0:
        print_report(record)
        os.makedirs(args.out_dir, exist_ok=True)
        path = os.path.join(args.out_dir, f"cp_{device_type}_w{world}.json")
        with open(path, "w") as f:
            json.dump(record, f, indent=1)
        print(f"wrote {path}")
    dist.barrier()  # tear down together
    dist.destroy_process_group()
    return 0 if record.get("check", {}).get("passed", True) else 1


if __name__ == "__main__":
    code = main()
    # Leave without C++ static destructors: under torchrun, torch's teardown of a gloo rank occasionally aborts the
    # finished process at interpreter exit ("terminate called without an active exception", seen in CI runs on
    # 2026-11-23 and 2026-12-01, after the report was written), which torchrun reports as a failed rank.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
