"""Command line: ``python -m megatron_lighthouse.monitor {report,live}``.

``report RUN.jsonl [--out PNG]``: per-rank timeline PNG (default: next to the log) and a text table.
``live [--interval S] [--count N] [--fake N]``: a refreshing table of every GPU of this node.

A failure is one line on stderr, ``error: ...``, and exit code 2 (no traceback).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Callable, List, Optional

from .backend import BackendUnavailable, NVMLBackend
from .fake import FakeGPU, FakeNVMLBackend
from .live import run_live
from .report import LogFormatError, format_table, load_run, render_timeline

#: Exit code of every failure of the command line (as argparse uses for bad arguments).
EXIT_ERROR = 2


def _error(message: str) -> int:
    """Print ``error: message`` on stderr and return :data:`EXIT_ERROR`."""
    print(f"error: {message}", file=sys.stderr)
    return EXIT_ERROR


def _report(args: argparse.Namespace) -> int:
    try:
        run = load_run(args.run)
    except OSError as exc:
        return _error(f"{args.run}: cannot read it ({exc.strerror or exc})")
    except LogFormatError as exc:
        return _error(str(exc))
    for number in run.skipped_lines:
        print(f"warning: {args.run}: line {number} is torn (a job killed while writing it?); skipped", file=sys.stderr)
    if not run.intervals:
        return _error(f"{args.run}: no interval records yet (the monitor writes one every log interval)")
    out = args.out or os.path.splitext(args.run)[0] + ".png"
    try:
        render_timeline(run, out)
    except OSError as exc:
        return _error(f"{out}: cannot write the timeline PNG ({exc.strerror or exc})")
    print(format_table(run))
    print(f"\n{len(run.ranks)} ranks, {len(run.intervals)} intervals -> {out}")
    return 0


def _live(args: argparse.Namespace) -> int:
    backend = FakeNVMLBackend([FakeGPU(wobble=10.0)] * args.fake) if args.fake else NVMLBackend()
    try:
        backend.init()
    except BackendUnavailable as exc:
        return _error(f"NVML unavailable ({exc}); add --fake N to show N fake GPUs instead")
    try:
        run_live(backend, sys.stdout, interval_s=args.interval, count=args.count)
    except KeyboardInterrupt:
        pass
    except Exception as exc:  # noqa: BLE001 - the driver can fail mid-run (a lost GPU): one line, not a traceback
        return _error(f"reading the GPUs failed: {exc!r}")
    finally:
        backend.shutdown()
    return 0


def _bounded(kind: type, low: float, strict: bool) -> Callable[[str], Any]:
    """An argparse ``type``: ``kind(text)``, rejected unless ``> low`` (``strict``) or ``>= low``."""

    def parse(text: str) -> Any:
        value = kind(text)
        if not (value > low if strict else value >= low):  # NaN fails both
            raise argparse.ArgumentTypeError(f"{text}: must be {'>' if strict else '>='} {low}")
        return value

    return parse


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megatron_lighthouse.monitor", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    report = sub.add_parser("report", help="timeline PNG and per-rank table of a monitor JSONL log")
    report.add_argument("run", help="the monitor's JSONL log (gpu_monitor.jsonl)")
    report.add_argument("--out", help="PNG path (default: the log's path with .png)")
    report.set_defaults(func=_report)
    live = sub.add_parser("live", help="refreshing per-GPU table of this node")
    live.add_argument("--interval", type=_bounded(float, 0, strict=True), default=1.0,
                      help="seconds between refreshes (default: 1)")
    live.add_argument("--count", type=_bounded(int, 1, strict=False), default=None,
                      help="stop after this many tables (default: never)")
    live.add_argument("--fake", type=_bounded(int, 0, strict=False), default=0, metavar="N",
                      help="show N fake GPUs (demo without NVML)")
    live.set_defaults(func=_live)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
