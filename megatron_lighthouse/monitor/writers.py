"""Where aggregated records go: JSONL, TensorBoard, Weights & Biases and a one-line console summary.

Every writer takes the records of :mod:`~megatron_lighthouse.monitor.aggregate` (``kind`` ``"run"`` once,
then ``"interval"`` per log interval) through ``write(record)`` and is released with ``close()``.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from typing import Any, Dict, List, Optional, Protocol

from .config import MonitorConfig

logger = logging.getLogger(__name__)

#: Per-rank series that TensorBoard / W&B get one scalar per rank for (everything else: min/mean/max).
PER_RANK_SCALARS = ("gpu_util_pct", "mem_used_mib", "power_w", "step_time_s")
#: Tag prefix of every TensorBoard / W&B scalar.
TAG = "gpu_monitor"


class MonitorWriter(Protocol):
    def write(self, record: Dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class JSONLWriter:
    """Appends one JSON object per line to ``path``; each line is flushed and fsynced as it is written,
    so a process killed at any point leaves only whole lines behind (at worst one torn last line, which
    :func:`~megatron_lighthouse.monitor.report.load_run` skips)."""

    def __init__(self, path: str) -> None:
        parent = os.path.dirname(os.path.abspath(path))
        os.makedirs(parent, exist_ok=True)
        self.path = path
        self._file = open(path, "a", encoding="utf-8")

    def write(self, record: Dict[str, Any]) -> None:
        self._file.write(json.dumps(record, allow_nan=False, separators=(",", ":")) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()


def scalars(record: Dict[str, Any]) -> Dict[str, float]:
    """Flat ``{tag: value}`` of an interval record: min/mean/max per metric, a few per-rank series and the
    straggler count."""
    out: Dict[str, float] = {}
    for name, stat in record["stats"].items():
        for key in ("min", "mean", "max"):
            out[f"{TAG}/{name}/{key}"] = stat[key]
    for entry in record["ranks"]:
        for name in PER_RANK_SCALARS:
            if entry.get(name) is not None:
                out[f"{TAG}/{name}/rank{entry['rank']}"] = entry[name]
    out[f"{TAG}/stragglers"] = float(len(record["stragglers"]))
    return out


class TensorBoardWriter:
    """Scalars of each interval record (see :func:`scalars`) at step = iteration.

    Pass ``writer`` to add to an existing ``SummaryWriter`` (e.g. Megatron's, left open on close), or
    ``log_dir`` to open a new one.
    """

    def __init__(self, log_dir: Optional[str] = None, writer: Any = None) -> None:
        if (log_dir is None) == (writer is None):
            raise ValueError("TensorBoardWriter needs exactly one of log_dir and writer")
        self._owned = writer is None
        if writer is None:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(log_dir=log_dir)
        self.writer = writer

    def write(self, record: Dict[str, Any]) -> None:
        if record.get("kind") != "interval":
            return
        for tag, value in scalars(record).items():
            self.writer.add_scalar(tag, value, record["iteration"])
        self.writer.flush()

    def close(self) -> None:
        if self._owned:
            self.writer.close()


class WandbWriter:
    """Scalars of each interval record to a Weights & Biases run (``wandb.run`` unless ``run`` is given)."""

    def __init__(self, run: Any) -> None:
        self.run = run

    def write(self, record: Dict[str, Any]) -> None:
        if record.get("kind") == "interval":
            self.run.log(scalars(record), step=record["iteration"])

    def close(self) -> None:
        """The run belongs to the caller; nothing to release."""


def _fmt(stat: Optional[Dict[str, Any]], scale: float = 1.0, digits: int = 0) -> str:
    if stat is None:
        return "n/a"
    return "/".join(f"{stat[k] * scale:.{digits}f}" for k in ("min", "mean", "max"))


def summary_line(record: Dict[str, Any]) -> str:
    """One line: min/mean/max of utilization, memory, power and step time, and the stragglers."""
    stats = record["stats"]
    parts = [
        f"gpu-monitor it {record['iteration']} ({record['world_size']} ranks, min/mean/max)",
        f"util {_fmt(stats.get('gpu_util_pct'))} %",
        f"mem {_fmt(stats.get('mem_used_mib'), 1 / 1024, 1)} GiB",
        f"power {_fmt(stats.get('power_w'))} W",
        f"step {_fmt(stats.get('step_time_s'), 1.0, 3)} s",
    ]
    stragglers = record["stragglers"]
    if stragglers:
        parts.append("STRAGGLERS: " + "; ".join(f"rank {s['rank']} {s['where']} {s['detail']}" for s in stragglers))
    return " | ".join(parts)


class ConsoleWriter:
    """:func:`summary_line` through ``logging`` (warning level when there is a straggler)."""

    def write(self, record: Dict[str, Any]) -> None:
        if record.get("kind") == "interval":
            level = logging.WARNING if record["stragglers"] else logging.INFO
            logger.log(level, summary_line(record))

    def close(self) -> None:
        """Nothing to release."""


def active_wandb_run() -> Any:
    """The active W&B run when ``wandb`` is installed and a run was started, else ``None``."""
    if importlib.util.find_spec("wandb") is None:
        return None
    import wandb

    return wandb.run


def default_writers(config: MonitorConfig) -> List[MonitorWriter]:
    """The writers ``config`` asks for, skipping (with one log line) those whose package is missing."""
    writers: List[MonitorWriter] = []
    if config.jsonl_path:
        writers.append(JSONLWriter(config.jsonl_path))
    if config.tensorboard_dir:
        if importlib.util.find_spec("tensorboard") is None:
            logger.warning("GPU monitor: tensorboard is not installed; no TensorBoard output")
        else:
            writers.append(TensorBoardWriter(log_dir=config.tensorboard_dir))
    if config.wandb:
        run = active_wandb_run()
        if run is not None:
            writers.append(WandbWriter(run))
    if config.console:
        writers.append(ConsoleWriter())
    return writers
