"""``python -m megatron_lighthouse.monitor live``: a refreshing table of every GPU of this node."""

from __future__ import annotations

import socket
import time
from typing import List, Optional, TextIO

from .backend import GPUBackend
from .report import align
from .sample import DeviceReader, GPUSample

_CLEAR = "\x1b[H\x1b[2J"


def _cell(value: Optional[float], fmt: str = ".0f", scale: float = 1.0) -> str:
    return "-" if value is None else format(value * scale, fmt)


def gpu_table(names: List[str], samples: List[GPUSample]) -> str:
    """One row per GPU: utilization, memory, power, SM clock, temperature, throttling, PCIe and NVLink."""
    rows = [("gpu", "name", "util%", "mem busy%", "mem GiB", "power W", "SM MHz", "temp C", "PCIe tx/rx MiB/s",
             "NVLink tx/rx MiB/s", "throttle")]
    for index, (name, s) in enumerate(zip(names, samples)):
        mem = "-" if s.mem_used_mib is None else f"{s.mem_used_mib / 1024:.1f}/{s.mem_total_mib / 1024:.0f}"
        rows.append((
            str(index),
            name,
            _cell(s.gpu_util_pct),
            _cell(s.mem_util_pct),
            mem,
            _cell(s.power_w),
            _cell(s.sm_clock_mhz),
            _cell(s.temperature_c),
            f"{_cell(s.pcie_tx_mib_s)}/{_cell(s.pcie_rx_mib_s)}",
            f"{_cell(s.nvlink_tx_mib_s)}/{_cell(s.nvlink_rx_mib_s)}",
            ",".join(s.throttle_reasons) or "-",
        ))
    return align(rows, left=(1, 10))


def run_live(backend: GPUBackend, stream: TextIO, interval_s: float = 1.0, count: Optional[int] = None) -> None:
    """Print :func:`gpu_table` every ``interval_s`` seconds (``count`` times, or until interrupted).

    ``backend`` must be initialized; the screen is cleared between tables when ``stream`` is a terminal.
    """
    if not interval_s > 0:
        raise ValueError(f"interval_s={interval_s}: the refresh interval must be > 0 seconds")
    indices = range(backend.device_count())
    names = [backend.device_name(i) for i in indices]
    readers = [DeviceReader(backend, i) for i in indices]
    clear = stream.isatty()
    shown = 0
    while count is None or shown < count:
        samples = [reader.read() for reader in readers]
        head = f"{socket.gethostname()}  {time.strftime('%Y-%m-%d %H:%M:%S')}  {len(names)} GPU(s)"
        stream.write((_CLEAR if clear else "") + head + "\n" + gpu_table(names, samples) + "\n\n")
        stream.flush()
        shown += 1
        if count is None or shown < count:
            time.sleep(interval_s)
