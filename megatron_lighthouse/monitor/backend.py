"""GPU metric backends: the interface the sampler reads through, and its NVML implementation.

A backend answers one query per metric and per device (devices are numbered the way NVML numbers them,
i.e. every GPU of the node, independent of ``CUDA_VISIBLE_DEVICES``). A query the device cannot answer
raises :class:`MetricUnsupported`; a backend that cannot start at all raises :class:`BackendUnavailable`
from :meth:`GPUBackend.init`. Tests inject :class:`~megatron_lighthouse.monitor.fake.FakeNVMLBackend`
through the same interface.
"""

from __future__ import annotations

import abc
import os
from typing import Any, List, Optional, Tuple

#: Metric names, in the order the sampler reads them; each maps to one backend method of the same name.
METRICS = (
    "utilization",
    "memory",
    "power_w",
    "sm_clock_mhz",
    "temperature_c",
    "throttle_mask",
    "pcie_kib_s",
    "nvlink_kib_total",
)

#: Clock throttle ("clocks event") reason bits, as NVML defines them, and the names the monitor records.
THROTTLE_REASONS = {
    0x001: "gpu_idle",
    0x002: "applications_clocks",
    0x004: "sw_power_cap",
    0x008: "hw_slowdown",
    0x010: "sync_boost",
    0x020: "sw_thermal",
    0x040: "hw_thermal",
    0x080: "hw_power_brake",
    0x100: "display_clock",
}

#: Reasons that single out a GPU as slowed down. The software power cap is left out: under a heavy load it
#: is active on most GPUs of a job at once and slows none of them relative to the others.
SLOWDOWN_REASONS = frozenset({"hw_slowdown", "sw_thermal", "hw_thermal", "hw_power_brake"})


class BackendUnavailable(RuntimeError):
    """The backend cannot be used on this machine (no library, no driver, no permission)."""


class MetricUnsupported(RuntimeError):
    """The device does not report this metric."""


def decode_throttle(mask: int) -> List[str]:
    """Names of the reason bits set in an NVML clocks-event ``mask`` (unknown bits as ``"0x..."``)."""
    names = [name for bit, name in THROTTLE_REASONS.items() if mask & bit]
    unknown = mask & ~sum(THROTTLE_REASONS)
    if unknown:
        names.append(hex(unknown))
    return names


class GPUBackend(abc.ABC):
    """One source of per-device GPU metrics. ``index`` is the node-wide (NVML) device index."""

    @abc.abstractmethod
    def init(self) -> None:
        """Start the backend; raise :class:`BackendUnavailable` when it cannot run here."""

    @abc.abstractmethod
    def shutdown(self) -> None:
        """Release the backend (safe to call once after a successful :meth:`init`)."""

    @abc.abstractmethod
    def device_count(self) -> int:
        """Number of GPUs on this node."""

    @abc.abstractmethod
    def device_name(self, index: int) -> str:
        """Product name, e.g. ``"NVIDIA H100 80GB HBM3"``."""

    @abc.abstractmethod
    def device_uuid(self, index: int) -> str:
        """Device UUID as NVML prints it (``"GPU-..."``)."""

    @abc.abstractmethod
    def utilization(self, index: int) -> Tuple[int, int]:
        """``(gpu %, memory-controller %)`` over the driver's last sample period."""

    @abc.abstractmethod
    def memory(self, index: int) -> Tuple[int, int]:
        """``(used bytes, total bytes)`` of device memory."""

    @abc.abstractmethod
    def power_w(self, index: int) -> float:
        """Board power draw in watts."""

    @abc.abstractmethod
    def sm_clock_mhz(self, index: int) -> int:
        """Current SM clock in MHz."""

    @abc.abstractmethod
    def temperature_c(self, index: int) -> int:
        """GPU core temperature in degrees Celsius."""

    @abc.abstractmethod
    def throttle_mask(self, index: int) -> int:
        """Current clocks-event (throttle) reason bit mask; decode with :func:`decode_throttle`."""

    @abc.abstractmethod
    def pcie_kib_s(self, index: int) -> Tuple[int, int]:
        """``(tx, rx)`` PCIe throughput in KiB/s over the driver's last sample period."""

    @abc.abstractmethod
    def nvlink_kib_total(self, index: int) -> Tuple[int, int]:
        """``(tx, rx)`` NVLink data counters in KiB, cumulative over all links (rates come from deltas)."""


class NVMLBackend(GPUBackend):
    """:class:`GPUBackend` over ``nvidia-ml-py`` (module ``pynvml``)."""

    def __init__(self) -> None:
        self._nvml: Any = None
        self._handles: dict = {}

    def init(self) -> None:
        try:
            import pynvml
        except ImportError as exc:  # the package itself is missing
            raise BackendUnavailable(f"nvidia-ml-py is not installed ({exc})") from exc
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as exc:  # no library, no driver, no permission, ...
            raise BackendUnavailable(f"NVML init failed: {exc}") from exc
        except OSError as exc:
            raise BackendUnavailable(f"NVML could not be loaded: {exc}") from exc
        self._nvml = pynvml

    def shutdown(self) -> None:
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except self._nvml.NVMLError:
                pass  # shutting down a library that already went away is not an error for the monitor
            self._nvml = None
            self._handles.clear()

    def _call(self, fn_name: str, *args: Any) -> Any:
        """Call ``pynvml.<fn_name>``; NVML's "not supported" becomes :class:`MetricUnsupported`."""
        nvml = self._nvml
        try:
            return getattr(nvml, fn_name)(*args)
        except nvml.NVMLError_NotSupported as exc:
            raise MetricUnsupported(f"{fn_name}: {exc}") from exc
        except nvml.NVMLError_FunctionNotFound as exc:
            raise MetricUnsupported(f"{fn_name}: not in this driver ({exc})") from exc

    def _handle(self, index: int) -> Any:
        handle = self._handles.get(index)
        if handle is None:
            handle = self._handles[index] = self._call("nvmlDeviceGetHandleByIndex", index)
        return handle

    def device_count(self) -> int:
        return int(self._call("nvmlDeviceGetCount"))

    def device_name(self, index: int) -> str:
        return _text(self._call("nvmlDeviceGetName", self._handle(index)))

    def device_uuid(self, index: int) -> str:
        return _text(self._call("nvmlDeviceGetUUID", self._handle(index)))

    def utilization(self, index: int) -> Tuple[int, int]:
        rates = self._call("nvmlDeviceGetUtilizationRates", self._handle(index))
        return int(rates.gpu), int(rates.memory)

    def memory(self, index: int) -> Tuple[int, int]:
        info = self._call("nvmlDeviceGetMemoryInfo", self._handle(index))
        return int(info.used), int(info.total)

    def power_w(self, index: int) -> float:
        return self._call("nvmlDeviceGetPowerUsage", self._handle(index)) / 1000.0

    def sm_clock_mhz(self, index: int) -> int:
        return int(self._call("nvmlDeviceGetClockInfo", self._handle(index), self._nvml.NVML_CLOCK_SM))

    def temperature_c(self, index: int) -> int:
        return int(self._call("nvmlDeviceGetTemperature", self._handle(index), self._nvml.NVML_TEMPERATURE_GPU))

    def throttle_mask(self, index: int) -> int:
        name = "nvmlDeviceGetCurrentClocksEventReasons"
        if not hasattr(self._nvml, name):  # bindings older than the rename
            name = "nvmlDeviceGetCurrentClocksThrottleReasons"
        return int(self._call(name, self._handle(index)))

    def pcie_kib_s(self, index: int) -> Tuple[int, int]:
        handle = self._handle(index)
        tx = self._call("nvmlDeviceGetPcieThroughput", handle, self._nvml.NVML_PCIE_UTIL_TX_BYTES)
        rx = self._call("nvmlDeviceGetPcieThroughput", handle, self._nvml.NVML_PCIE_UTIL_RX_BYTES)
        return int(tx), int(rx)

    def nvlink_kib_total(self, index: int) -> Tuple[int, int]:
        nvml = self._nvml
        all_links = 0xFFFFFFFF  # scope id meaning "summed over every link"
        fields = [
            (nvml.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX, all_links),
            (nvml.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX, all_links),
        ]
        values = self._call("nvmlDeviceGetFieldValues", self._handle(index), fields)
        out = []
        for value in values:
            if value.nvmlReturn != nvml.NVML_SUCCESS:
                raise MetricUnsupported(f"NVLink throughput field {value.fieldId}: NVML return {value.nvmlReturn}")
            out.append(int(value.value.ullVal))
        return out[0], out[1]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _strip_uuid(uuid: str) -> str:
    for prefix in ("GPU-", "MIG-"):
        if uuid.startswith(prefix):
            return uuid[len(prefix):]
    return uuid


def torch_uuid(cuda_index: int) -> Optional[str]:
    """UUID of CUDA device ``cuda_index`` as torch sees it, or ``None`` without CUDA."""
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        uuid = getattr(torch.cuda.get_device_properties(cuda_index), "uuid", None)
    except (RuntimeError, AssertionError, ImportError):
        return None
    return None if uuid is None else str(uuid)


def resolve_nvml_index(backend: GPUBackend, cuda_index: int) -> int:
    """Node-wide (NVML) index of the GPU that this process calls ``cuda:<cuda_index>``.

    CUDA numbering depends on ``CUDA_VISIBLE_DEVICES`` and ``CUDA_DEVICE_ORDER``; NVML numbering does not.
    The UUID that torch reports is matched first; then ``CUDA_VISIBLE_DEVICES`` (indices or UUIDs) is
    read; otherwise the two numberings are taken to agree.
    """
    count = backend.device_count()
    wanted = torch_uuid(cuda_index)
    if wanted is None:
        visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
        if cuda_index < len(visible):
            entry = visible[cuda_index]
            if entry.isdigit():
                return int(entry) if int(entry) < count else cuda_index
            wanted = entry
    if wanted is not None:
        uuids = [_strip_uuid(backend.device_uuid(i)) for i in range(count)]
        key = _strip_uuid(wanted)
        for i, uuid in enumerate(uuids):
            if uuid.startswith(key):
                return i
    if not 0 <= cuda_index < count:
        raise ValueError(f"GPU index {cuda_index} is out of range: this node has {count} GPU(s)")
    return cuda_index
