"""Lone-process step time of ``python -m megatron_lighthouse.demo``: dense against Lighthouse, the same flags (issue 7).

The quality runs (``bench_quality.py``) share one GPU between many processes, so their times are not speed
measurements. This script runs each variant alone, in this process, one after another (``--repeats`` rounds,
the variants alternating), and times the training steps the demo times itself (forward, backward, optimizer,
synchronized), leaving out the first ``--skip`` steps of each run (compilation, allocator warm-up) and the
evaluations. The first variant is the baseline.

Prints a table (median step ms, tokens/s, time against the baseline); writes ``<out-dir>/demo_step.json``.

GPU (one H200; docs/BENCHMARKS.md, "The demo's step, alone on the GPU")::

    python3 benchmarks/bench_demo_step.py --out-dir $OUT/step --steps 120 --repeats 2 \\
        --variant "dense=--mode dense" \\
        --variant "lighthouse=--mode lighthouse --rope entries" -- \\
        --device cuda --seq-len 16384 --levels 3 --pooling-factor 4 --topk 256 --layers 6 --hidden 256 \\
        --heads 4 --ffn 768 --dense-layers 0,1,-2,-1 --batch-size 2 --corpus-bytes 40000000
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import statistics
import sys
from typing import Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from megatron_lighthouse.demo.__main__ import parse_args as parse_demo_args  # noqa: E402
from megatron_lighthouse.demo.train import run_demo  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_quality import demo_wrapper_parser, parse_variants  # noqa: E402

#: Flags this script sets on every run (no checkpoints; one evaluation, at the end, outside the timed steps).
FIXED_FLAGS = ("--no-save", "--log-every", "1000000", "--eval-every", "1000000", "--eval-batches", "1")


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p, own, shared = demo_wrapper_parser(__doc__, argv)
    p.add_argument("--variant", action="append", required=True, help="NAME=DEMO FLAGS; repeatable; first = baseline")
    p.add_argument("--steps", type=int, default=120, help="training steps per run")
    p.add_argument("--skip", type=int, default=20, help="first steps of each run left out of the median")
    p.add_argument("--repeats", type=int, default=2, help="rounds over the variants")
    args = p.parse_args(own)
    if args.skip < 0 or args.steps - args.skip < 5:
        raise SystemExit(f"--steps {args.steps} / --skip {args.skip}: need skip >= 0 and at least 5 timed steps")
    if args.repeats < 1:
        raise SystemExit(f"--repeats {args.repeats}: must be at least 1")
    args.variants = parse_variants(args.variant, shared,
                                   ("--steps", "--out", "--resume", *(f for f in FIXED_FLAGS if f.startswith("--"))))
    args.shared = shared
    return args


def step_seconds(train: List[Dict], skip: int) -> List[float]:
    """The timed steps' seconds from the demo's per-step records (``{step, seconds, ...}``), the first ``skip``
    steps left out."""
    return [t["seconds"] for t in train if t["step"] >= skip]


def summarize(runs: List[Dict], names: List[str]) -> List[Dict]:
    """One row per variant: the median over all its runs' timed steps, tokens/s, and time against ``names[0]``."""
    rows = []
    for name in names:
        mine = [r for r in runs if r["variant"] == name]
        seconds = statistics.median(s for r in mine for s in r["step_seconds"])
        tokens = mine[0]["tokens_per_step"]
        rows.append(dict(variant=name, runs=len(mine), tokens_per_step=tokens, median_step_ms=1e3 * seconds,
                         tokens_per_s=tokens / seconds,
                         per_run_median_ms=[1e3 * statistics.median(r["step_seconds"]) for r in mine]))
    for row in rows:
        row["vs_baseline"] = row["median_step_ms"] / rows[0]["median_step_ms"]
    return rows


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    log = logging.getLogger(__name__)
    os.makedirs(args.out_dir, exist_ok=True)
    runs: List[Dict] = []
    for repeat in range(args.repeats):
        for name, flags in args.variants:
            cfg = parse_demo_args([*args.shared, *flags, *FIXED_FLAGS, "--steps", str(args.steps)])
            log.info("round %d/%d: %s", repeat + 1, args.repeats, name)
            metrics = run_demo(cfg)
            runs.append(dict(variant=name, repeat=repeat, flags=flags, tokens_per_step=cfg.batch_size * cfg.seq_len,
                             step_seconds=step_seconds(metrics["train"], args.skip)))
    rows = summarize(runs, [name for name, _ in args.variants])
    device = torch.cuda.get_device_name() if torch.device(cfg.device).type == "cuda" else "cpu"
    report = dict(date=datetime.date.today().isoformat(), device=device, torch=torch.__version__,
                  shared=args.shared, steps=args.steps, skip=args.skip, repeats=args.repeats, rows=rows, runs=runs)
    with open(os.path.join(args.out_dir, "demo_step.json"), "w") as f:
        json.dump(report, f, indent=1)
    print(f"\n{device}, {args.steps} steps per run, first {args.skip} left out, {args.repeats} rounds")
    print(f"{'variant':<24} {'tokens/step':>11} {'median step ms':>15} {'per run':>22} {'tokens/s':>10} {'vs first':>9}")
    for row in rows:
        per_run = " ".join(f"{ms:.1f}" for ms in row["per_run_median_ms"])
        print(f"{row['variant']:<24} {row['tokens_per_step']:>11} {row['median_step_ms']:>15.2f} {per_run:>22} "
              f"{row['tokens_per_s']:>10.0f} {row['vs_baseline']:>8.3f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
