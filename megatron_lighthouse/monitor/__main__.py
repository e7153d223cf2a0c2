"""Command line: ``python -m megatron_lighthouse.monitor {report,live}``.

``report RUN.jsonl [--out IMAGE]``: per-rank timeline image (default: a PNG next to the log) and a text table.
``live [--interval S] [--count N] [--fake N]``: a refreshing table of every GPU of this node.

A failure is one line on stderr, ``error: ...``, and exit code 2 (no traceback).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Any, Callable, List, Optional

from .backend import BackendUnavailable, NVMLBackend
from .config import MAX_INTERVAL_S
from .fake import FakeGPU, FakeNVMLBackend
from .live import run_live
from .report import LogFormatError, format_table, load_run, render_timeline

#: Exit code of every failure of the command line (as argparse uses for bad arguments).
EXIT_ERROR = 2
#: Most fake GPUs ``live --fake`` shows (more than any node holds).
MAX_FAKE_GPUS = 64
#: What ``report --out`` may end in: the image format the timeline is written in.
IMAGE_EXTENSIONS = (".png", ".pdf", ".svg")
#: ``--help`` of the command and of ``live`` (the module docstring is reST, for the docs).
DESCRIPTION = ("GPU monitor tools: 'report' draws the per-rank timeline and table of a run from its JSONL log, 'live' "
               "shows every GPU of this node. A failure is one line on stderr, error: ..., and exit code 2.")
LIVE_DESCRIPTION = ("A table of every GPU of this node, refreshed every --interval seconds. util% is the share of time "
                    "the GPU ran kernels; mem busy% the share of time its memory was read or written (NVML's memory "
                    "utilization), not how full it is: that is mem GiB, used/total.")


def _error(message: str) -> int:
    """Print ``error: message`` on stderr and return :data:`EXIT_ERROR`."""
    print(f"error: {message}", file=sys.stderr)
    return EXIT_ERROR


def _report(args: argparse.Namespace) -> int:
    if args.out is not None and os.path.splitext(args.out)[1].lower() not in IMAGE_EXTENSIONS:
        return _error(f"--out {args.out}: must end in {', '.join(IMAGE_EXTENSIONS)} (the image format to write)")
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
        return _error(f"{out}: cannot write the timeline image ({exc.strerror or exc})")
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


def _bounded(kind: type, low: float, strict: bool, high: Optional[float] = None) -> Callable[[str], Any]:
    """An argparse ``type``: ``kind(text)``, rejected unless finite, ``> low`` (``strict``) or ``>= low``, and
    ``<= high`` when given."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text}: must be {'an integer' if kind is int else 'a number'}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text}: must be a finite number")
        if not (value > low if strict else value >= low):
            raise argparse.ArgumentTypeError(f"{text}: must be {'>' if strict else '>='} {low}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"{text}: must be <= {high:g}")
        return value

    return parse


class _Parser(argparse.ArgumentParser):
    """argparse's errors (a bad value, an unknown flag) as one ``error:`` line, exit 2 (its subcommands too)."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message} (--help lists the flags)\n")


def main(argv: Optional[List[str]] = None) -> int:
    parser = _Parser(prog="python -m megatron_lighthouse.monitor", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True)
    report = sub.add_parser("report", help="timeline image and per-rank table of a monitor JSONL log")
    report.add_argument("run", help="the monitor's JSONL log (gpu_monitor.jsonl)")
    report.add_argument("--out", help=f"timeline image, its name ending in {', '.join(IMAGE_EXTENSIONS)}: the format "
                                      "it is written in (default: the log's path with .png)")
    report.set_defaults(func=_report)
    live = sub.add_parser("live", help="refreshing per-GPU table of this node", description=LIVE_DESCRIPTION)
    live.add_argument("--interval", type=_bounded(float, 0, strict=True, high=MAX_INTERVAL_S), default=1.0,
                      help=f"seconds between refreshes, > 0 and <= {MAX_INTERVAL_S:g} (default: 1)")
    live.add_argument("--count", type=_bounded(int, 1, strict=False), default=None,
                      help="stop after this many tables, >= 1 (default: never)")
    live.add_argument("--fake", type=_bounded(int, 1, strict=False, high=MAX_FAKE_GPUS), default=None, metavar="N",
                      help=f"show N fake GPUs, 1 to {MAX_FAKE_GPUS}, instead of reading NVML (a demo without GPUs)")
    live.set_defaults(func=_live)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
