"""GPU monitor without NVML (no package, no library, no driver, no permission): one warning, then a no-op."""

from __future__ import annotations

import logging
import sys
import threading

import pytest

from megatron_lighthouse.monitor import FakeNVMLBackend, GPUMonitor, MonitorConfig, NVMLBackend

pynvml = pytest.importorskip("pynvml")


def _raising(code):
    def init():
        raise pynvml.NVMLError(code)

    return init


def _no_nvml_backends(monkeypatch):
    yield "fake backend, driver missing", FakeNVMLBackend(init_error="NVML Shared Library Not Found")
    for code in (pynvml.NVML_ERROR_LIBRARY_NOT_FOUND, pynvml.NVML_ERROR_DRIVER_NOT_LOADED,
                 pynvml.NVML_ERROR_NO_PERMISSION):
        monkeypatch.setattr(pynvml, "nvmlInit", _raising(code))
        yield f"NVML error {code}", NVMLBackend()
    monkeypatch.setitem(sys.modules, "pynvml", None)  # nvidia-ml-py not installed at all
    yield "no pynvml", NVMLBackend()


def test_without_nvml_one_warning_then_nothing(monkeypatch, tmp_path, caplog):
    for case, backend in _no_nvml_backends(monkeypatch):
        caplog.clear()
        jsonl = tmp_path / f"{len(case)}.jsonl"
        config = MonitorConfig(interval_s=0.001, log_interval=2, jsonl_path=str(jsonl), console=True)
        with caplog.at_level(logging.DEBUG, logger="megatron_lighthouse.monitor"):
            with GPUMonitor(config, backend=backend, device=0) as monitor:
                assert monitor.sampler is None and not monitor.active, case
                assert not any(t.name == "lighthouse-gpu-sampler" for t in threading.enumerate()), case
                results = [monitor.step(it) for it in range(1, 11)] + [monitor.log(10)]
            monitor.stop()  # a second stop is harmless
        assert results == [None] * 11, case
        assert not jsonl.exists(), case
        warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(warnings) == 1 and "NVML unavailable" in warnings[0], (case, warnings)


def test_context_manager_never_raises_for_a_failing_backend(caplog):
    class Exploding(FakeNVMLBackend):
        def device_count(self):
            raise RuntimeError("GPU has fallen off the bus")

    with caplog.at_level(logging.WARNING):
        with GPUMonitor(MonitorConfig(log_interval=1), backend=Exploding(), device=0) as monitor:
            assert monitor.step(1, step_time=0.1) is None
    assert sum("fallen off the bus" in r.getMessage() for r in caplog.records) == 1
