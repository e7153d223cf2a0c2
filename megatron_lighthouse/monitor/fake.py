"""A scripted :class:`GPUBackend` for tests and for running the monitor where there is no GPU."""

from __future__ import annotations

import collections
import dataclasses
import math
import time
from typing import Counter, FrozenSet, Optional, Sequence, Tuple

from .backend import METRICS, BackendUnavailable, GPUBackend, MetricUnsupported

_GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class FakeGPU:
    """What one fake GPU reports. ``wobble`` adds a slow sine (10 s period) of that many percent to
    utilization, power and memory so timelines are not flat. Metrics named in ``unsupported`` raise
    :class:`MetricUnsupported`; metrics in ``broken`` raise ``RuntimeError`` on every query."""

    name: str = "Fake GPU 80GB"
    gpu_util: float = 90.0
    mem_util: float = 40.0
    mem_used_gib: float = 40.0
    mem_total_gib: float = 80.0
    power_w: float = 500.0
    sm_clock_mhz: int = 1980
    temperature_c: int = 60
    throttle_mask: int = 0
    pcie_kib_s: Tuple[int, int] = (1024, 2048)
    nvlink_kib_s: Tuple[int, int] = (1 << 20, 1 << 20)
    wobble: float = 0.0
    unsupported: FrozenSet[str] = frozenset()
    broken: FrozenSet[str] = frozenset()

    def __post_init__(self) -> None:
        for field in ("unsupported", "broken"):
            unknown = set(getattr(self, field)) - set(METRICS)
            if unknown:
                raise ValueError(f"FakeGPU.{field}={sorted(unknown)}: not metric names; choose from {METRICS}")


class FakeNVMLBackend(GPUBackend):
    """Fake GPUs behind the :class:`GPUBackend` interface.

    Args:
        gpus: one :class:`FakeGPU` per node-wide device index.
        init_error: when set, :meth:`init` raises :class:`BackendUnavailable` with this message
            (a machine without driver or permission).
        query_delay_s: sleep per metric query, to stand in for the driver's latency.
    """

    def __init__(
        self, gpus: Sequence[FakeGPU] = (FakeGPU(),), init_error: Optional[str] = None, query_delay_s: float = 0.0
    ) -> None:
        self.gpus = list(gpus)
        self.init_error = init_error
        self.query_delay_s = query_delay_s
        self.calls: Counter[str] = collections.Counter()
        self.initialized = False
        self._t0 = time.monotonic()

    def init(self) -> None:
        if self.init_error is not None:
            raise BackendUnavailable(self.init_error)
        self.initialized = True

    def shutdown(self) -> None:
        self.initialized = False

    def device_count(self) -> int:
        return len(self.gpus)

    def device_name(self, index: int) -> str:
        return self.gpus[index].name

    def device_uuid(self, index: int) -> str:
        return f"GPU-00000000-fake-0000-0000-{index:012d}"

    def _gpu(self, index: int, metric: str) -> FakeGPU:
        self.calls[metric] += 1
        if self.query_delay_s:
            time.sleep(self.query_delay_s)
        gpu = self.gpus[index]
        if metric in gpu.unsupported:
            raise MetricUnsupported(f"fake GPU {index} does not report {metric}")
        if metric in gpu.broken:
            raise RuntimeError(f"fake GPU {index}: {metric} is broken")
        return gpu

    def _wave(self, gpu: FakeGPU) -> float:
        return gpu.wobble * math.sin(2 * math.pi * (time.monotonic() - self._t0) / 10.0)

    def utilization(self, index: int) -> Tuple[int, int]:
        gpu = self._gpu(index, "utilization")
        return int(min(100.0, max(0.0, gpu.gpu_util + self._wave(gpu)))), int(gpu.mem_util)

    def memory(self, index: int) -> Tuple[int, int]:
        gpu = self._gpu(index, "memory")
        used = gpu.mem_used_gib * (1.0 + self._wave(gpu) / 100.0)
        return int(min(used, gpu.mem_total_gib) * _GIB), int(gpu.mem_total_gib * _GIB)

    def power_w(self, index: int) -> float:
        gpu = self._gpu(index, "power_w")
        return gpu.power_w * (1.0 + self._wave(gpu) / 100.0)

    def sm_clock_mhz(self, index: int) -> int:
        return self._gpu(index, "sm_clock_mhz").sm_clock_mhz

    def temperature_c(self, index: int) -> int:
        return self._gpu(index, "temperature_c").temperature_c

    def throttle_mask(self, index: int) -> int:
        return self._gpu(index, "throttle_mask").throttle_mask

    def pcie_kib_s(self, index: int) -> Tuple[int, int]:
        return self._gpu(index, "pcie_kib_s").pcie_kib_s

    def nvlink_kib_total(self, index: int) -> Tuple[int, int]:
        gpu = self._gpu(index, "nvlink_kib_total")
        elapsed = time.monotonic() - self._t0
        return int(gpu.nvlink_kib_s[0] * elapsed), int(gpu.nvlink_kib_s[1] * elapsed)
