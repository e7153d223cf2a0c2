"""One reading of one GPU (:class:`GPUSample`) and the per-metric-guarded reader that takes it."""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

from .backend import METRICS, GPUBackend, MetricUnsupported, decode_throttle
from .config import is_int, is_number

logger = logging.getLogger(__name__)

_MIB = 1024 * 1024


@dataclasses.dataclass
class GPUSample:
    """Metrics of one GPU at one instant; ``None`` where the device does not report the metric.

    Units: percent, MiB, watts, MHz, degrees Celsius, MiB/s. ``time`` is Unix time in seconds.
    """

    time: float
    gpu_util_pct: Optional[float] = None
    mem_util_pct: Optional[float] = None
    mem_used_mib: Optional[float] = None
    mem_total_mib: Optional[float] = None
    power_w: Optional[float] = None
    sm_clock_mhz: Optional[float] = None
    temperature_c: Optional[float] = None
    throttle_mask: Optional[int] = None
    pcie_tx_mib_s: Optional[float] = None
    pcie_rx_mib_s: Optional[float] = None
    nvlink_tx_mib_s: Optional[float] = None
    nvlink_rx_mib_s: Optional[float] = None

    @property
    def throttle_reasons(self) -> List[str]:
        """Decoded :attr:`throttle_mask` (empty when not reported)."""
        return [] if self.throttle_mask is None else decode_throttle(self.throttle_mask)

    def to_dict(self) -> Dict[str, Any]:
        out = dataclasses.asdict(self)
        out["throttle_reasons"] = self.throttle_reasons
        return out


#: Numeric sample fields, in a fixed order (the aggregation packs them in this order).
SAMPLE_FIELDS = tuple(f.name for f in dataclasses.fields(GPUSample) if f.name not in ("time", "throttle_mask"))


def _number(value: Any) -> float:
    """``value`` (an int or float from a backend) as a float; ``ValueError`` unless it is a finite number >= 0
    (a string, ``None``, a bool, NaN, an infinity or a negative number is a bad reading)."""
    if not is_number(value):
        raise ValueError(f"bad value {value!r}: not a number")
    out = float(value)
    if not (math.isfinite(out) and out >= 0):
        raise ValueError(f"bad value {value!r}: not a finite number >= 0")
    return out


def _pair(value: Any) -> Tuple[float, float]:
    """``value`` (a 2-tuple or list of numbers) as two floats; ``ValueError`` otherwise (see :func:`_number`)."""
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ValueError(f"bad value {value!r}: not a pair of numbers")
    return _number(value[0]), _number(value[1])


def _mask(value: Any) -> int:
    """``value`` as a throttle bit mask; ``ValueError`` unless it is an int >= 0."""
    if not is_int(value) or value < 0:
        raise ValueError(f"bad value {value!r}: not a bit mask (an int >= 0)")
    return int(value)


class DeviceReader:
    """Reads :class:`GPUSample` s of one device; each metric fails on its own and :meth:`read` never raises.

    A metric the device does not support is warned about once and not queried again. Any other error of a
    metric, from the query or from a value that is not what the backend promises (a string, ``None``, NaN,
    a negative number, a malformed pair), is warned about once per metric and leaves that metric ``None``
    in the sample, other metrics intact; the metric is queried again at the next sample.
    """

    def __init__(self, backend: GPUBackend, index: int) -> None:
        self.backend = backend
        self.index = index
        self.unsupported: Set[str] = set()
        self._warned: Set[str] = set()
        self._nvlink_last: Optional[Tuple[float, float, float]] = None
        #: Per metric: raw backend value -> ``{GPUSample field: value}``; raises ``ValueError`` on a bad value.
        self._convert: Dict[str, Callable[[Any], Dict[str, Any]]] = {
            "utilization": lambda v: dict(zip(("gpu_util_pct", "mem_util_pct"), _pair(v))),
            "memory": lambda v: {k: x / _MIB for k, x in zip(("mem_used_mib", "mem_total_mib"), _pair(v))},
            "power_w": lambda v: {"power_w": _number(v)},
            "sm_clock_mhz": lambda v: {"sm_clock_mhz": _number(v)},
            "temperature_c": lambda v: {"temperature_c": _number(v)},
            "throttle_mask": lambda v: {"throttle_mask": _mask(v)},
            "pcie_kib_s": lambda v: {k: x / 1024.0 for k, x in zip(("pcie_tx_mib_s", "pcie_rx_mib_s"), _pair(v))},
            "nvlink_kib_total": self._nvlink_rates,
        }

    def _warn_once(self, metric: str, message: str, *args: Any) -> None:
        if metric not in self._warned:
            self._warned.add(metric)
            logger.warning(message, *args)

    def _nvlink_rates(self, totals: Any) -> Dict[str, float]:
        """NVLink tx/rx MiB/s from two readings of the cumulative KiB counters (none at the first reading)."""
        tx, rx = _pair(totals)
        clock = time.monotonic()
        out = {}
        if self._nvlink_last is not None and clock > self._nvlink_last[0]:
            last_clock, last_tx, last_rx = self._nvlink_last
            dt = clock - last_clock
            out = {"nvlink_tx_mib_s": max(tx - last_tx, 0) / 1024.0 / dt,
                   "nvlink_rx_mib_s": max(rx - last_rx, 0) / 1024.0 / dt}
        self._nvlink_last = (clock, tx, rx)
        return out

    def read(self) -> GPUSample:
        """Query every metric once and return the sample (never raises: failing metrics stay ``None``)."""
        sample = GPUSample(time=time.time())
        for metric in METRICS:
            if metric in self.unsupported:
                continue
            try:
                fields = self._convert[metric](getattr(self.backend, metric)(self.index))
            except MetricUnsupported as exc:
                self.unsupported.add(metric)
                self._warn_once(
                    metric, "GPU monitor: GPU %d does not report %s (%s); not recorded", self.index, metric, exc
                )
                continue
            except Exception as exc:  # noqa: BLE001 - a failing metric must never stop the sampler or training
                self._warn_once(
                    metric, "GPU monitor: %s of GPU %d failed (%r); not recorded while it fails (warned once)",
                    metric, self.index, exc,
                )
                continue
            for field, value in fields.items():
                setattr(sample, field, value)
        return sample
