"""After the run: read a monitor JSONL log, draw the per-rank timeline and print a per-rank table."""

from __future__ import annotations

import collections
import dataclasses
import json
import math
from typing import Any, Dict, List, Optional

from .config import is_int, is_number

#: Timeline panels: (record field, axis label, scale applied to the value).
PANELS = (
    ("gpu_util_pct", "GPU util (%)", 1.0),
    ("mem_used_mib", "memory used (GiB)", 1 / 1024),
    ("power_w", "power (W)", 1.0),
    ("step_time_s", "step time (s)", 1.0),
)
#: Above this many ranks the timeline has no legend (colors follow rank order).
MAX_LEGEND_RANKS = 16


#: Per-rank fields of an interval record that the report reads as numbers (``None`` where not measured).
_NUMBER_FIELDS = tuple(field for field, _, _ in PANELS) + ("sm_clock_mhz", "temperature_c", "sample_age_s")


class LogFormatError(ValueError):
    """A file that is not a monitor log; the message names the file, the line and what is wrong."""


@dataclasses.dataclass
class RunLog:
    """A monitor log: the ``"run"`` header (``None`` if absent), the interval records in file order and
    the numbers (1-based) of the torn lines that were skipped (a job killed in the middle of a write)."""

    header: Optional[Dict[str, Any]]
    intervals: List[Dict[str, Any]]
    skipped_lines: List[int] = dataclasses.field(default_factory=list)

    @property
    def ranks(self) -> List[int]:
        return sorted({entry["rank"] for record in self.intervals for entry in record["ranks"]})

    def where(self) -> Dict[int, str]:
        """``{rank: "host:gpuN"}`` from the interval records."""
        return {e["rank"]: f"{e['host']}:gpu{e['local_gpu']}" for r in self.intervals for e in r["ranks"]}


def _finite(value: Any) -> bool:
    """Whether ``value`` is a finite number (JSON reads ``1e400`` as ``inf``)."""
    return is_number(value) and math.isfinite(value)


def _interval_problem(record: Dict[str, Any]) -> Optional[str]:
    """What makes ``record`` (``"kind": "interval"``) unusable for the report, or ``None``."""
    if not is_int(record.get("iteration")) or record["iteration"] < 0 or not _finite(record.get("time")):
        return "an interval record needs an int 'iteration' >= 0 and a finite number 'time'"
    ranks = record.get("ranks")
    if not isinstance(ranks, list) or not ranks or not all(isinstance(e, dict) for e in ranks):
        return "an interval record needs 'ranks', a non-empty list of objects"
    seen = set()
    for entry in ranks:
        if not is_int(entry.get("rank")) or entry["rank"] < 0 or "host" not in entry or "local_gpu" not in entry:
            return "each entry of 'ranks' needs 'rank' (an int >= 0), 'host' and 'local_gpu'"
        if entry["rank"] in seen:
            return f"rank {entry['rank']} appears twice in one interval (one entry per rank)"
        seen.add(entry["rank"])
        bad = [f for f in _NUMBER_FIELDS if not (entry.get(f) is None or _finite(entry[f]))]
        if bad:
            return f"rank {entry['rank']}: {bad[0]}={entry[bad[0]]!r} is not a finite number"
        if not isinstance(entry.get("stale", False), bool):
            return f"rank {entry['rank']}: stale={entry['stale']!r} is not true or false"
        reasons = entry.get("throttle_reasons", [])
        if not isinstance(reasons, list) or not all(isinstance(name, str) for name in reasons):
            return f"rank {entry['rank']}: throttle_reasons={reasons!r} is not a list of strings"
    stragglers = record.get("stragglers")
    if not isinstance(stragglers, list) or not all(
        isinstance(s, dict) and is_int(s.get("rank")) and 0 <= s["rank"] < len(ranks)
        and isinstance(s.get("reason"), str)
        for s in stragglers
    ):
        return ("an interval record needs 'stragglers', a list of objects with a 'reason' (a string) and a 'rank' "
                "in 'ranks'")
    return None


def load_run(path: str) -> RunLog:
    """Read a monitor JSONL file (one JSON record per line, as
    :class:`~megatron_lighthouse.monitor.writers.JSONLWriter` writes it).

    A line that is not JSON is taken for a line torn by a killed job and skipped (listed in
    :attr:`RunLog.skipped_lines`) when it is the last line or a new run's header follows it (the job was
    restarted on the same log). Raises ``OSError`` when the file cannot be read and
    :class:`LogFormatError` (naming the file and line) when it is not a monitor log: empty, not UTF-8 text,
    a line that is not JSON elsewhere, a record of another shape (one with a rank twice, for one), or interval
    records whose times go backwards (two logs joined out of order: the timeline would fold back).
    """
    header, intervals, torn = None, [], []
    last_time = last_line = None  # the time of the previous interval record, and its line
    pending: Optional[int] = None  # a line that is not JSON: torn if the file ends or a new run follows

    def not_json(number: int) -> LogFormatError:
        return LogFormatError(f"{path}: line {number} is not JSON; not a monitor log")

    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    if pending is not None:
                        raise not_json(pending) from None
                    pending = number
                    continue
                kind = record.get("kind") if isinstance(record, dict) else None
                if pending is not None:
                    if kind != "run":
                        raise not_json(pending)
                    torn.append(pending)
                    pending = None
                if kind == "run":
                    header = header or record
                elif kind == "interval":
                    problem = _interval_problem(record)
                    if problem:
                        raise LogFormatError(f"{path}: line {number}: {problem}; not a monitor log")
                    if last_time is not None and record["time"] < last_time:
                        raise LogFormatError(f"{path}: line {number}: time {record['time']} is before line "
                                             f"{last_line}'s {last_time}: the records are not in the order they were "
                                             f"written (logs joined out of order?)")
                    last_time, last_line = record["time"], number
                    intervals.append(record)
                else:
                    shape = f"'kind': {kind!r}" if isinstance(record, dict) else f"a JSON {type(record).__name__}"
                    raise LogFormatError(f"{path}: line {number} is not a monitor record ({shape}); not a monitor log")
    except UnicodeDecodeError as exc:
        raise LogFormatError(f"{path}: not UTF-8 text ({exc.reason}); not a monitor log") from exc
    if pending is not None:
        torn.append(pending)
    if header is None and not intervals:
        what = "only a torn line" if torn else "an empty file"
        raise LogFormatError(f"{path}: {what}, no monitor records")
    return RunLog(header, intervals, torn)


def series(run: RunLog, field: str) -> Dict[int, tuple]:
    """``{rank: (seconds since the first record, values)}`` of one per-rank field, missing values dropped."""
    if not run.intervals:
        return {}
    t0 = run.intervals[0]["time"]
    out: Dict[int, tuple] = collections.defaultdict(lambda: ([], []))
    for record in run.intervals:
        for entry in record["ranks"]:
            if entry.get(field) is not None:
                xs, ys = out[entry["rank"]]
                xs.append(record["time"] - t0)
                ys.append(entry[field])
    return dict(out)


def _break_gaps(xs: List[float], ys: List[float]) -> tuple:
    """Insert a NaN (a break in the line) where the time between two points exceeds 3x the median gap,
    so a pause of the monitor (a restart, a stretch without logging) shows as a gap, not as a trend."""
    gaps = sorted(b - a for a, b in zip(xs, xs[1:]))
    if not gaps:
        return xs, ys
    limit = 3 * gaps[len(gaps) // 2]
    out_x, out_y = [xs[0]], [ys[0]]
    for (x0, x1), y in zip(zip(xs, xs[1:]), ys[1:]):
        if x1 - x0 > limit:
            out_x.append(0.5 * (x0 + x1))
            out_y.append(math.nan)
        out_x.append(x1)
        out_y.append(y)
    return out_x, out_y


#: Straggler reasons and the panel (record field) whose point gets a red cross.
_REASON_PANEL = {"step_time": "step_time_s", "gpu_util": "gpu_util_pct"}


def _mark_stragglers(run: RunLog, axes: Dict[str, Any]) -> None:
    t0 = run.intervals[0]["time"]
    scale = {field: factor for field, _, factor in PANELS}
    for record in run.intervals:
        for flag in record["stragglers"]:
            field = _REASON_PANEL.get(flag["reason"])
            if field in axes:
                value = record["ranks"][flag["rank"]].get(field)
                if value is not None:
                    point = ([record["time"] - t0], [value * scale[field]])
                    axes[field].scatter(*point, marker="x", color="red", zorder=3)


def plot_timeline(run: RunLog) -> Any:
    """A matplotlib ``Figure`` with one panel per :data:`PANELS` entry and one line per rank in each."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    ranks, where = run.ranks, run.where()
    cmap = plt.get_cmap("tab10" if len(ranks) <= 10 else "viridis")
    colors = {r: cmap(i if len(ranks) <= 10 else i / max(len(ranks) - 1, 1)) for i, r in enumerate(ranks)}
    fig, axes = plt.subplots(len(PANELS), 1, figsize=(11, 2.6 * len(PANELS)), sharex=True, squeeze=False)
    for ax, (field, label, scale) in zip(axes[:, 0], PANELS):
        for rank, (xs, ys) in sorted(series(run, field).items()):
            xs, ys = _break_gaps(xs, [y * scale for y in ys])
            ax.plot(xs, ys, color=colors[rank], lw=1.2, label=f"rank {rank} {where[rank]}")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    _mark_stragglers(run, {field: ax for ax, (field, _, _) in zip(axes[:, 0], PANELS)})
    axes[-1, 0].set_xlabel("time since first interval (s)")
    if len(ranks) <= MAX_LEGEND_RANKS:
        axes[0, 0].legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    n_strag = sum(len(r["stragglers"]) for r in run.intervals)
    fig.suptitle(f"GPU monitor: {len(ranks)} ranks, {len(run.intervals)} intervals, {n_strag} straggler flags")
    fig.tight_layout()
    return fig


def render_timeline(run: RunLog, png_path: str) -> None:
    """Save :func:`plot_timeline` to ``png_path``."""
    from matplotlib import pyplot as plt

    fig = plot_timeline(run)
    fig.savefig(png_path, dpi=110)
    plt.close(fig)


def _mean(values: List[float]) -> Optional[float]:
    return sum(values) / len(values) if values else None


def _cell(value: Optional[float], fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def format_table(run: RunLog) -> str:
    """Per-rank summary over the whole run: mean/min utilization, peak memory, mean power and SM clock,
    peak temperature, mean step time, straggler flags, intervals whose samples were stale (the rank's
    sampler died or NVML stalled, so its values repeat an old sample) and the throttle reasons seen."""
    where = run.where()
    flags = collections.Counter(s["rank"] for r in run.intervals for s in r["stragglers"])
    per_rank: Dict[int, Dict[str, List[Any]]] = collections.defaultdict(lambda: collections.defaultdict(list))
    for record in run.intervals:
        for entry in record["ranks"]:
            for key, value in entry.items():
                if value is not None:
                    per_rank[entry["rank"]][key].append(value)
    head = ("rank", "where", "util%", "min%", "memGiB", "power W", "SM MHz", "temp C", "step s", "flags", "stale",
            "throttle")
    rows = [head]
    for rank in run.ranks:
        v = per_rank[rank]
        reasons = sorted({name for names in v["throttle_reasons"] for name in names})
        peak_mib = max(v["mem_used_mib"], default=None)
        rows.append(
            (
                str(rank),
                where[rank],
                _cell(_mean(v["gpu_util_pct"]), ".1f"),
                _cell(min(v["gpu_util_pct"], default=None), ".0f"),
                _cell(None if peak_mib is None else peak_mib / 1024, ".2f"),
                _cell(_mean(v["power_w"]), ".0f"),
                _cell(_mean(v["sm_clock_mhz"]), ".0f"),
                _cell(max(v["temperature_c"], default=None), ".0f"),
                _cell(_mean(v["step_time_s"]), ".4f"),
                str(flags.get(rank, 0)),
                str(sum(v["stale"])),
                ",".join(reasons) or "-",
            )
        )
    return align(rows, left=(1,))


def align(rows: List[tuple], left: tuple = ()) -> str:
    """Rows of strings as a plain-text table; columns in ``left`` are left-aligned, the rest right."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(w) if i in left else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
        .rstrip()
        for row in rows
    )
