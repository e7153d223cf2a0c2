"""One reading of one GPU (:class:`GPUSample`) and the per-metric-guarded reader that takes it."""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Dict, List, Optional, Set, Tuple

from .backend import METRICS, GPUBackend, MetricUnsupported, decode_throttle

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


class DeviceReader:
    """Reads :class:`GPUSample` s of one device; each metric fails on its own.

    A metric the device does not support is warned about once and not queried again; any other error
    of a metric is warned about once and leaves that metric ``None`` in the sample, other metrics intact.
    """

    def __init__(self, backend: GPUBackend, index: int) -> None:
        self.backend = backend
        self.index = index
        self.unsupported: Set[str] = set()
        self._warned: Set[str] = set()
        self._nvlink_last: Optional[Tuple[float, int, int]] = None

    def _warn_once(self, metric: str, message: str, *args: Any) -> None:
        if metric not in self._warned:
            self._warned.add(metric)
            logger.warning(message, *args)

    def _query(self, metric: str) -> Any:
        if metric in self.unsupported:
            return None
        try:
            return getattr(self.backend, metric)(self.index)
        except MetricUnsupported as exc:
            self.unsupported.add(metric)
            self._warn_once(
                metric, "GPU monitor: GPU %d does not report %s (%s); not recorded", self.index, metric, exc
            )
        except Exception as exc:  # noqa: BLE001 - a failing metric must never stop the sampler or training
            self._warn_once(metric, "GPU monitor: reading %s of GPU %d failed: %r", metric, self.index, exc)
        return None

    def read(self) -> GPUSample:
        """Query every metric once and return the sample."""
        now = time.time()
        values = {metric: self._query(metric) for metric in METRICS}
        sample = GPUSample(time=now)
        if values["utilization"] is not None:
            sample.gpu_util_pct, sample.mem_util_pct = (float(v) for v in values["utilization"])
        if values["memory"] is not None:
            sample.mem_used_mib, sample.mem_total_mib = (v / _MIB for v in values["memory"])
        for metric in ("power_w", "sm_clock_mhz", "temperature_c"):
            if values[metric] is not None:
                setattr(sample, metric, float(values[metric]))
        sample.throttle_mask = values["throttle_mask"]
        if values["pcie_kib_s"] is not None:
            sample.pcie_tx_mib_s, sample.pcie_rx_mib_s = (v / 1024.0 for v in values["pcie_kib_s"])
        if values["nvlink_kib_total"] is not None:
            tx, rx = values["nvlink_kib_total"]
            clock = time.monotonic()
            if self._nvlink_last is not None and clock > self._nvlink_last[0]:
                last_clock, last_tx, last_rx = self._nvlink_last
                dt = clock - last_clock
                sample.nvlink_tx_mib_s = max(tx - last_tx, 0) / 1024.0 / dt
                sample.nvlink_rx_mib_s = max(rx - last_rx, 0) / 1024.0 / dt
            self._nvlink_last = (clock, tx, rx)
        return sample
