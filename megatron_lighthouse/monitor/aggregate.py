"""Cross-rank aggregation: per-rank interval summaries, one ``all_gather`` per log interval, statistics
and straggler detection.

Each rank reduces its samples of the interval to a short float64 vector (:data:`SUMMARY_FIELDS`); one
``all_gather`` of that vector on the existing process group gives every rank the whole table. Who is
who (host, local GPU, GPU name) is exchanged once, at the first aggregation.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
import socket
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

from .backend import SLOWDOWN_REASONS, decode_throttle
from .config import MonitorConfig
from .sample import SAMPLE_FIELDS, GPUSample

#: Per-rank values of one log interval, in the order they travel in the collective. ``sample_age_s``: seconds
#: since the rank's newest sample; ``stale``: 1.0 when that is too old (see ``MonitorConfig.stale_after_s``).
SUMMARY_FIELDS = ("step_time_s", "steps", "samples") + SAMPLE_FIELDS + ("throttle_mask", "sample_age_s", "stale")
#: Sample fields reduced by their maximum over the interval (the rest by their mean).
_MAX_FIELDS = frozenset({"mem_used_mib", "mem_total_mib", "temperature_c"})
#: Fields that get min/mean/max statistics over ranks.
STAT_FIELDS = tuple(f for f in SUMMARY_FIELDS if f not in ("steps", "samples", "throttle_mask", "stale"))


@dataclasses.dataclass(frozen=True)
class RankIdentity:
    """Where a rank runs: host, CUDA index in its process (``local_gpu``), node-wide NVML index and name."""

    rank: int
    host: str
    local_gpu: Optional[int]
    gpu_index: Optional[int]
    gpu_name: Optional[str]
    has_metrics: bool

    @property
    def where(self) -> str:
        """``host:gpuN`` (``host:gpu?`` when the rank has no known GPU)."""
        return f"{self.host}:gpu{'?' if self.local_gpu is None else self.local_gpu}"


def local_identity(
    rank: int, local_gpu: Optional[int], gpu_index: Optional[int], gpu_name: Optional[str], has_metrics: bool
) -> RankIdentity:
    return RankIdentity(rank, socket.gethostname(), local_gpu, gpu_index, gpu_name, has_metrics)


def summarize_interval(
    samples: Sequence[GPUSample],
    step_times: Sequence[float],
    sample_age_s: float = math.nan,
    stale: bool = False,
) -> Dict[str, float]:
    """Reduce one rank's samples and step times (seconds) of an interval to :data:`SUMMARY_FIELDS`.

    ``sample_age_s`` (seconds since the rank's newest sample; NaN for a rank without NVML) and ``stale``
    pass through. Returns ``{field: float}``, NaN where the rank has no value.
    """
    out: Dict[str, float] = {name: math.nan for name in SUMMARY_FIELDS}
    out["steps"] = float(len(step_times))
    out["samples"] = float(len(samples))
    out["sample_age_s"] = float(sample_age_s)
    out["stale"] = float(stale)
    if step_times:
        out["step_time_s"] = sum(step_times) / len(step_times)
    for name in SAMPLE_FIELDS:
        values = [v for v in (getattr(s, name) for s in samples) if v is not None]
        if values:
            out[name] = max(values) if name in _MAX_FIELDS else sum(values) / len(values)
    masks = [s.throttle_mask for s in samples if s.throttle_mask is not None]
    if masks:
        mask = 0
        for m in masks:
            mask |= m
        out["throttle_mask"] = float(mask)
    return out


def _collective_device(group: Any) -> torch.device:
    """Where the gathered tensor must live for this group's backend (NCCL needs the rank's GPU)."""
    backend = str(dist.get_backend(group))
    if "nccl" in backend and "gloo" not in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def distributed_world(group: Any = None) -> tuple:
    """``(rank, world_size)`` in ``group``; ``(0, 1)`` when torch.distributed is not initialized."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


def exchange_identities(identity: RankIdentity, group: Any = None) -> List[RankIdentity]:
    """Every rank's :class:`RankIdentity`, indexed by rank in ``group`` (one ``all_gather_object``)."""
    _, world = distributed_world(group)
    if world == 1:
        return [identity]
    out: List[Any] = [None] * world
    dist.all_gather_object(out, identity, group=group)
    return out


def gather_summaries(summary: Dict[str, float], group: Any = None) -> List[Dict[str, float]]:
    """Every rank's interval summary, indexed by rank: one ``all_gather`` of ``len(SUMMARY_FIELDS)`` doubles."""
    _, world = distributed_world(group)
    if world == 1:
        return [dict(summary)]
    device = _collective_device(group)
    mine = torch.tensor([summary[name] for name in SUMMARY_FIELDS], dtype=torch.float64, device=device)
    rows = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(rows, mine, group=group)
    table = torch.stack(rows).cpu().tolist()
    return [dict(zip(SUMMARY_FIELDS, row)) for row in table]


def _finite(value: float) -> bool:
    return value is not None and math.isfinite(value)


def rank_stats(summaries: Sequence[Dict[str, float]]) -> Dict[str, Dict[str, Any]]:
    """``{field: {min, mean, max, min_rank, max_rank}}`` over ranks that report the field."""
    out: Dict[str, Dict[str, Any]] = {}
    for name in STAT_FIELDS:
        pairs = [(s[name], rank) for rank, s in enumerate(summaries) if _finite(s[name])]
        if not pairs:
            continue
        lo = min(pairs, key=lambda pair: pair[0])  # ties go to the lowest rank
        hi = max(pairs, key=lambda pair: pair[0])
        out[name] = {
            "min": lo[0],
            "mean": sum(v for v, _ in pairs) / len(pairs),
            "max": hi[0],
            "min_rank": lo[1],
            "max_rank": hi[1],
        }
    return out


def median_without(ordered: Sequence[float], value: float) -> float:
    """Median of ``ordered`` (sorted, holding ``value``) with one ``value`` left out, in O(log n).

    Each rank is compared with the others: with two ranks a rank 50 % slower than its peer is 50 % above
    the reference, where the median of both would put it only 20 % above.
    """
    skip = bisect.bisect_left(ordered, value)
    remaining = len(ordered) - 1

    def kth(k: int) -> float:  # k-th smallest of the remaining values
        return ordered[k if k < skip else k + 1]

    half = remaining // 2
    return kth(half) if remaining % 2 else 0.5 * (kth(half - 1) + kth(half))


def find_stragglers(
    summaries: Sequence[Dict[str, float]],
    identities: Sequence[RankIdentity],
    config: MonitorConfig,
) -> List[Dict[str, Any]]:
    """Ranks that hold the others back, each named with host and local GPU.

    Each rank is compared with the median of the other ranks (:func:`median_without`). A rank is listed
    with ``reason`` ``"step_time"`` when its mean step time exceeds that median by more than
    ``config.step_time_threshold`` (a fraction), ``"gpu_util"`` when its utilization is more than
    ``config.util_threshold_pct`` points below it, ``"sm_clock"`` when its SM clock is below it by more
    than ``config.clock_threshold`` (a fraction), and ``"throttle"`` when its clocks were slowed by hardware
    or temperature (:data:`~megatron_lighthouse.monitor.backend.SLOWDOWN_REASONS`).
    """
    found: List[Dict[str, Any]] = []

    def flag(rank: int, reason: str, value: Any, reference: Any, detail: str) -> None:
        who = identities[rank]
        found.append(
            {
                "rank": rank,
                "host": who.host,
                "local_gpu": who.local_gpu,
                "gpu_index": who.gpu_index,
                "where": who.where,
                "reason": reason,
                "value": value,
                "median": reference,
                "detail": detail,
            }
        )

    def against_median(field: str) -> List[tuple]:
        """``(value, rank, median of the other ranks)`` of every rank reporting ``field``, when two or more do."""
        pairs = [(s[field], r) for r, s in enumerate(summaries) if _finite(s[field])]
        if len(pairs) < 2:
            return []
        values = sorted(v for v, _ in pairs)
        return [(v, r, median_without(values, v)) for v, r in pairs]

    for value, rank, median in against_median("step_time_s"):
        if value > median * (1.0 + config.step_time_threshold):
            detail = f"step {value:.3f} s vs others' median {median:.3f} s (+{100 * (value / median - 1):.0f}%)"
            flag(rank, "step_time", value, median, detail)
    for value, rank, median in against_median("gpu_util_pct"):
        if value < median - config.util_threshold_pct:
            flag(rank, "gpu_util", value, median, f"GPU util {value:.0f}% vs others' median {median:.0f}%")
    for value, rank, median in against_median("sm_clock_mhz"):
        if value < median * (1.0 - config.clock_threshold):
            flag(rank, "sm_clock", value, median, f"SM clock {value:.0f} MHz vs others' median {median:.0f} MHz")
    for rank, s in enumerate(summaries):
        if _finite(s["throttle_mask"]):
            slow = [name for name in decode_throttle(int(s["throttle_mask"])) if name in SLOWDOWN_REASONS]
            if slow:
                flag(rank, "throttle", slow, None, "clocks slowed: " + ",".join(slow))
    return found


def _json_value(value: float) -> Optional[float]:
    return value if _finite(value) else None


def build_record(
    iteration: int,
    elapsed_s: float,
    unix_time: float,
    summaries: Sequence[Dict[str, float]],
    identities: Sequence[RankIdentity],
    config: MonitorConfig,
) -> Dict[str, Any]:
    """The JSON record of one log interval: per-rank values, statistics over ranks and stragglers.

    Each per-rank entry carries ``sample_age_s`` (seconds since that rank's newest sample) and ``stale``
    (``True`` when its metrics repeat a sample older than ``config.stale_threshold_s``: a dead sampler
    thread or a stalled NVML).
    """
    ranks = []
    for rank, (summary, who) in enumerate(zip(summaries, identities)):
        entry: Dict[str, Any] = {"rank": rank, "host": who.host, "local_gpu": who.local_gpu}
        for name in SUMMARY_FIELDS:
            entry[name] = _json_value(summary[name])
        for name in ("steps", "samples"):
            entry[name] = int(summary[name])
        entry["stale"] = summary["stale"] == 1.0
        mask = entry.pop("throttle_mask")
        entry["throttle_reasons"] = [] if mask is None else decode_throttle(int(mask))
        ranks.append(entry)
    return {
        "kind": "interval",
        "iteration": iteration,
        "time": unix_time,
        "elapsed_s": elapsed_s,
        "world_size": len(summaries),
        "ranks": ranks,
        "stats": rank_stats(summaries),
        "stragglers": find_stragglers(summaries, identities, config),
    }


def run_record(
    identities: Sequence[RankIdentity], interval_s: float, log_interval: int, unix_time: float
) -> Dict[str, Any]:
    """The first JSON record of a run: who is who and how the monitor samples."""
    return {
        "kind": "run",
        "version": 1,
        "time": unix_time,
        "world_size": len(identities),
        "interval_s": interval_s,
        "log_interval": log_interval,
        "ranks": [dataclasses.asdict(who) for who in identities],
    }
