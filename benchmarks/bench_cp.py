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

Prints a table; writes ``<out-dir>/cp_<device>_w<W>.json``. The ``W > 1`` run reads the ``W = 1`` JSON of the same
``--out-dir`` for the efficiency.

GPU (benchmarks/run_cp_gpu.sh runs both; uses the installed package, or PYTHONPATH=$PWD:$PWD/kernels as there):
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
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch.nn.attention import SDPBackend

from megatron_lighthouse import LighthouseConfig, cp_causal_attention, lighthouse_attention, select_indices
from megatron_lighthouse.attention import resolve_backend
from megatron_lighthouse.cp_layout import cp_chunk_ids, split_for_cp
from megatron_lighthouse.dense import sdpa_causal
from megatron_lighthouse.lower_right_attention import kernel_family

#: The integer flags and their defaults: ``--max-cp`` is the largest CP size compared (every run uses ``2 * max_cp``
#: chunks); ``--check-seq-len`` and ``--check-dense-seq-len`` are the tokens of the Lighthouse and dense checks.
_INTS = dict(max_cp=2, seq_len=1 << 20, batch=1, heads=8, head_dim=128, topk=2048, pooling_factor=4, levels=3,
             iters=5, warmup=2, dense_iters=2, dense_warmup=1, check_seq_len=1 << 16, check_dense_seq_len=1 << 14)
#: ``--tiny``: smallest settings valid for ``2 * max_cp`` chunks (each chunk: budget 128, 1024 tokens).
_TINY = dict(heads=2, head_dim=16, pooling_factor=2, levels=3, iters=2, warmup=1, dense_iters=1, dense_warmup=1)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cuda runs bf16, cpu fp32")
    p.add_argument("--tiny", action="store_true", help="tiny sizes for a logic check (CPU)")
    for name, default in _INTS.items():
        p.add_argument("--" + name.replace("_", "-"), type=int, default=default)
    p.add_argument("--backend", default="auto", help="lighthouse_attention backend")
    p.add_argument("--out-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = p.parse_args(argv)
    if args.tiny:
        n = 2048 * args.max_cp
        vars(args).update(_TINY, seq_len=n, check_seq_len=n, check_dense_seq_len=n, topk=256 * args.max_cp)
    args.dtype = "bf16" if args.device == "cuda" else "fp32"
    return args


# ---------------------------------------------------------------------------------------------------- helpers
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
    return lambda q, k, v: sdpa_causal(q, k, v, scale) if group is None else cp_causal_attention(q, k, v, scale, group)


# ---------------------------------------------------------------------------------------------------- check
def _check_case(name: str, single: Callable, cp: Callable, full: List[torch.Tensor], seq_dim: int, group,
                device: torch.device, dtype: torch.dtype) -> List[Dict]:
    """Errors of ``cp`` on this rank's shard of ``full`` (q, k, v, dout) against ``single`` on the whole sequence,
    in ``dtype`` and in float32 (from the same rounded inputs: same selection, only the arithmetic differs)."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    rounded = [x.to(device, dtype) for x in full]

    def shard(xs):
        return [split_for_cp(x, rank, world, seq_dim) for x in xs]

    same, exact = shard(_fwd_bwd(single, *rounded)), shard(_fwd_bwd(single, *(x.float() for x in rounded)))
    rows = []
    for field, g, s, e in zip(("out", "dq", "dk", "dv"), _fwd_bwd(cp, *shard(rounded)), same, exact):
        vs_same, vs_fp32, single_vs_fp32 = _global_rel_l2(g, s), _global_rel_l2(g, e), _global_rel_l2(s, e)
        # CP must equal the single-process run to the dtype's rounding and be no less accurate than it.
        low = dtype != torch.float32
        ok = (vs_same < 2e-2 and vs_fp32 <= 2 * single_vs_fp32 + 1e-3) if low else vs_same < 1e-5
        rows.append(dict(case=name, field=field, cp_vs_single=vs_same, cp_vs_fp32=vs_fp32,
                         single_vs_fp32=single_vs_fp32, passed=bool(ok)))
    return rows


def run_check(args: argparse.Namespace, group, device: torch.device, dtype: torch.dtype) -> Dict:
    """Indices, output and gradients of the CP run against the single-process chunked run; dense CP attention
    against SDPA."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    n, pyramid = args.check_seq_len, dict(levels=args.levels, pooling_factor=args.pooling_factor)
    full = _inputs(args, n, seed=1)
    want = select_indices(*(x.to(device, dtype) for x in full[:2]), **pyramid, topk=args.topk, chunks=2 * world)
    got = select_indices(*(split_for_cp(x, rank, world).to(device, dtype) for x in full[:2]), **pyramid,
                         topk=args.topk // world, chunks=2)
    indices_equal = all(torch.equal(got[:, i], want[:, c]) for i, c in enumerate(cp_chunk_ids(rank, world)))
    rows = _check_case(f"lighthouse N={n}", _lighthouse(args, chunks=2 * world), _lighthouse(args, cp_group=group),
                       full, 1, group, device, dtype)
    n, scale = args.check_dense_seq_len, args.head_dim**-0.5
    full = [x.transpose(1, 2) for x in _inputs(args, n, seed=2)]  # [B, H, n, D]
    rows += _check_case(f"dense N={n}", _dense(None, scale), _dense(group, scale), full, 2, group, device, dtype)

    flag = torch.tensor([int(indices_equal)], device=device if dist.get_backend(group) != "gloo" else "cpu")
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    indices_equal = bool(flag.item())
    return dict(indices_equal=indices_equal, rows=rows, passed=indices_equal and all(r["passed"] for r in rows))


# ---------------------------------------------------------------------------------------------------- timing
def time_step(step: Callable[[], None], warmup: int, iters: int, device: torch.device) -> Dict:
    """Seconds per call of ``step`` (the slowest rank each iteration); peak memory (largest rank)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None  # the current device: this rank's
    elapsed = []
    for _ in range(warmup + iters):
        dist.barrier()
        sync()
        start = time.perf_counter()
        step()
        sync()
        elapsed.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    stats = torch.tensor([*elapsed[warmup:], peak / 2**30], dtype=torch.float64, device=device)
    dist.all_reduce(stats, op=dist.ReduceOp.MAX)
    *times, peak_gib = stats.tolist()
    return dict(median_s=statistics.median(times), min_s=min(times), times_s=times, peak_gib=peak_gib)


def run_timing(args: argparse.Namespace, group, device: torch.device, dtype: torch.dtype) -> Dict:
    """Lighthouse (``[B, S/W, H, D]``) and dense (``[B, H, S/W, D]``) attention forward+backward on this rank's
    tokens; a method that runs out of memory is reported as such."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    gen = torch.Generator(device=device).manual_seed(100 + rank)
    shape = (args.batch, args.seq_len // world, args.heads, args.head_dim)
    methods = dict(
        lighthouse=(_lighthouse(args, chunks=2 * args.max_cp) if world == 1 else _lighthouse(args, cp_group=group),
                    1, args.warmup, args.iters),
        dense=(_dense(group if world > 1 else None, args.head_dim**-0.5), 2, args.dense_warmup, args.dense_iters))

    def timed(layer: Callable, seq_dim: int, warmup: int, iters: int) -> Dict:
        q, k, v, dout = (torch.randn(*shape, generator=gen, device=device, dtype=dtype).transpose(1, seq_dim)
                         .contiguous() for _ in range(4))
        q, k, v = (x.requires_grad_(True) for x in (q, k, v))

        def step():
            for x in (q, k, v):
                x.grad = None
            layer(q, k, v).backward(dout)

        try:
            return time_step(step, warmup, iters, device)
        except torch.cuda.OutOfMemoryError as err:
            return dict(error=f"out of memory: {err}".splitlines()[0])

    # one method's tensors are freed before the next one's are made
    return {method: timed(*spec) for method, spec in methods.items()}


def kernel_choices(args: argparse.Namespace, cfg: LighthouseConfig, device: torch.device,
                   dtype: torch.dtype) -> Dict[str, str]:
    """SDPA's kernel for square causal attention on one CP chunk (the block the CP attention runs), per method."""
    chunks = 2 * args.max_cp
    lengths = dict(lighthouse=cfg.subsequence_length(args.seq_len, chunks) // chunks, dense=args.seq_len // chunks)
    out = {}
    for method, n in lengths.items():
        x = torch.empty(args.batch, args.heads, n, args.head_dim, device=device, dtype=dtype, requires_grad=True)
        choice = torch._fused_sdp_choice(x, x, x, is_causal=True, scale=args.head_dim**-0.5)
        out[method] = f"{SDPBackend(choice).name} (cp blocks: {kernel_family(x, x, x, args.head_dim**-0.5)})"
    return out


# ---------------------------------------------------------------------------------------------------- report
def load_baseline(record: Dict, out_dir: str) -> Tuple[Optional[Dict], Dict[str, float]]:
    """The ``W = 1`` run of the same settings in ``out_dir`` and ``t1 / (W * tW)`` per method against it;
    ``(None, {})`` at ``W = 1`` or before the ``W = 1`` run wrote its JSON."""
    path = os.path.join(out_dir, f"cp_{record['settings']['device']}_w1.json")
    if record["world"] == 1 or not os.path.exists(path):
        return None, {}
    with open(path) as f:
        base = json.load(f)
    if base["settings"] != record["settings"]:
        raise SystemExit(f"baseline {path} has other settings: {base['settings']}")
    t1 = {method: res["median_s"] for method, res in base["results"].items() if "median_s" in res}
    efficiency = {method: t1[method] / (record["world"] * res["median_s"])
                  for method, res in record["results"].items() if "median_s" in res and method in t1}
    return dict(path=path, date=base["date"], device_name=base["device_name"], results=base["results"]), efficiency


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
    dense, light = record["results"]["dense"], record["results"]["lighthouse"]
    if "median_s" in dense and "median_s" in light:
        print(f"lighthouse speedup over dense at W={record['world']}: {dense['median_s'] / light['median_s']:.1f}x")


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device (use --device cpu --tiny for a logic check)")
    if "RANK" not in os.environ:  # plain `python bench_cp.py`: a group of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29511")
    if args.device == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    group = dist.group.WORLD
    world, rank = dist.get_world_size(), dist.get_rank()
    if world not in (1, args.max_cp):
        raise SystemExit(f"world size {world}: run with 1 or --max-cp={args.max_cp} processes (same chunked work)")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    cfg = LighthouseConfig(levels=args.levels, pooling_factor=args.pooling_factor, topk=args.topk)
    cfg.validate(args.seq_len, 2 * args.max_cp)

    record = dict(
        date=datetime.date.today().isoformat(), command=" ".join([os.path.basename(sys.executable), *sys.argv]),
        world=world, device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        torch=torch.__version__,
        settings=dict(seq_len=args.seq_len, batch=args.batch, heads=args.heads, head_dim=args.head_dim,
                      topk=args.topk, pooling_factor=args.pooling_factor, levels=args.levels, max_cp=args.max_cp,
                      dtype=args.dtype, backend=args.backend, device=args.device),
    )
    record["lighthouse_backend"] = resolve_backend(args.backend, torch.empty(0, device=device))
    record["kernels"] = kernel_choices(args, cfg, device, dtype)
    if world > 1:
        record["check"] = run_check(args, group, device, dtype)
    record["results"] = run_timing(args, group, device, dtype)
    record["baseline"], record["efficiency"] = load_baseline(record, args.out_dir)
    if rank == 0:
        print_report(record)
        os.makedirs(args.out_dir, exist_ok=True)
        path = os.path.join(args.out_dir, f"cp_{args.device}_w{world}.json")
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
