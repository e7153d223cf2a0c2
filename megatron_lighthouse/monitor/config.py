"""Monitor settings (:class:`MonitorConfig`) and the command-line flags that fill them."""

from __future__ import annotations

import argparse
import dataclasses
import math
import numbers
import os
from typing import Any, Optional

#: File name of the run log that :class:`~megatron_lighthouse.monitor.GPUMonitor` writes in its directory.
JSONL_NAME = "gpu_monitor.jsonl"


def is_number(value: Any) -> bool:
    """Whether ``value`` is a real number and not a bool (an int, a float, a numpy scalar)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_int(value: Any) -> bool:
    """Whether ``value`` is an integer and not a bool (an int, a numpy integer)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_finite(value: Any) -> bool:
    """Whether ``value`` is a finite real number and not a bool."""
    return is_number(value) and math.isfinite(value)


def _is_path(value: Any) -> bool:
    """Whether ``value`` is ``None`` or a non-empty path (a string or ``os.PathLike``)."""
    return value is None or isinstance(value, (str, os.PathLike)) and os.fspath(value) != ""


#: Longest sampling interval, in seconds (a sampler that reads its GPU less often than hourly says nothing).
MAX_INTERVAL_S = 3600.0


class MonitorSettingError(ValueError):
    """A bad :class:`MonitorConfig` setting: ``name``, its ``value`` and the ``rule`` it breaks."""

    def __init__(self, name: str, value: Any, rule: str) -> None:
        super().__init__(f"MonitorConfig.{name}={value!r}: {rule}")
        self.name, self.value, self.rule = name, value, rule


def _require(config: "MonitorConfig", name: str, ok: bool, rule: str) -> None:
    """:class:`MonitorSettingError` naming the setting, its value and ``rule`` unless ``ok``."""
    if not ok:
        raise MonitorSettingError(name, getattr(config, name), rule)


@dataclasses.dataclass(frozen=True)
class MonitorConfig:
    """Settings of :class:`~megatron_lighthouse.monitor.GPUMonitor`.

    Args:
        enabled: ``False`` makes every monitor call a no-op.
        interval_s: seconds between two NVML samples of a rank's GPU (default 1 s).
        log_interval: steps between two aggregations across ranks (one collective each).
        jsonl_path: run log (one JSON record per line, flushed per record); ``None`` writes none.
        tensorboard_dir: TensorBoard event directory; ``None`` writes none.
        wandb: log to the active Weights & Biases run when ``wandb`` is installed and a run is active.
        console: one ``logging`` line per aggregation.
        step_time_threshold: a rank whose mean step time exceeds the median of the other ranks by more
            than this fraction is a straggler (0.2 = 20 % slower).
        util_threshold_pct: a rank whose GPU utilization is this many percentage points below the median
            of the other ranks is a straggler.
        clock_threshold: a rank whose mean SM clock is below the median of the other ranks by more
            than this fraction is a straggler (a slowed GPU in synchronous training, where step times look alike).
        write_rank: the rank that writes JSONL, TensorBoard, W&B and console output.
        stale_after_s: a rank whose newest sample is older than this many seconds at an aggregation (its
            sampler died or NVML stalls) is marked ``"stale": true`` in the record and warned about once;
            ``None``: three sampling intervals, at least 1 s (:attr:`stale_threshold_s`).
    """

    enabled: bool = True
    interval_s: float = 1.0
    log_interval: int = 100
    jsonl_path: Optional[str] = None
    tensorboard_dir: Optional[str] = None
    wandb: bool = True
    console: bool = True
    step_time_threshold: float = 0.2
    util_threshold_pct: float = 15.0
    clock_threshold: float = 0.15
    write_rank: int = 0
    stale_after_s: Optional[float] = None

    def __post_init__(self) -> None:
        for name in ("enabled", "wandb", "console"):
            _require(self, name, isinstance(getattr(self, name), bool), "must be True or False")
        _require(self, "interval_s", is_finite(self.interval_s) and 0 < self.interval_s <= MAX_INTERVAL_S,
                 f"must be a number in (0, {MAX_INTERVAL_S:g}] (seconds)")
        _require(self, "log_interval", is_int(self.log_interval) and self.log_interval >= 1,
                 "must be an int >= 1 (steps)")
        for name in ("jsonl_path", "tensorboard_dir"):
            _require(self, name, _is_path(getattr(self, name)), "must be a non-empty path, or None to write none")
        _require(self, "step_time_threshold", is_finite(self.step_time_threshold) and self.step_time_threshold > 0,
                 "must be a finite number > 0 (a fraction of the median)")
        _require(self, "util_threshold_pct", is_finite(self.util_threshold_pct) and 0 < self.util_threshold_pct <= 100,
                 "must be a number in (0, 100] (percentage points)")
        _require(self, "clock_threshold", is_number(self.clock_threshold) and 0 < self.clock_threshold < 1,
                 "must be a number in (0, 1) (a fraction of the median)")
        _require(self, "write_rank", is_int(self.write_rank) and self.write_rank >= 0, "must be an int >= 0 (a rank)")
        _require(
            self, "stale_after_s",
            self.stale_after_s is None or is_finite(self.stale_after_s) and self.stale_after_s > self.interval_s,
            f"must be a finite number > interval_s={self.interval_s!r} (a sample is up to one sampling interval old "
            "by design), or None for the default",
        )

    @property
    def stale_threshold_s(self) -> float:
        """Seconds without a fresh sample after which a rank's samples are stale (see ``stale_after_s``)."""
        return self.stale_after_s if self.stale_after_s is not None else max(3.0 * self.interval_s, 1.0)


def add_monitor_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``--lighthouse-monitor*`` flags to ``parser`` and return it.

    Usable as (part of) Megatron-LM's ``extra_args_provider``. :meth:`GPUMonitor.from_args` reads them,
    together with Megatron's ``--log-interval``, ``--tensorboard-dir`` and ``--save`` when present.
    """
    group = parser.add_argument_group("lighthouse GPU monitor")
    group.add_argument(
        "--lighthouse-monitor",
        action="store_true",
        help="Sample per-rank GPU utilization, memory, power, clocks, temperature and throttling with NVML; "
        "aggregate across ranks every --log-interval steps, name stragglers, write JSONL/TensorBoard/W&B.",
    )
    group.add_argument(
        "--lighthouse-monitor-interval",
        type=float,
        default=1.0,
        help="Seconds between two NVML samples of each rank's GPU (default: 1.0).",
    )
    group.add_argument(
        "--lighthouse-monitor-dir",
        default=None,
        help=f"Directory of the run log {JSONL_NAME} (default: --tensorboard-dir, else --save, else "
        "./lighthouse_monitor).",
    )
    group.add_argument(
        "--lighthouse-monitor-step-threshold",
        type=float,
        default=MonitorConfig.step_time_threshold,
        help="Straggler when a rank's step time exceeds the other ranks' median by this fraction (default: 0.2).",
    )
    group.add_argument(
        "--lighthouse-monitor-util-threshold",
        type=float,
        default=MonitorConfig.util_threshold_pct,
        help="Straggler when a rank's GPU utilization is this many points below the others' median (default: 15).",
    )
    return parser


#: The command-line flag of each :class:`MonitorConfig` field that :func:`config_from_args` fills from one.
_FLAG_OF = {"interval_s": "--lighthouse-monitor-interval", "log_interval": "--log-interval",
            "step_time_threshold": "--lighthouse-monitor-step-threshold",
            "util_threshold_pct": "--lighthouse-monitor-util-threshold"}


def config_from_args(args: Any) -> MonitorConfig:
    """:class:`MonitorConfig` from parsed flags (those of :func:`add_monitor_args`, plus Megatron's).

    A bad value is a ``ValueError`` that names its flag (``--lighthouse-monitor-interval 0.0: must be a number
    in (0, 3600] (seconds)``)."""
    directory = (
        getattr(args, "lighthouse_monitor_dir", None)
        or getattr(args, "tensorboard_dir", None)
        or getattr(args, "save", None)
        or "lighthouse_monitor"
    )
    try:
        return MonitorConfig(
            enabled=bool(getattr(args, "lighthouse_monitor", False)),
            interval_s=getattr(args, "lighthouse_monitor_interval", MonitorConfig.interval_s),
            log_interval=getattr(args, "log_interval", None) or MonitorConfig.log_interval,
            jsonl_path=os.path.join(directory, JSONL_NAME),
            step_time_threshold=getattr(args, "lighthouse_monitor_step_threshold", MonitorConfig.step_time_threshold),
            util_threshold_pct=getattr(args, "lighthouse_monitor_util_threshold", MonitorConfig.util_threshold_pct),
        )
    except MonitorSettingError as err:
        raise ValueError(f"{_FLAG_OF.get(err.name, err.name)} {err.value!r}: {err.rule}") from None
