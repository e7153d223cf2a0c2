"""Quality of the two-stage recipe: the same model and token budget trained several ways, several seeds (issue 7).

Every run is ``python -m megatron_lighthouse.demo`` with the shared flags given after ``--``, a variant's own flags
and ``--seed``; validation loss is always measured with every layer dense. Variants are ``NAME=DEMO FLAGS``; the
default three are dense from scratch, Lighthouse then dense (the paper's recipe) and Lighthouse throughout. The
first variant is the baseline the others are compared with (each mean against its mean over the same seeds).

Prints a table (final validation loss per seed, mean, spread, change vs the baseline, wall time, tokens/s); writes
``<out-dir>/quality.json`` (rewritten after every run) and ``<out-dir>/quality.png`` (mean validation curve per
variant, switch marked), and each run's checkpoints and metrics under ``<out-dir>/<variant>_s<seed>/``.
``--processes N`` runs the seeds in N processes side by side (a small model leaves most of a GPU idle), each in
``<out-dir>/part<i>/`` with its log beside it, then merges them; their times are then those of a shared GPU.
``--merge A/quality.json B/quality.json ...`` makes the table, JSON and plot from earlier reports of the same
shared flags, running nothing.

GPU (one H200; docs/RESULTS.md, about 75 s per run with two processes)::

    python3 benchmarks/bench_quality.py --out-dir $OUT/quality --seeds 0 1 --processes 2 \\
        --variant "dense=--mode dense" --variant "two-stage=--mode two-stage --dense-layers 0,1,-2,-1" \\
        --variant "two-stage-37=--mode two-stage --dense-layers 0,1,-2,-1 --dense-fraction 0.375" -- \\
        --device cuda --seq-len 16384 --levels 3 --pooling-factor 4 --topk 256 --layers 6 --hidden 256 --heads 4 \\
        --ffn 768 --dense-layers 0,-1 --batch-size 2 --steps 1200 --eval-every 100 --eval-batches 16 \\
        --log-every 100 --corpus-bytes 40000000 --lr 2e-3 --warmup 60

More tokens than the standard library holds (docs/RESULTS.md, "Longer training"): the same with ``--seeds 0 1 2
--processes 3`` and, after ``--``, ``--steps 4800 --eval-every 400 --log-every 400 --corpus SITE_PACKAGES
--corpus-bytes 200000000``, ``SITE_PACKAGES`` being the directory that holds torch (about 180 MB of text there).
Then ``benchmarks/probe_repeats.py --run-dir <out-dir>/part*/*_s*`` splits each model's loss by repeated text.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import math
import os
import shlex
import statistics
import subprocess
import sys
from typing import Callable, Dict, List, Optional, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from megatron_lighthouse.demo.__main__ import parse_args as parse_demo_args  # noqa: E402
from megatron_lighthouse.demo.train import run_demo  # noqa: E402

DEFAULT_VARIANTS = ("dense=--mode dense", "two-stage=--mode two-stage", "lighthouse=--mode lighthouse")
#: The bar of issue 7: the two-stage model's final validation loss within 1% of (or below) dense from scratch.
BAR_PCT = 1.0


def parse_variant(text: str) -> Tuple[str, List[str]]:
    """``"NAME=FLAGS"`` -> ``(NAME, [flags])``; ``SystemExit`` naming the problem otherwise."""
    name, sep, flags = text.partition("=")
    if not sep or not name.strip() or "/" in name or name != name.strip():
        raise SystemExit(f"--variant {text!r}: must be NAME=DEMO FLAGS (a name without '/' or spaces around it)")
    return name, shlex.split(flags)


def demo_wrapper_parser(doc: str, argv: Optional[List[str]]) -> Tuple[argparse.ArgumentParser, List[str], List[str]]:
    """For a script that runs the demo with shared flags after ``--``: ``(parser with --out-dir, this script's own
    arguments, the shared demo flags)``; ``argv`` ``None`` reads ``sys.argv``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    shared = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=doc.split("\n")[0],
                                epilog="Flags after -- go to every run of python -m megatron_lighthouse.demo.")
    p.add_argument("--out-dir", required=True)
    return p, own, shared


def parse_variants(texts: List[str], shared: List[str], reserved: Tuple[str, ...],
                   hint: str = "") -> List[Tuple[str, List[str]]]:
    """``--variant`` texts -> ``[(NAME, [flags])]``; ``SystemExit`` for a repeated name or a ``reserved`` flag
    (one the script sets) in ``shared`` or a variant's flags, ``hint`` appended to that message."""
    variants = [parse_variant(v) for v in texts]
    names = [name for name, _ in variants]
    if len(set(names)) != len(names):
        raise SystemExit(f"--variant names must differ: {names}")
    for flag in reserved:
        if flag in shared or any(flag in flags for _, flags in variants):
            raise SystemExit(f"{flag}: set by this script{hint}")
    return variants


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p, own, shared = demo_wrapper_parser(__doc__, argv)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--variant", action="append", default=None, help="NAME=DEMO FLAGS; repeatable; first = baseline")
    p.add_argument("--processes", type=int, default=1, help="run the seeds in this many processes side by side")
    p.add_argument("--merge", nargs="+", metavar="QUALITY_JSON", default=None,
                   help="run nothing: report on the runs of these earlier quality.json files together")
    args = p.parse_args(own)
    if args.merge and (shared or args.variant):
        raise SystemExit("--merge: takes the runs, variants and flags from its files; give no --variant or -- flags")
    if args.merge and args.processes != 1:
        raise SystemExit("--processes: runs seeds, so not with --merge (which runs nothing)")
    if not 1 <= args.processes <= len(args.seeds):
        raise SystemExit(f"--processes {args.processes}: must be between 1 and the number of --seeds "
                         f"({len(args.seeds)})")
    args.variant_texts = list(args.variant or DEFAULT_VARIANTS)
    args.variants = parse_variants(args.variant_texts, shared, ("--seed", "--out", "--resume", "--no-save"),
                                   " (use --seeds / --out-dir)")
    args.shared = shared
    return args


def train_curve(train: List[Dict], evals: List[Dict]) -> List[Dict]:
    """Mean training loss over each interval between evaluations: ``[{step, loss}]``, ``step`` the evaluation's.

    ``train`` holds the demo's per-step ``{step, loss}`` (step 0 is the first), ``evals`` its ``{step, ...}``."""
    curve, start = [], 0
    for e in evals:
        losses = [t["loss"] for t in train if start <= t["step"] < e["step"]]
        if losses:
            curve.append(dict(step=e["step"], loss=statistics.fmean(losses)))
        start = e["step"]
    return curve


def run_all(args: argparse.Namespace, on_run: Callable[[List[Dict]], None]) -> List[Dict]:
    """Every variant for every seed; one record per run. ``on_run(records so far)`` after each run."""
    records: List[Dict] = []
    total = len(args.variants) * len(args.seeds)
    for name, flags in args.variants:
        for seed in args.seeds:
            out = os.path.join(args.out_dir, f"{name}_s{seed}")
            cfg = parse_demo_args([*args.shared, *flags, "--seed", str(seed), "--out", out])
            logging.getLogger(__name__).info("run %d/%d: %s seed %d", len(records) + 1, total, name, seed)
            metrics = run_demo(cfg)
            with open(os.path.join(out, "metrics.json"), "w") as f:
                json.dump(metrics, f, indent=1)
            seconds = sum(s["seconds"] for s in metrics["stages"])
            tokens = sum(s["tokens_per_s"] * s["seconds"] for s in metrics["stages"])
            records.append(dict(variant=name, seed=seed, flags=flags, final_val_loss=metrics["final_val_loss"],
                                train_seconds=seconds, tokens_per_s=tokens / seconds if seconds else 0.0,
                                switch_step=metrics["switch_step"], mode=metrics["config"]["mode"],
                                device=metrics["config"]["device"],
                                evals=metrics["evals"], stages=metrics["stages"],
                                train_curve=train_curve(metrics["train"], metrics["evals"])))
            on_run(records)
    return records


def run_in_processes(args: argparse.Namespace) -> Tuple[List[str], int]:
    """This script once per group of seeds (round robin over ``args.processes`` groups), all at once; returns the
    ``quality.json`` paths the processes wrote (finished runs only, for one that failed) and the first failing
    process's exit status (0: all passed)."""
    log = logging.getLogger(__name__)
    children = []
    for i in range(args.processes):
        part = os.path.join(args.out_dir, f"part{i}")
        seeds = [str(s) for s in args.seeds[i :: args.processes]]
        cmd = [sys.executable, os.path.abspath(__file__), "--out-dir", part, "--seeds", *seeds,
               *[x for v in args.variant_texts for x in ("--variant", v)], "--", *args.shared]
        with open(part + ".log", "w") as out:
            children.append((subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT), part))
        log.info("process %d: seeds %s, log %s.log", i, " ".join(seeds), part)
    status = 0
    for proc, part in children:
        code = proc.wait()
        log.info("%s: %s", part, "done" if code == 0 else f"failed with exit status {code}")
        if code:
            with open(part + ".log") as f:
                tail = f.readlines()[-5:]
            print(f"error: {part} failed (exit status {code}); the end of {part}.log:\n{''.join(tail)}",
                  file=sys.stderr, end="")
        status = status or code
    reports = [os.path.join(part, "quality.json") for _, part in children]
    return [r for r in reports if os.path.exists(r)], status


def merge_reports(paths: List[str]) -> Tuple[List[Dict], List[str], List[Dict]]:
    """The runs of several ``quality.json`` files: ``(records, variant names in first-seen order, the reports)``.

    ``SystemExit`` naming the file when the files' shared flags differ or a (variant, seed) run appears twice."""
    records: List[Dict] = []
    names: List[str] = []
    reports: List[Dict] = []
    for path in paths:
        with open(path) as f:
            report = json.load(f)
        reports.append(report)
        if report["shared_flags"] != reports[0]["shared_flags"]:
            raise SystemExit(f"--merge {path}: other shared flags than {paths[0]} "
                             f"({report['shared_flags']} vs {reports[0]['shared_flags']})")
        for run in report["runs"]:
            if any((r["variant"], r["seed"]) == (run["variant"], run["seed"]) for r in records):
                raise SystemExit(f"--merge {path}: run {run['variant']} seed {run['seed']} is already in an earlier "
                                 f"file")
            other = next((r["flags"] for r in records if r["variant"] == run["variant"]), run["flags"])
            if other != run["flags"]:
                raise SystemExit(f"--merge {path}: variant {run['variant']} has flags {run['flags']} here, "
                                 f"{other} in an earlier file")
            if run["variant"] not in names:
                names.append(run["variant"])
            records.append(run)
    return records, names, reports


def summarize(records: List[Dict], variants: List[str]) -> List[Dict]:
    """Per variant: seeds, losses by seed, mean, spread (max - min), and ``vs_baseline_pct``: the change (%) of its
    mean vs the first variant's mean over the same seeds (``None`` when the first variant lacks one of them);
    ``per_seed_pct``, each seed's change vs the first variant's run of that seed, and ``per_seed_stderr``, the
    standard error of their mean (``None`` below 2 seeds, or without the pairs); ``by_position``, the mean over
    seeds of the final evaluation's loss in each equal slice of the sequence, and ``by_position_vs_baseline``, its
    difference (nats) from the first variant's over the same seeds (``None`` for reports written before the demo
    recorded slices, or without the pairs)."""
    rows = []
    for name in variants:
        runs = sorted((r for r in records if r["variant"] == name), key=lambda r: r["seed"])
        losses = [r["final_val_loss"] for r in runs]
        rows.append(dict(variant=name, seeds=[r["seed"] for r in runs], losses=losses, mean=statistics.fmean(losses),
                         spread=max(losses) - min(losses),
                         train_seconds=statistics.fmean(r["train_seconds"] for r in runs),
                         tokens_per_s=statistics.fmean(r["tokens_per_s"] for r in runs)))
    base = dict(zip(rows[0]["seeds"], rows[0]["losses"]))
    for row in rows:
        paired = [base[s] for s in row["seeds"] if s in base]
        whole = len(paired) == len(row["seeds"])
        row["vs_baseline_pct"] = 100.0 * (row["mean"] / statistics.fmean(paired) - 1.0) if whole else None
        row["per_seed_pct"] = ([100.0 * (x / base[s] - 1.0) for s, x in zip(row["seeds"], row["losses"])]
                               if whole else None)
        row["per_seed_stderr"] = (statistics.stdev(row["per_seed_pct"]) / math.sqrt(len(row["per_seed_pct"]))
                                  if whole and len(row["seeds"]) > 1 else None)
    slices = {(r["variant"], r["seed"]): (r.get("evals") or [{}])[-1].get("val_loss_by_position") for r in records}
    for row in rows:
        mine = [slices[(row["variant"], s)] for s in row["seeds"]]
        theirs = [slices.get((rows[0]["variant"], s)) for s in row["seeds"]]
        row["by_position"] = _mean_lists(mine)
        row["by_position_vs_baseline"] = (None if row["by_position"] is None or None in theirs else
                                          [a - b for a, b in zip(row["by_position"], _mean_lists(theirs))])
    return rows


def _mean_lists(lists: List[Optional[List[float]]]) -> Optional[List[float]]:
    """Element-wise mean of equal-length lists (``None`` when any is missing)."""
    if not lists or any(x is None for x in lists):
        return None
    return [statistics.fmean(column) for column in zip(*lists)]


def print_table(rows: List[Dict], records: List[Dict]) -> None:
    baseline = "vs " + rows[0]["variant"]
    by_seed = [" ".join(f"{x:.4f}" for x in row["losses"]) for row in rows]
    width = max(len("final val loss (dense) by seed"), *map(len, by_seed)) + 2
    print(f"\n{'variant':<24}{'seeds':>10}{'final val loss (dense) by seed':>{width}}{'mean':>9}{'spread':>9}"
          f"{baseline:>12}{'train s':>9}{'tokens/s':>11}")
    for row, losses in zip(rows, by_seed):
        change = ("-" if row is rows[0] else "n/a" if row["vs_baseline_pct"] is None
                  else f"{row['vs_baseline_pct']:+.2f}%")
        print(f"{row['variant']:<24}{','.join(map(str, row['seeds'])):>10}{losses:>{width}}{row['mean']:>9.4f}"
              f"{row['spread']:>9.4f}{change:>12}{row['train_seconds']:>9.1f}{row['tokens_per_s']:>11.0f}")
    print(f"(vs {rows[0]['variant']}: each mean against {rows[0]['variant']}'s mean over the same seeds)")
    if all(row["by_position"] is not None for row in rows):
        count = len(rows[0]["by_position"])
        print(f"\nfinal val loss (dense) by position, {count} equal slices of the sequence; below each variant, "
              f"its difference from {rows[0]['variant']} (nats, same seeds)")
        print(f"{'variant':<24}" + "".join(f"{f'{i + 1}/{count}':>9}" for i in range(count)))
        for row in rows:
            print(f"{row['variant']:<24}" + "".join(f"{x:>9.4f}" for x in row["by_position"]))
            if row is not rows[0] and row["by_position_vs_baseline"] is not None:
                print(f"{'':<24}" + "".join(f"{x:>+9.4f}" for x in row["by_position_vs_baseline"]))
    modes = {row["variant"]: {r["mode"] for r in records if r["variant"] == row["variant"]} for row in rows}
    if modes[rows[0]["variant"]] != {"dense"}:
        return  # the bar compares with dense from scratch
    for row in rows[1:]:
        if modes[row["variant"]] == {"two-stage"} and row["vs_baseline_pct"] is not None:
            met = row["vs_baseline_pct"] <= BAR_PCT
            spread = ("" if row["per_seed_stderr"] is None else
                      f" (per seed {statistics.fmean(row['per_seed_pct']):+.2f}% ± {row['per_seed_stderr']:.2f} "
                      f"standard error, {len(row['seeds'])} seeds)")
            print(f"bar (two-stage within {BAR_PCT:g}% of {rows[0]['variant']} or below): {row['variant']} "
                  f"{row['vs_baseline_pct']:+.2f}%: {'met' if met else 'not met'}{spread}")


def plot(records: List[Dict], path: str) -> None:
    """Validation curves, one per variant (the mean over its seeds, each seed faint behind it), the switch to dense
    dashed; dotted, the same models scored with Lighthouse on during their Lighthouse stage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    names = list(dict.fromkeys(r["variant"] for r in records))
    for i, name in enumerate(names):
        runs = [r for r in records if r["variant"] == name]
        for key, suffix, style in (("val_loss", "", dict(marker="o", ms=3, ls="-" if i < 10 else "-.")),
                                   ("val_loss_lighthouse", ", Lighthouse on", dict(ls=":", lw=1.2))):
            curves: Dict[int, List[float]] = {}
            for r in runs:
                for e in r["evals"]:
                    if key in e:
                        curves.setdefault(e["step"], []).append(e[key])
            if not curves:
                continue
            steps = sorted(curves)
            ax.plot(steps, [statistics.fmean(curves[s]) for s in steps], color=f"C{i % 10}",
                    label=f"{name} ({len(runs)} seed{'s' * (len(runs) > 1)}){suffix}", **style)
            if key == "val_loss" and len(runs) > 1:  # each seed faintly behind the mean: a spread shows its shape
                for r in runs:
                    ax.plot([e["step"] for e in r["evals"]], [e["val_loss"] for e in r["evals"]], color=f"C{i % 10}",
                            lw=0.7, alpha=0.35)
        if runs[0]["mode"] == "two-stage" and runs[0]["switch_step"]:
            ax.axvline(runs[0]["switch_step"], color=f"C{i % 10}", ls="--", lw=0.8)
    ax.set(xlabel="step", ylabel="validation loss (nats/byte); solid: every layer dense",
           title="Lighthouse -> dense vs dense from scratch (mean over seeds, faint: each seed; dashed: switch)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(out_dir: str, meta: Dict, records: List[Dict], names: List[str]) -> List[Dict]:
    """``<out_dir>/quality.json`` and ``quality.png`` for the runs so far; returns the summary rows."""
    rows = summarize(records, [n for n in names if any(r["variant"] == n for r in records)])
    if "device" not in meta:  # the GPU's name, from the runs' own --device
        cuda = records[0]["device"].startswith("cuda")
        meta = dict(meta, device=torch.cuda.get_device_name(torch.device(records[0]["device"])) if cuda else "cpu")
    report = dict(meta, seeds=sorted({r["seed"] for r in records}), summary=rows, runs=records)
    tmp = os.path.join(out_dir, "quality.json.tmp")
    with open(tmp, "w") as f:
        json.dump(report, f, indent=1)
    os.replace(tmp, os.path.join(out_dir, "quality.json"))  # a run cut off mid-write keeps the last whole report
    plot(records, os.path.join(out_dir, "quality.png"))
    return rows


def main(argv: Optional[List[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stdout)
    logging.getLogger("megatron").setLevel(logging.ERROR)
    args = parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)
    meta = dict(date=datetime.date.today().isoformat(), command=" ".join(["python3", *sys.argv]))
    status = 0
    if args.processes > 1:
        args.merge, status = run_in_processes(args)
        if not args.merge:
            print("error: no process finished a run", file=sys.stderr)
            return status
        meta["processes"] = args.processes  # runs shared the device: their times are not those of a lone run
    if args.merge:
        records, names, reports = merge_reports(args.merge)
        meta.update(device=reports[0]["device"], torch=reports[0]["torch"], shared_flags=reports[0]["shared_flags"],
                    merged=[dict(path=p, command=r["command"]) for p, r in zip(args.merge, reports)])
        if args.processes == 1:
            meta["date"] = reports[0]["date"]
    else:
        names = [name for name, _ in args.variants]
        meta.update(torch=torch.__version__, shared_flags=args.shared)
        try:
            records = run_all(args, lambda done: write_report(args.out_dir, meta, done, names))
        except ValueError as err:  # a demo setting that cannot run: the demo's message names the flag
            print(f"error: {err}", file=sys.stderr)
            return 2
    rows = write_report(args.out_dir, meta, records, names)
    print_table(rows, records)
    print(f"wrote {os.path.join(args.out_dir, 'quality.json')} and quality.png")
    return status


if __name__ == "__main__":
    sys.exit(main())
