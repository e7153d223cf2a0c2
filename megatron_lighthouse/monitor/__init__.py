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

import importlib

#: Public name -> the submodule that defines it. Each is imported on first use (PEP 562), so the command line
#: (``python -m megatron_lighthouse.monitor``) imports no torch: it starts at once, and Ctrl-C is never caught
#: inside torch's import.
_EXPORTS = {
    "BackendUnavailable": "backend",
    "GPUBackend": "backend",
    "MetricUnsupported": "backend",
    "NVMLBackend": "backend",
    "decode_throttle": "backend",
    "MonitorConfig": "config",
    "add_monitor_args": "config",
    "config_from_args": "config",
    "FakeGPU": "fake",
    "FakeNVMLBackend": "fake",
    "GPUMonitor": "monitor",
    "DeviceReader": "sample",
    "GPUSample": "sample",
    "GPUSampler": "sampler",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted({*globals(), *_EXPORTS})
