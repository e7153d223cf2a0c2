"""Overhead of the GPU monitor under a matmul load, on every visible GPU (one process per GPU).

Measures, per rank:
  * the cost of one NVML sample (all metrics) and of each metric query, idle and under load;
  * the mean step time of a matmul loop with the monitor off, on (``--interval``, default 1 s) and
    stressed (``--stress-interval``, default 10 ms), phases interleaved ``--repeats`` times;
  * the cost of an aggregation (one all_gather; the writing runs on the monitor's writer thread) at each
    log interval;
  * with more than one rank, a final phase where the last rank's steps take 50 % longer: is it named?

Writes to ``--out``: ``run.jsonl`` (the monitor's log), ``tb/`` (TensorBoard, when tensorboard is
installed), ``report.png`` and ``report.txt`` (the ``report`` command's output) and ``summary.json``; prints
a table.

GPU:  python3 benchmarks/bench_monitor.py --out benchmarks/results/monitor
CPU (logic check with the fake NVML backend; also chosen automatically without CUDA):
      python benchmarks/bench_monitor.py --fake --out /tmp/monitor_fake
Needs torch and this package only (no megatron-core; tensorboard optional).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatron_lighthouse.monitor import (DeviceReader, FakeGPU, FakeNVMLBackend, GPUMonitor, MetricUnsupported,
                                         MonitorConfig, NVMLBackend)
from megatron_lighthouse.monitor.backend import METRICS, resolve_nvml_index, torch_uuid
from megatron_lighthouse.monitor.report import format_table, load_run, render_timeline
from megatron_lighthouse.monitor.writers import ConsoleWriter, JSONLWriter, TensorBoardWriter, summary_writer_class

PHASES = ("off", "on", "stress")


def call_cost(call: Callable[[], Any], repeats: int) -> Dict[str, float]:
    """Microseconds per call of ``call`` over ``repeats`` calls: mean, median and 99th percentile."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1e6)
    ordered = sorted(times)
    p50, p99 = (ordered[min(repeats - 1, int(round(q * (repeats - 1))))] for q in (0.5, 0.99))
    return {"mean": statistics.fmean(times), "p50": p50, "p99": p99, "n": repeats}


def metric_costs(backend: Any, index: int, repeats: int) -> Dict[str, Any]:
    """Microseconds per query of each metric; ``"unsupported"`` or the error where it does not answer."""
    out: Dict[str, Any] = {}
    for metric in METRICS:
        query = getattr(backend, metric)
        try:
            query(index)
        except MetricUnsupported:
            out[metric] = "unsupported"
        except Exception as exc:  # noqa: BLE001 - report, do not stop the benchmark
            out[metric] = repr(exc)
        else:
            out[metric] = call_cost(functools.partial(query, index), repeats)["mean"]
    return out


def matmul_load(device: torch.device, size: int, inner: int) -> Callable[[], None]:
    """One step = ``inner`` square matmuls, then a device sync (like a training step reading its loss)."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = (torch.randn(size, size, generator=gen).to(device, dtype) for _ in range(2))

    def step() -> None:
        c = a
        for _ in range(inner):
            c = torch.matmul(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        else:
            c.sum().item()

    return step


def run_phase(load: Callable[[], None], steps: int, monitor: GPUMonitor | None, first_it: int, slowdown: float = 0.0):
    """Run ``steps`` steps, each stretched by ``slowdown`` times its compute time (sleeping); return wall
    seconds, per-step seconds, seconds spent in aggregating calls and the records those calls returned."""
    step_times, log_times, records = [], [], []
    start = time.perf_counter()
    for i in range(steps):
        t0 = time.perf_counter()
        load()
        if slowdown:
            time.sleep(slowdown * (time.perf_counter() - t0))
        t1 = time.perf_counter()
        step_times.append(t1 - t0)
        if monitor is not None:
            record = monitor.step(first_it + i, step_time=t1 - t0)
            if record is not None:
                log_times.append(time.perf_counter() - t1)
                records.append(record)
    return time.perf_counter() - start, step_times, log_times, records


def rank_main(rank: int, world: int, args: argparse.Namespace, store: str) -> None:
    logging.basicConfig(level=logging.INFO, format=f"[rank {rank}] %(levelname)s %(message)s")
    if args.fake:
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
        device = torch.device("cpu")
    else:
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
    backend_name = "none" if world == 1 else "gloo" if args.fake else "nccl"
    if world > 1:
        dist.init_process_group(backend_name, init_method=f"file://{store}", rank=rank, world_size=world)

    gpus = [FakeGPU(gpu_util=88 + 2 * r, power_w=450 + 10 * r, wobble=6.0) for r in range(world)]
    make_backend = functools.partial(FakeNVMLBackend, gpus) if args.fake else NVMLBackend
    probe = make_backend()
    probe.init()  # a benchmark of the real backend must not silently fall back to the no-op path
    gpu_index = resolve_nvml_index(probe, rank)
    reader = DeviceReader(probe, gpu_index)
    result: Dict[str, Any] = dict(
        rank=rank, host=socket.gethostname(), local_gpu=rank, gpu_index=gpu_index,
        gpu_name=probe.device_name(gpu_index), nvml_uuid=probe.device_uuid(gpu_index),
        torch_uuid=torch_uuid(rank),  # the same GPU as nvml_uuid when the index mapping is right
        sample_cost_idle_us=call_cost(reader.read, args.cost_repeats),  # one full sample: every metric
        metric_cost_idle_us=metric_costs(probe, gpu_index, args.cost_repeats))

    load = matmul_load(device, args.size, args.inner)
    warm_end = time.perf_counter() + args.warmup
    run_phase(load, 3, None, 0)  # at least three steps, then until warm_end
    while time.perf_counter() < warm_end:
        load()
    step_s = torch.tensor([run_phase(load, 10, None, 0)[0] / 10], dtype=torch.float64, device=device)
    if world > 1:
        dist.all_reduce(step_s, op=dist.ReduceOp.MIN)  # the same on every rank
    step_s = step_s.item()
    steps = max(10, int(args.seconds / step_s))
    log_interval = max(1, min(int(2.0 / step_s), steps // 4))  # a log every ~2 s
    probe.shutdown()

    # One monitor per monitored phase (a monitor's writers close with it); rank 0 appends to one log.
    shared_tb = None
    if rank == 0:
        try:
            shared_tb = summary_writer_class()(os.path.join(args.out, "tb"))
        except ImportError as exc:
            logging.warning("no TensorBoard output: %s", exc)

    def monitor_for(phase: str) -> GPUMonitor:
        interval = args.interval if phase == "on" else args.stress_interval
        config = MonitorConfig(interval_s=interval, log_interval=log_interval, wandb=False)
        writers = []
        if rank == 0 and phase == "on":
            writers = [JSONLWriter(os.path.join(args.out, "run.jsonl")), ConsoleWriter()]
            if shared_tb is not None:
                writers.append(TensorBoardWriter(writer=shared_tb))
        monitor = GPUMonitor(config, backend=make_backend(), device=rank, writers=writers).start()
        if monitor.sampler is None:
            raise RuntimeError(f"rank {rank}: the monitor did not start sampling")
        return monitor

    iteration = {"on": 1, "stress": 1}
    wall: Dict[str, List[float]] = {p: [] for p in PHASES}
    median_step: Dict[str, List[float]] = {p: [] for p in PHASES}
    log_ms: Dict[str, List[float]] = {"on": [], "stress": []}
    in_situ: Dict[str, List[float]] = {"on": [0.0, 0], "stress": [0.0, 0]}
    for _ in range(args.repeats):
        for phase in PHASES:
            monitor = None if phase == "off" else monitor_for(phase)
            seconds, step_times, log_times, _ = run_phase(load, steps, monitor, iteration.get(phase, 0))
            if monitor is not None:
                in_situ[phase][0] += monitor.sampler.seconds_sampling
                in_situ[phase][1] += monitor.sampler.samples_taken
                monitor.stop()
                iteration[phase] += steps
                log_ms[phase] += [1e3 * t for t in log_times]
            wall[phase].append(seconds / steps)
            median_step[phase].append(statistics.median(step_times))

    straggler: Dict[str, Any] = {"injected_rank": None}
    if world > 1:
        slow = world - 1
        monitor = monitor_for("on")
        first = (iteration["on"] // log_interval + 1) * log_interval + 1  # two whole log intervals
        slowdown = args.straggler_slowdown if rank == slow else 0.0
        records = run_phase(load, 2 * log_interval, monitor, first, slowdown=slowdown)[3]
        monitor.stop()
        flags = [s for r in records for s in r["stragglers"]]
        named = [s for s in flags if s["rank"] == slow and s["reason"] == "step_time"]
        straggler = {"injected_rank": slow, "slowdown": args.straggler_slowdown,
                     "named_in": f"{len(named)}/{len(records)} intervals", "named": len(named) == len(records) > 0,
                     "where": named[0]["where"] if named else None, "flags": flags}
    if shared_tb is not None:
        shared_tb.close()

    off = statistics.fmean(wall["off"])
    result.update(
        steps_per_phase=steps, log_interval=log_interval, step_s=wall, median_step_s=median_step,
        overhead_pct={p: 100.0 * (statistics.fmean(wall[p]) / off - 1.0) for p in ("on", "stress")},
        off_spread_pct=100.0 * (max(wall["off"]) - min(wall["off"])) / off,
        sample_cost_in_loop_us={p: 1e6 * s / max(n, 1) for p, (s, n) in in_situ.items()},
        samples_taken={p: n for p, (_, n) in in_situ.items()},
        aggregation_ms={p: (statistics.fmean(v) if v else None) for p, v in log_ms.items()}, straggler=straggler)
    results = [result]
    if world > 1:
        results = [None] * world
        dist.all_gather_object(results, result)
        dist.destroy_process_group()
    if rank == 0:
        write_outputs(args, results, backend_name, device)


def write_outputs(args: argparse.Namespace, results: List[Dict[str, Any]], dist_backend: str, device: torch.device):
    run = load_run(os.path.join(args.out, "run.jsonl"))
    render_timeline(run, os.path.join(args.out, "report.png"))
    table = format_table(run)
    with open(os.path.join(args.out, "report.txt"), "w") as f:
        f.write(table + "\n")
    summary = dict(
        benchmark="bench_monitor", date=time.strftime("%Y-%m-%d %H:%M:%S"), command=" ".join(sys.argv),
        fake=args.fake, device=device.type, torch=torch.__version__, world_size=len(results), dist_backend=dist_backend,
        load={"size": args.size, "inner": args.inner, "dtype": "bf16" if device.type == "cuda" else "fp32"},
        interval_s=args.interval, stress_interval_s=args.stress_interval, repeats=args.repeats,
        tensorboard=os.path.isdir(os.path.join(args.out, "tb")),  # main() removed any earlier tb/
        worst_overhead_pct={p: max(r["overhead_pct"][p] for r in results) for p in ("on", "stress")}, ranks=results)
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)

    print(f"\nGPU monitor overhead ({len(results)} rank(s), {summary['load']['dtype']} {args.size}^2 matmul x "
          f"{args.inner}/step, {args.repeats} repeats; fake={args.fake})")
    head = ("rank", "gpu", "sample us p50/p99", "in-loop us", "off ms", "on ms", "on %", "stress ms", "stress %",
            "spread %", "agg ms")
    rows = [head]
    for r in results:
        ms = {p: 1e3 * statistics.fmean(r["step_s"][p]) for p in PHASES}
        cost = r["sample_cost_idle_us"]
        agg = r["aggregation_ms"]["on"]
        rows.append((str(r["rank"]), r["gpu_name"][:24], f"{cost['p50']:.0f}/{cost['p99']:.0f}",
                     f"{r['sample_cost_in_loop_us']['stress']:.0f}", f"{ms['off']:.3f}", f"{ms['on']:.3f}",
                     f"{r['overhead_pct']['on']:+.2f}", f"{ms['stress']:.3f}", f"{r['overhead_pct']['stress']:+.2f}",
                     f"{r['off_spread_pct']:.2f}", "-" if agg is None else f"{agg:.2f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    for row in rows:
        print("  ".join(cell.rjust(w) for cell, w in zip(row, widths)))
    print(f"sample us: one full sample with the GPU idle; in-loop us: the same inside the stressed loop; off/on/stress "
          f"ms: mean step with no monitor / sampling every {args.interval:g} s / every {args.stress_interval:g} s "
          f"(% vs off); spread %: max-min of the off repeats (noise); agg ms: one aggregation (gather + queueing "
          f"the record for the writer thread, including the wait for the slowest rank)")
    print("\nper-metric query cost, rank 0 (us):",
          ", ".join(f"{m}={v:.1f}" if isinstance(v, float) else f"{m}={v}"
                    for m, v in results[0]["metric_cost_idle_us"].items()))
    strag = results[0]["straggler"]
    if strag["injected_rank"] is not None:
        print(f"straggler: rank {strag['injected_rank']} slowed by {100 * strag['slowdown']:.0f}% -> named in "
              f"{strag['named_in']} ({strag['where']})")
    print("\nper-rank table of the run log:\n" + table)
    tb = ", tb/" if summary["tensorboard"] else " (no tb/: tensorboard is not installed)"
    print(f"\nwrote {args.out}/summary.json, run.jsonl, report.png, report.txt{tb}")


#: The flags: name -> (type, default, help); ``None``: a default that differs on a GPU and with --fake (main()).
_FLAGS = {
    "--out": (str, "benchmarks/results/monitor", "output directory"),
    "--world-size": (int, None, "processes (default: every visible GPU; 2 with --fake)"),
    "--size": (int, None, "matmul size (default: 8192 GPU, 256 CPU)"),
    "--inner": (int, 8, "matmuls per step (default: 8)"),
    "--seconds": (float, None, "seconds per phase (default: 8 GPU, 1.5 CPU)"),
    "--repeats": (int, 3, "off/on/stress rounds (default: 3)"),
    "--warmup": (float, None, "warm-up seconds (default: 5 GPU, 0.5 CPU)"),
    "--interval": (float, 1.0, "sampling interval of 'on' (default: 1 s)"),
    "--stress-interval": (float, 0.01, "sampling interval of 'stress' (default: 0.01 s)"),
    "--cost-repeats": (int, 200, "samples timed for the per-sample cost (default: 200)"),
    "--straggler-slowdown": (float, 0.5, "the injected straggler's steps take this much longer (default: 0.5 = +50%%)"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fake", action="store_true", help="fake NVML backend and a CPU load (no GPU needed)")
    for flag, (kind, default, text) in _FLAGS.items():
        parser.add_argument(flag, type=kind, default=default, help=text)
    args = parser.parse_args()

    if not args.fake and not torch.cuda.is_available():
        print("no CUDA device: running with --fake (fake NVML backend, CPU load)")
        args.fake = True
    gpu = not args.fake
    args.size = args.size or (8192 if gpu else 256)
    args.seconds = args.seconds or (8.0 if gpu else 1.5)
    args.warmup = args.warmup if args.warmup is not None else (5.0 if gpu else 0.5)
    world = args.world_size or (torch.cuda.device_count() if gpu else 2)
    if gpu and world > torch.cuda.device_count():
        parser.error(f"--world-size={world}: only {torch.cuda.device_count()} GPU(s) visible")
    os.makedirs(args.out, exist_ok=True)
    # the log and the event files append: start each benchmark run on fresh ones
    if os.path.exists(os.path.join(args.out, "run.jsonl")):
        os.remove(os.path.join(args.out, "run.jsonl"))
    shutil.rmtree(os.path.join(args.out, "tb"), ignore_errors=True)
    # NVLink multicast stays off (shared hosts); the monitor's collective does not need it.
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        if world == 1:
            rank_main(0, 1, args, store)
        else:
            mp.spawn(rank_main, args=(world, args, store), nprocs=world, join=True)


if __name__ == "__main__":
    main()
