"""Command line: ``python -m megatron_lighthouse.monitor {report,live}``.

``report RUN.jsonl [--out PNG]``: per-rank timeline PNG (default: next to the log) and a text table.
``live [--interval S] [--count N]``: a refreshing table of every GPU of this node.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

from .backend import BackendUnavailable, NVMLBackend
from .fake import FakeGPU, FakeNVMLBackend
from .live import run_live
from .report import format_table, load_run, render_timeline


def _report(args: argparse.Namespace) -> int:
    run = load_run(args.run)
    if not run.intervals:
        print(f"{args.run}: no interval records", file=sys.stderr)
        return 1
    out = args.out or os.path.splitext(args.run)[0] + ".png"
    render_timeline(run, out)
    print(format_table(run))
    print(f"\n{len(run.ranks)} ranks, {len(run.intervals)} intervals -> {out}")
    return 0


def _live(args: argparse.Namespace) -> int:
    backend = FakeNVMLBackend([FakeGPU(wobble=10.0)] * args.fake) if args.fake else NVMLBackend()
    try:
        backend.init()
    except BackendUnavailable as exc:
        print(f"NVML unavailable: {exc}", file=sys.stderr)
        return 1
    try:
        run_live(backend, sys.stdout, interval_s=args.interval, count=args.count)
    except KeyboardInterrupt:
        pass
    finally:
        backend.shutdown()
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megatron_lighthouse.monitor", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    report = sub.add_parser("report", help="timeline PNG and per-rank table of a monitor JSONL log")
    report.add_argument("run", help="the monitor's JSONL log (gpu_monitor.jsonl)")
    report.add_argument("--out", help="PNG path (default: the log's path with .png)")
    report.set_defaults(func=_report)
    live = sub.add_parser("live", help="refreshing per-GPU table of this node")
    live.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes (default: 1)")
    live.add_argument("--count", type=int, default=None, help="stop after this many tables (default: never)")
    live.add_argument("--fake", type=int, default=0, metavar="N", help="show N fake GPUs (demo without NVML)")
    live.set_defaults(func=_live)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
