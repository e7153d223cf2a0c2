"""Megatron-LM training logs -> rows per stage, a table (stdout) and one JSON file.

Reads the lines Megatron-LM prints itself (``megatron/training/training.py`` ``training_log`` and
``evaluate_and_print_results``, ``megatron/training/utils`` ``report_memory``, at the commit of
``patches/apply.sh``), wherever they sit in a line (torchrun or logging prefixes are skipped):

- ``iteration N/ M | consumed samples: ... | elapsed time per iteration (ms): X | ... | lm loss: Y | ...``: one
  row per logged iteration, every ``key: value`` field kept (keys in snake case: ``elapsed_time_per_iteration_ms``,
  ``lm_loss``, ``grad_norm``, ``learning_rate``, ...);
- ``[Rank R] (LABEL) memory (MB) | allocated: A | max allocated: B | reserved: C | max reserved: D``;
- ``validation loss at WHERE | lm loss value: X | lm loss PPL: Y |``;

and two lines of the Lighthouse hook (``megatron_lighthouse.megatron_lm``): the start-up summary
(``Lighthouse: seq_length ...`` or ``Lighthouse: off ...``) and the switch (``Lighthouse: iteration N >=
--lighthouse-dense-from-iteration K: ... switched to dense attention ...``).

Usage::

    python benchmarks/megatron_log.py [--json OUT.json] [--status stages.tsv] [--compare-loss A:B] [NAME=]LOG...

``NAME`` names the stage (default: the log's file name without ``.log``); ``--status`` is a tab-separated file
``stage rc seconds`` (with a header line) of how each stage ended, merged into the JSON and the table. A stage whose
first iteration follows the last one of a stage given before it (a resumed checkpoint) is said to continue it, with
both losses. ``--compare-loss A:B`` adds the lm loss of stage B against stage A at their common iterations (the
largest absolute and relative differences; e.g. FP8 against bf16 from the same seed).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
from typing import Dict, Iterable, List, Optional, Tuple

ITERATION = re.compile(r"\biteration\s+(\d+)\s*/\s*(\d+)\s*\|(.*)$")
MEMORY = re.compile(r"\[Rank (\d+)\] \((.+?)\) memory \(MB\)\s*\|(.*)$")
VALIDATION = re.compile(r"validation(?:\s.*?)? loss at (.+?) \|(.*)$")
SWITCH = re.compile(r"Lighthouse: iteration (\d+) >= --lighthouse-dense-from-iteration (\d+): (\d+) Lighthouse "
                    r"layers switched to dense attention(?: \(layers ([\d, ]+)\))?")
SUMMARY = re.compile(r"(Lighthouse: (?:seq_length|off) .*)$")


def number(text: str):
    """``"1.0E+01"`` -> ``10.0``, ``"3"`` -> ``3``; anything else stays text (stripped)."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text.strip()


def fields(text: str) -> Dict[str, object]:
    """``" a b: 1 | c (ms): 2.5 |"`` -> ``{"a_b": 1, "c_ms": 2.5}``: keys in snake case, parts without ``": "``
    skipped."""
    out = {}
    for part in text.split("|"):
        key, sep, value = part.rpartition(": ")
        if sep and key.strip():
            out[re.sub(r"[^a-z0-9]+", "_", key.lower()).strip("_")] = number(value)
    return out


def parse_log(lines: Iterable[str]) -> dict:
    """The Megatron-LM (and Lighthouse hook) records of one log: ``iterations``, ``memory``, ``validation``,
    ``switch`` (``None`` without one) and ``lighthouse`` (the start-up summary)."""
    log: dict = {"iterations": [], "memory": [], "validation": [], "switch": None, "lighthouse": None}
    for line in lines:
        line = line.rstrip("\n")
        if m := ITERATION.search(line):
            log["iterations"].append({"iteration": int(m[1]), "train_iters": int(m[2]), **fields(m[3])})
        elif m := MEMORY.search(line):
            log["memory"].append({"rank": int(m[1]), "label": m[2], **fields(m[3])})
        elif m := VALIDATION.search(line):
            log["validation"].append({"at": m[1].strip(), **fields(m[2])})
        elif m := SWITCH.search(line):
            log["switch"] = {"iteration": int(m[1]), "dense_from_iteration": int(m[2]), "layers_switched": int(m[3]),
                             "layers": [int(x) for x in re.findall(r"\d+", m[4] or "")]}
        elif m := SUMMARY.search(line):
            log["lighthouse"] = m[1].strip()
    return log


def _numbers(records: List[dict], key: str) -> List[float]:
    return [r[key] for r in records if isinstance(r.get(key), (int, float))]


def summarize(log: dict) -> dict:
    """One line per stage: the iterations logged, the first and last lm loss, the median time per iteration
    (without the first logged one, which carries the warm-up, when there are more), the peak memory."""
    rows = log["iterations"]
    times, losses = _numbers(rows, "elapsed_time_per_iteration_ms"), _numbers(rows, "lm_loss")
    peaks = _numbers(log["memory"], "max_allocated")
    steady = times[1:] or times
    validation = [v for v in log["validation"] if "validation set" in v["at"]] or log["validation"]
    return {
        "iterations": [rows[0]["iteration"], rows[-1]["iteration"]] if rows else None,
        "lm_loss_first": losses[0] if losses else None,
        "lm_loss_last": losses[-1] if losses else None,
        "ms_per_iteration_median": statistics.median(steady) if steady else None,
        "ms_first_iteration": times[0] if times else None,
        "max_allocated_mb": max(peaks) if peaks else None,
        "switched_at": log["switch"]["iteration"] if log["switch"] else None,
        "validation_lm_loss": validation[-1].get("lm_loss_value") if validation else None,
    }


def link_resumed(stages: Dict[str, dict]) -> None:
    """Set ``summary["continues"]`` of each stage whose first logged iteration follows the last one of an earlier
    stage (a resumed checkpoint): that stage's name and last lm loss, and this one's first."""
    ending: Dict[int, str] = {}  # last logged iteration -> the latest stage so far that ends there
    for name, stage in stages.items():
        s = stage["summary"]
        before = ending.get(s["iterations"][0] - 1) if s["iterations"] and s["iterations"][0] > 1 else None
        s["continues"] = None if before is None else {
            "stage": before, "lm_loss_before": stages[before]["summary"]["lm_loss_last"],
            "lm_loss_after": s["lm_loss_first"]}
        if s["iterations"]:
            ending[s["iterations"][1]] = name


def read_status(path: str) -> Dict[str, dict]:
    """``stage rc seconds`` rows (tab-separated, a header line first) -> ``{stage: {"rc": ..., "seconds": ...}}``."""
    with open(path) as f:
        rows = [line.rstrip("\n").split("\t") for line in list(f)[1:]]
    return {row[0]: {"rc": number(row[1]), "seconds": number(row[2])} for row in rows if len(row) == 3}


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):  # inf and nan as such
        return f"{value:.4g}" if abs(value) < 100 else f"{value:.1f}"
    if isinstance(value, list):
        return "-".join(map(str, value))
    return str(value)


def _table(header: List[str], rows: List[List[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
    lines += ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    return "\n".join(lines)


def format_report(stages: Dict[str, dict]) -> str:
    """The summary table (one row per stage), then the logged iterations and memory reports of every stage."""
    header = ["stage", "rc", "s", "iterations", "ms/iter", "first ms", "loss first", "loss last", "val loss",
              "max alloc MB", "switch"]
    keys = ("iterations", "ms_per_iteration_median", "ms_first_iteration", "lm_loss_first", "lm_loss_last",
            "validation_lm_loss", "max_allocated_mb", "switched_at")
    rows = [[name, *(_cell((stage["status"] or {}).get(k)) for k in ("rc", "seconds")),
             *(_cell(stage["summary"][k]) for k in keys)] for name, stage in stages.items()]
    out = [_table(header, rows)]
    for header, part, keys in (
            (["iteration", "ms", "lm loss", "grad norm", "lr"], "iterations",
             ("iteration", "elapsed_time_per_iteration_ms", "lm_loss", "grad_norm", "learning_rate")),
            (["memory (MB) at", "allocated", "max allocated", "reserved", "max reserved"], "memory",
             ("label", "allocated", "max_allocated", "reserved", "max_reserved"))):
        rows = [[name, *(_cell(r.get(k)) for k in keys)] for name, stage in stages.items() for r in stage[part]]
        if rows:
            out += ["", _table(["stage", *header], rows)]
    notes = []
    for name, stage in stages.items():
        if stage["switch"]:
            sw = stage["switch"]
            notes.append(f"{name}: {sw['layers_switched']} Lighthouse layers switched to dense at iteration "
                         f"{sw['iteration']} (--lighthouse-dense-from-iteration {sw['dense_from_iteration']})")
        if stage["summary"].get("continues"):
            c = stage["summary"]["continues"]
            notes.append(f"{name}: continues {c['stage']} at iteration {stage['summary']['iterations'][0]}, lm loss "
                         f"{_cell(c['lm_loss_before'])} -> {_cell(c['lm_loss_after'])}")
    return "\n".join(out + ([""] + notes if notes else []))


def compare_loss(stages: Dict[str, dict], first: str, second: str) -> dict:
    """The lm loss of stage ``second`` against stage ``first`` at the iterations both logged (e.g. FP8 against
    bf16 from the same seed): their count, the largest absolute difference and the largest relative one (to
    ``first``'s loss), the mean of each stage's losses there, and the difference (second - first) per iteration."""
    losses = [{r["iteration"]: r["lm_loss"] for r in stages[name]["iterations"]
               if isinstance(r.get("lm_loss"), (int, float))} for name in (first, second)]
    common = sorted(set(losses[0]) & set(losses[1]))
    diffs = [abs(losses[1][i] - losses[0][i]) for i in common]
    return {
        "stages": [first, second], "iterations": len(common),
        "max_abs_diff": max(diffs) if diffs else None,
        "max_rel_diff": max(d / abs(losses[0][i]) for d, i in zip(diffs, common)) if diffs else None,
        "mean_loss": [statistics.fmean(loss[i] for i in common) if common else None for loss in losses],
        "diff_per_iteration": {i: losses[1][i] - losses[0][i] for i in common},
    }


def format_comparisons(comparisons: List[dict]) -> str:
    header = ["loss of", "against", "iterations", "max |diff|", "max rel diff", "mean loss", "mean loss (against)"]
    rows = [[c["stages"][1], c["stages"][0], str(c["iterations"]), _cell(c["max_abs_diff"]), _cell(c["max_rel_diff"]),
             _cell(c["mean_loss"][1]), _cell(c["mean_loss"][0])] for c in comparisons]
    return _table(header, rows)


def stage_and_path(item: str) -> Tuple[str, str]:
    """``"NAME=LOG"`` -> ``(NAME, LOG)``; ``"dir/LOG.log"`` -> ``("LOG", "dir/LOG.log")``."""
    name, sep, path = item.partition("=")
    if sep and re.fullmatch(r"[\w.-]+", name):
        return name, path
    return os.path.splitext(os.path.basename(item))[0], item


def load_stages(logs: List[str], status: Optional[Dict[str, dict]] = None) -> Dict[str, dict]:
    """``[NAME=]LOG`` arguments -> ``{name: parsed log + summary + status}``, in the order given; stages known only
    from ``status`` (no log) are kept with empty records."""
    stages: Dict[str, dict] = {}
    for item in logs:
        name, path = stage_and_path(item)
        with open(path, errors="replace") as f:
            stages[name] = parse_log(f)
    for name in status or {}:
        stages.setdefault(name, parse_log([]))
    for name, stage in stages.items():
        stage["summary"] = summarize(stage)
        stage["status"] = (status or {}).get(name)
    link_resumed(stages)
    return stages


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("logs", nargs="+", metavar="[NAME=]LOG", help="Megatron-LM log files, one per stage")
    parser.add_argument("--json", help="write every record and the summaries here")
    parser.add_argument("--status", help="tab-separated 'stage rc seconds' file (with a header line)")
    parser.add_argument("--compare-loss", action="append", default=[], metavar="FIRST:SECOND",
                        help="the lm loss of stage SECOND against stage FIRST at their common iterations (repeatable)")
    args = parser.parse_args(argv)
    for item in args.logs:
        if not os.path.isfile(stage_and_path(item)[1]):
            parser.error(f"{item}: no such file")
    stages = load_stages(args.logs, read_status(args.status) if args.status else None)
    pairs = [pair.split(":") for pair in args.compare_loss]
    for pair, text in zip(pairs, args.compare_loss):
        if len(pair) != 2 or any(name not in stages for name in pair):
            parser.error(f"--compare-loss {text}: must be FIRST:SECOND, two of the stages {sorted(stages)}")
    comparisons = [compare_loss(stages, *pair) for pair in pairs]
    print(format_report(stages))
    if comparisons:
        print("\n" + format_comparisons(comparisons))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"stages": stages, "loss_comparisons": comparisons}, f, indent=1)
        print(f"\n-> {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
