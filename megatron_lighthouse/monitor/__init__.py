"""Per-rank GPU monitoring over NVML: sampling, cross-rank aggregation, stragglers, logs and reports.

Plain loop::

    from megatron_lighthouse.monitor import GPUMonitor, MonitorConfig

    config = MonitorConfig(interval_s=1.0, log_interval=50, jsonl_path="runs/a/gpu_monitor.jsonl")
    with GPUMonitor(config) as monitor:
        for it in range(1, steps + 1):
            train_step()
            monitor.step(it)

Megatron-LM: add the flags with :func:`add_monitor_args` (through ``extra_args_provider``), build with
``GPUMonitor.from_args(args).start()`` after initialization and call ``monitor.step(iteration)`` once per
iteration. Afterwards: ``python -m megatron_lighthouse.monitor report RUN.jsonl``.
"""

from .backend import BackendUnavailable, GPUBackend, MetricUnsupported, NVMLBackend, decode_throttle
from .config import MonitorConfig, add_monitor_args, config_from_args
from .fake import FakeGPU, FakeNVMLBackend
from .monitor import GPUMonitor
from .sample import DeviceReader, GPUSample
from .sampler import GPUSampler

__all__ = [
    "BackendUnavailable",
    "DeviceReader",
    "FakeGPU",
    "FakeNVMLBackend",
    "GPUBackend",
    "GPUMonitor",
    "GPUSample",
    "GPUSampler",
    "MetricUnsupported",
    "MonitorConfig",
    "NVMLBackend",
    "add_monitor_args",
    "config_from_args",
    "decode_throttle",
]
