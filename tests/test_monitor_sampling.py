"""GPU monitor, one process: backends, per-metric error handling, the sampling thread, settings."""

from __future__ import annotations

import argparse
import logging
import time
import types

import pytest

from megatron_lighthouse.monitor import (
    DeviceReader,
    FakeGPU,
    FakeNVMLBackend,
    GPUMonitor,
    GPUSampler,
    MonitorConfig,
    NVMLBackend,
    add_monitor_args,
    config_from_args,
    decode_throttle,
)
from megatron_lighthouse.monitor.backend import resolve_nvml_index

pynvml = pytest.importorskip("pynvml")


def _warnings(caplog: pytest.LogCaptureFixture) -> list:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_decode_throttle_names_bits_and_keeps_unknown_ones():
    assert decode_throttle(0) == []
    assert decode_throttle(0x004 | 0x040) == ["sw_power_cap", "hw_thermal"]
    assert decode_throttle(0x001 | 0x1000) == ["gpu_idle", "0x1000"]


def test_reader_converts_units_and_rates():
    gpu = FakeGPU(gpu_util=77, mem_util=33, mem_used_gib=12.0, mem_total_gib=80.0, power_w=412.5,
                  sm_clock_mhz=1755, temperature_c=71, throttle_mask=0x20, pcie_kib_s=(2048, 4096),
                  nvlink_kib_s=(10240, 5120))
    reader = DeviceReader(FakeNVMLBackend([gpu]), 0)
    first = reader.read()
    assert (first.gpu_util_pct, first.mem_util_pct) == (77.0, 33.0)
    assert first.mem_used_mib == pytest.approx(12 * 1024) and first.mem_total_mib == pytest.approx(80 * 1024)
    assert (first.power_w, first.sm_clock_mhz, first.temperature_c) == (412.5, 1755.0, 71.0)
    assert first.throttle_reasons == ["sw_thermal"]
    assert (first.pcie_tx_mib_s, first.pcie_rx_mib_s) == (2.0, 4.0)
    assert first.nvlink_tx_mib_s is None  # a rate needs two readings of the cumulative counter
    time.sleep(0.2)
    second = reader.read()
    assert second.nvlink_tx_mib_s == pytest.approx(10.0, rel=0.05)  # 10240 KiB/s
    assert second.nvlink_rx_mib_s == pytest.approx(5.0, rel=0.05)


def test_unsupported_metric_is_warned_once_and_not_queried_again(caplog):
    backend = FakeNVMLBackend([FakeGPU(unsupported=frozenset({"nvlink_kib_total"}), broken=frozenset({"power_w"}))])
    reader = DeviceReader(backend, 0)
    with caplog.at_level(logging.WARNING):
        samples = [reader.read() for _ in range(4)]
    assert all(s.nvlink_tx_mib_s is None and s.power_w is None for s in samples)
    assert all(s.gpu_util_pct == 90.0 and s.temperature_c == 60.0 for s in samples)  # the others still read
    assert backend.calls["nvlink_kib_total"] == 1  # unsupported: asked once
    assert backend.calls["power_w"] == 4  # failing for another reason: retried every sample
    messages = _warnings(caplog)
    assert len(messages) == 2
    assert any("nvlink_kib_total" in m for m in messages) and any("power_w" in m for m in messages)


def _patch_nvml(monkeypatch, **overrides):
    """Make pynvml answer from Python: one device; ``overrides`` replace single NVML functions."""
    rates = types.SimpleNamespace(gpu=55, memory=21)
    memory = types.SimpleNamespace(used=3 * 1024**3, total=80 * 1024**3)
    answers = {
        "nvmlInit": lambda: None,
        "nvmlShutdown": lambda: None,
        "nvmlDeviceGetCount": lambda: 1,
        "nvmlDeviceGetHandleByIndex": lambda i: ("handle", i),
        "nvmlDeviceGetName": lambda h: "Patched GPU",
        "nvmlDeviceGetUUID": lambda h: "GPU-1234",
        "nvmlDeviceGetUtilizationRates": lambda h: rates,
        "nvmlDeviceGetMemoryInfo": lambda h: memory,
        "nvmlDeviceGetPowerUsage": lambda h: 301_500,
        "nvmlDeviceGetClockInfo": lambda h, kind: 1410,
        "nvmlDeviceGetTemperature": lambda h, sensor: 64,
        "nvmlDeviceGetCurrentClocksEventReasons": lambda h: 0x8,
        "nvmlDeviceGetPcieThroughput": lambda h, counter: 1024,
    }
    answers.update(overrides)
    for name, fn in answers.items():
        monkeypatch.setattr(pynvml, name, fn, raising=False)


def _raise(code):
    def fn(*args):
        raise pynvml.NVMLError(code)

    return fn


def test_nvml_backend_reads_and_maps_not_supported(monkeypatch, caplog):
    unsupported_field = types.SimpleNamespace(nvmlReturn=pynvml.NVML_ERROR_NOT_SUPPORTED, fieldId=138,
                                              value=types.SimpleNamespace(ullVal=0))
    _patch_nvml(
        monkeypatch,
        nvmlDeviceGetPowerUsage=_raise(pynvml.NVML_ERROR_NOT_SUPPORTED),
        nvmlDeviceGetFieldValues=lambda h, fields: [unsupported_field, unsupported_field],
        nvmlDeviceGetTemperature=_raise(pynvml.NVML_ERROR_GPU_IS_LOST),
    )
    backend = NVMLBackend()
    backend.init()
    reader = DeviceReader(backend, 0)
    with caplog.at_level(logging.WARNING):
        sample = reader.read()
        reader.read()
    assert (sample.gpu_util_pct, sample.mem_util_pct, sample.sm_clock_mhz) == (55.0, 21.0, 1410.0)
    assert sample.mem_used_mib == 3 * 1024 and sample.throttle_reasons == ["hw_slowdown"]
    assert sample.pcie_tx_mib_s == 1.0
    assert sample.power_w is None and sample.temperature_c is None and sample.nvlink_tx_mib_s is None
    assert reader.unsupported == {"power_w", "nvlink_kib_total"}  # GPU lost is an error, not "unsupported"
    assert len(_warnings(caplog)) == 3
    backend.shutdown()


def test_resolve_nvml_index_follows_cuda_visible_devices(monkeypatch):
    backend = FakeNVMLBackend([FakeGPU()] * 4)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,1")
    assert resolve_nvml_index(backend, 0) == 3
    assert resolve_nvml_index(backend, 1) == 1
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", backend.device_uuid(2))
    assert resolve_nvml_index(backend, 0) == 2
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert resolve_nvml_index(backend, 2) == 2
    with pytest.raises(ValueError, match="out of range"):
        resolve_nvml_index(backend, 7)


def test_sampler_thread_samples_at_its_interval_and_stops():
    backend = FakeNVMLBackend([FakeGPU(wobble=20.0)])
    with GPUSampler(DeviceReader(backend, 0), interval_s=0.02) as sampler:
        assert sampler.running
        time.sleep(0.4)
    assert not sampler.running
    taken = sampler.samples_taken
    assert 5 <= taken <= 25  # ~20 at 50 Hz; loose for a loaded CI machine
    samples = sampler.drain()
    assert len(samples) == taken and sampler.drain() == []
    times = [s.time for s in samples]
    assert times == sorted(times)
    assert len({s.gpu_util_pct for s in samples}) > 1  # the wobble shows: samples are fresh readings
    time.sleep(0.05)
    assert sampler.samples_taken == taken  # stopped means stopped


def test_monitor_measures_step_time_and_reuses_the_latest_sample():
    backend = FakeNVMLBackend([FakeGPU(gpu_util=64)])
    config = MonitorConfig(interval_s=30.0, log_interval=3, console=False, wandb=False)
    records = []
    with GPUMonitor(config, backend=backend, device=0) as monitor:
        for it in range(1, 7):
            time.sleep(0.03)
            records.append(monitor.step(it))
    assert [r is None for r in records] == [True, True, False, True, True, False]
    first, second = records[2]["ranks"][0], records[5]["ranks"][0]
    assert first["steps"] == 2 and second["steps"] == 3  # the first call has no previous step to time
    assert 0.03 <= first["step_time_s"] < 0.2 and 0.03 <= second["step_time_s"] < 0.2
    # sampling every 30 s: one sample at start, reused by the second interval
    assert first["samples"] == 1 and second["samples"] == 1 and second["gpu_util_pct"] == 64.0


def test_config_rejects_bad_settings():
    with pytest.raises(ValueError, match="interval_s=0"):
        MonitorConfig(interval_s=0)
    with pytest.raises(ValueError, match="log_interval=0"):
        MonitorConfig(log_interval=0)
    with pytest.raises(ValueError, match="step_time_threshold=-0.1"):
        MonitorConfig(step_time_threshold=-0.1)
    with pytest.raises(ValueError, match="util_threshold_pct=0"):
        MonitorConfig(util_threshold_pct=0)
    with pytest.raises(ValueError, match="clock_threshold=1.5"):
        MonitorConfig(clock_threshold=1.5)
    with pytest.raises(ValueError, match="unsupported"):
        FakeGPU(unsupported=frozenset({"fan_speed"}))


def test_flags_and_from_args(tmp_path):
    parser = add_monitor_args(argparse.ArgumentParser())
    parser.add_argument("--log-interval", type=int, default=100)
    parser.add_argument("--save", default=None)
    args = parser.parse_args(
        ["--lighthouse-monitor", "--lighthouse-monitor-interval", "0.5", "--log-interval", "7", "--save", str(tmp_path)]
    )
    config = config_from_args(args)
    assert config.enabled and config.interval_s == 0.5 and config.log_interval == 7
    assert config.jsonl_path == str(tmp_path / "gpu_monitor.jsonl")

    with pytest.raises(ValueError, match=r"^--log-interval -2: must be an int >= 1 \(steps\)$"):
        config_from_args(parser.parse_args(["--lighthouse-monitor", "--log-interval", "-2"]))

    off = parser.parse_args([])
    backend = FakeNVMLBackend()
    monitor = GPUMonitor.from_args(off, backend=backend).start()
    assert not monitor.config.enabled and not backend.initialized
    assert monitor.step(100) is None and monitor.sampler is None
    monitor.stop()
