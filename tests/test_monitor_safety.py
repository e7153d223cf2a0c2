"""GPU monitor never raises into training: bad metric values, a dead or stalled sampler, file I/O off the
training thread."""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import threading
import time

import pytest

from megatron_lighthouse.monitor import DeviceReader, FakeGPU, FakeNVMLBackend, GPUMonitor, GPUSampler, MonitorConfig
from megatron_lighthouse.monitor.writers import TensorBoardWriter, WandbWriter, WriterThread, summary_line


def _quiet(**overrides) -> MonitorConfig:
    return MonitorConfig(**{"interval_s": 0.005, "log_interval": 1, "console": False, "wandb": False, **overrides})


def _warnings(caplog: pytest.LogCaptureFixture, text: str = "") -> list:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and text in r.getMessage()]


def _wait_until(condition, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def _scripted(metric: str, value) -> FakeNVMLBackend:
    """A fake GPU whose ``metric`` query answers ``value`` (or raises it, when it is an exception)."""

    def query(index):
        if isinstance(value, BaseException):
            raise value
        return value

    backend = FakeNVMLBackend([FakeGPU()])
    setattr(backend, metric, query)
    return backend


BAD_VALUES = [
    ("power_w", "412.5"),
    ("power_w", None),
    ("power_w", math.nan),
    ("power_w", math.inf),
    ("power_w", -3.0),
    ("power_w", True),
    ("power_w", ZeroDivisionError("driver bug")),
    ("utilization", "90"),
    ("utilization", (90,)),
    ("utilization", (90, None)),
    ("memory", None),
    ("throttle_mask", 0.5),
    ("pcie_kib_s", ("a", "b")),
    ("nvlink_kib_total", 7),
]
FIELDS = {
    "power_w": ("power_w",),
    "utilization": ("gpu_util_pct", "mem_util_pct"),
    "memory": ("mem_used_mib", "mem_total_mib"),
    "throttle_mask": ("throttle_mask",),
    "pcie_kib_s": ("pcie_tx_mib_s", "pcie_rx_mib_s"),
    "nvlink_kib_total": ("nvlink_tx_mib_s", "nvlink_rx_mib_s"),
}


@pytest.mark.parametrize("metric,value", BAD_VALUES, ids=lambda v: repr(v)[:20])
def test_reader_drops_a_bad_value_and_warns_once(metric, value, caplog):
    reader = DeviceReader(_scripted(metric, value), 0)
    with caplog.at_level(logging.WARNING):
        samples = [reader.read() for _ in range(3)]
    for sample in samples:
        assert all(getattr(sample, field) is None for field in FIELDS[metric]), sample
        assert sample.sm_clock_mhz == 1980.0 and sample.temperature_c == 60.0  # the other metrics still read
        if metric != "power_w":
            assert sample.power_w == 500.0
    messages = _warnings(caplog)
    assert len(messages) == 1 and metric in messages[0], messages


def test_step_keeps_working_when_metrics_return_garbage_or_raise(caplog):
    class Garbage(FakeNVMLBackend):
        def power_w(self, index):
            return "garbage"

        def temperature_c(self, index):
            raise ValueError("sensor returned nonsense")

    with caplog.at_level(logging.WARNING):
        with GPUMonitor(_quiet(log_interval=2), backend=Garbage([FakeGPU(gpu_util=70)]), device=0) as monitor:
            records = []
            for it in range(1, 9):
                time.sleep(0.01)
                records.append(monitor.step(it, step_time=0.1))
            assert monitor.sampler.running and monitor.sampler.samples_taken > 1
    entries = [r["ranks"][0] for r in records if r is not None]
    assert len(entries) == 4
    for entry in entries:
        assert entry["gpu_util_pct"] == 70.0 and entry["sm_clock_mhz"] == 1980.0 and entry["samples"] >= 1
        assert entry["power_w"] is None and entry["temperature_c"] is None and not entry["stale"]
    assert len(_warnings(caplog, "power_w")) == 1 and len(_warnings(caplog, "temperature_c")) == 1


def test_sampler_survives_a_failing_read(caplog):
    class Flaky(DeviceReader):
        calls = 0

        def read(self):
            self.calls += 1
            if self.calls <= 3:
                raise RuntimeError("reader bug")
            return super().read()

    with caplog.at_level(logging.ERROR):
        with GPUSampler(Flaky(FakeNVMLBackend(), 0), interval_s=0.005) as sampler:
            _wait_until(lambda: sampler.samples_taken >= 3)
            assert sampler.running
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "reader bug" in errors[0].exc_text


class _Hanging(FakeNVMLBackend):
    """Fake GPUs whose power query blocks while ``hang`` is set (a stalled driver), or raises ``SystemExit``
    while ``kill`` is set (the sampler thread ends: nothing in the monitor catches a ``BaseException``)."""

    def __init__(self, hang: bool = False) -> None:
        super().__init__([FakeGPU(gpu_util=80)])
        self.hang, self.kill, self.release = threading.Event(), threading.Event(), threading.Event()
        if hang:
            self.hang.set()

    def power_w(self, index):
        if self.kill.is_set():
            raise SystemExit("sampler thread killed")
        if self.hang.is_set():
            self.release.wait(10)
        return super().power_w(index)


def _ranks(path) -> list:
    return [json.loads(line)["ranks"][0] for line in path.read_text().splitlines()[1:]]


def test_stalled_backend_marks_records_stale_and_warns_once(tmp_path, caplog):
    backend = _Hanging()
    path = tmp_path / "run.jsonl"
    config = _quiet(interval_s=0.01, stale_after_s=0.15, jsonl_path=str(path))
    monitor = GPUMonitor(config, backend=backend, device=0).start()
    try:
        with caplog.at_level(logging.INFO, logger="megatron_lighthouse.monitor"):
            _wait_until(lambda: monitor.sampler.samples_taken > 0)
            fresh = monitor.step(1, step_time=0.1)["ranks"][0]
            backend.hang.set()
            time.sleep(0.4)
            stale = [monitor.step(it, step_time=0.1) for it in (2, 3)]
            backend.hang.clear()
            backend.release.set()
            stalled_at = time.time()
            _wait_until(lambda: monitor.sampler.latest.time > stalled_at)
            recovered = monitor.step(4, step_time=0.1)["ranks"][0]
    finally:
        backend.release.set()
        monitor.stop()
    assert not fresh["stale"] and fresh["sample_age_s"] < 0.15
    for record in stale:
        entry = record["ranks"][0]
        assert entry["stale"] and entry["sample_age_s"] >= 0.35 and entry["gpu_util_pct"] == 80.0
        assert "STALE SAMPLES: rank 0" in summary_line(record)
    assert not recovered["stale"]
    warned = _warnings(caplog, "stale")
    assert len(warned) == 1 and "no fresh sample" in warned[0], warned
    assert f"rank 0 ({socket.gethostname()}:gpu0, NVML GPU 0)" in warned[0]
    assert any("fresh again" in r.getMessage() for r in caplog.records)
    assert [e["stale"] for e in _ranks(path)] == [False, True, True, False]  # the JSONL carries the mark


def test_step_does_not_wait_for_a_backend_stalled_from_the_start(tmp_path, caplog):
    backend = _Hanging(hang=True)
    monitor = GPUMonitor(_quiet(interval_s=0.01, stale_after_s=0.1), backend=backend, device=0).start()
    try:
        with caplog.at_level(logging.WARNING):
            start = time.perf_counter()
            first = monitor.step(1, step_time=0.1)["ranks"][0]
            time.sleep(0.15)
            later = monitor.step(2, step_time=0.1)["ranks"][0]
            elapsed = time.perf_counter() - start
    finally:
        backend.release.set()
        monitor.stop()
    assert elapsed < 1.0  # no NVML read on the training thread
    assert first["samples"] == 0 and first["gpu_util_pct"] is None and first["step_time_s"] == 0.1
    assert later["stale"] and later["sample_age_s"] >= 0.1 and later["samples"] == 0
    assert len(_warnings(caplog, "no fresh sample")) == 1


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_dead_sampler_thread_marks_records_stale_and_warns_once(tmp_path, caplog):
    backend = _Hanging()
    path = tmp_path / "run.jsonl"
    monitor = GPUMonitor(_quiet(jsonl_path=str(path)), backend=backend, device=0).start()
    with caplog.at_level(logging.WARNING):
        _wait_until(lambda: monitor.sampler.samples_taken > 0)
        before = monitor.step(1, step_time=0.1)["ranks"][0]
        backend.kill.set()
        _wait_until(lambda: not monitor.sampler.running)
        after = [monitor.step(it, step_time=0.1)["ranks"][0] for it in (2, 3)]
        monitor.stop()
    assert not before["stale"]
    for entry in after:  # the last sample repeated, marked
        assert entry["stale"] and entry["gpu_util_pct"] == before["gpu_util_pct"] and entry["samples"] == 1
    warned = _warnings(caplog, "stale")
    assert len(warned) == 1 and "sampler thread has died" in warned[0] and "rank 0" in warned[0]
    assert [e["stale"] for e in _ranks(path)] == [False, True, True]


class _ThreadRecorder:
    """Records the thread each call of the wrapped function runs on."""

    def __init__(self, fn) -> None:
        self.fn, self.threads = fn, []

    def __call__(self, *args, **kwargs):
        self.threads.append(threading.current_thread().name)
        return self.fn(*args, **kwargs)


def test_step_leaves_file_io_to_the_writer_thread(tmp_path, monkeypatch):
    fsync, write = _ThreadRecorder(os.fsync), _ThreadRecorder(os.write)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "write", write)

    class SummaryWriter:
        def __init__(self) -> None:
            self.steps, self.flushes = [], []

        def add_scalar(self, tag, value, step):
            self.steps.append(step)

        def flush(self):
            self.flushes.append(threading.current_thread().name)

    class Run:
        def __init__(self) -> None:
            self.logged = []

        def log(self, data, step):
            self.logged.append((step, threading.current_thread().name))

    tb, run = SummaryWriter(), Run()
    path = tmp_path / "run.jsonl"
    extra = [TensorBoardWriter(writer=tb), WandbWriter(run)]
    monitor = GPUMonitor(_quiet(jsonl_path=str(path)), backend=FakeNVMLBackend(), device=0, extra_writers=extra)
    monitor.start()
    caller = threading.current_thread().name
    for it in range(1, 21):
        monitor.step(it, step_time=0.01)
        assert caller not in fsync.threads + write.threads + tb.flushes
    monitor.stop()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["kind"] for r in lines] == ["run"] + ["interval"] * 20
    assert [r["iteration"] for r in lines[1:]] == list(range(1, 21))  # every record, in order
    assert set(fsync.threads) == set(write.threads) == set(tb.flushes) == {"lighthouse-monitor-writer"}
    assert len(fsync.threads) == 21
    assert len(tb.flushes) == 20 and tb.steps == sorted(tb.steps)
    assert run.logged == [(it, caller) for it in range(1, 21)]  # W&B stays on the caller's thread, in step order


class _Blocking:
    """A writer whose writes wait for ``release``; ``entered`` is set once a write has begun."""

    def __init__(self) -> None:
        self.entered, self.release, self.written = threading.Event(), threading.Event(), []

    def write(self, record):
        self.entered.set()
        self.release.wait(10)
        self.written.append(record["i"])

    def close(self):
        pass


def test_writer_thread_drops_records_rather_than_block_when_behind(caplog):
    writer = _Blocking()
    output = WriterThread([writer], max_queued=2)
    with caplog.at_level(logging.WARNING):
        output.write({"i": 0})
        assert writer.entered.wait(5)  # record 0 is being written: the queue holds the next two
        start = time.perf_counter()
        for i in range(1, 6):
            output.write({"i": i})
        assert time.perf_counter() - start < 0.5
        writer.release.set()
        output.close()
    assert writer.written == [0, 1, 2] and output.dropped == 3
    assert len(_warnings(caplog, "records behind")) == 1 and len(_warnings(caplog, "3 record(s) were dropped")) == 1


def test_writer_thread_close_gives_up_on_a_stuck_writer(caplog):
    writer = _Blocking()
    output = WriterThread([writer])
    output.write({"i": 0})
    with caplog.at_level(logging.WARNING):
        start = time.perf_counter()
        output.close(timeout_s=0.2)
        assert time.perf_counter() - start < 2.0
    writer.release.set()
    assert len(_warnings(caplog, "did not finish within")) == 1


@pytest.mark.parametrize("setting,value,rule", [
    ("stale_after_s", 0.5, "must be a finite number > interval_s=1.0"),
    ("stale_after_s", "2", "must be a finite number > interval_s=1.0"),
    ("stale_after_s", math.inf, "must be a finite number > interval_s=1.0"),
    ("interval_s", "1", "must be a number in (0, 3600] (seconds)"),
    ("interval_s", math.nan, "must be a number in (0, 3600] (seconds)"),
    ("interval_s", math.inf, "must be a number in (0, 3600] (seconds)"),
    ("interval_s", 1e308, "must be a number in (0, 3600] (seconds)"),
    ("log_interval", 2.0, "must be an int >= 1 (steps)"),
    ("log_interval", True, "must be an int >= 1 (steps)"),
    ("write_rank", "0", "must be an int >= 0"),
    ("clock_threshold", None, "must be a number in (0, 1)"),
    ("util_threshold_pct", 1000, "must be a number in (0, 100]"),
    ("step_time_threshold", math.inf, "must be a finite number > 0"),
    ("enabled", "no", "must be True or False"),
    ("wandb", "false", "must be True or False"),
    ("console", 1, "must be True or False"),
    ("jsonl_path", "", "must be a non-empty path"),
    ("tensorboard_dir", 3, "must be a non-empty path"),
])
def test_config_names_the_bad_setting_and_its_rule(setting, value, rule):
    with pytest.raises(ValueError) as error:
        MonitorConfig(**{setting: value})
    assert str(error.value).startswith(f"MonitorConfig.{setting}={value!r}: {rule}")


def test_config_stale_threshold():
    assert MonitorConfig(interval_s=0.01).stale_threshold_s == 1.0
    assert MonitorConfig(interval_s=2.0).stale_threshold_s == 6.0
    assert MonitorConfig(interval_s=0.01, stale_after_s=0.1).stale_threshold_s == 0.1


@pytest.mark.parametrize("kwargs,rule", [
    (dict(config="x"), "config='x': must be a MonitorConfig"),
    (dict(config=None), "config=None: must be a MonitorConfig"),
    (dict(backend="nvml"), "backend='nvml': must be a GPUBackend"),
    (dict(device="0"), "device='0': must be a CUDA device index >= 0"),
    (dict(device=-1), "device=-1: must be a CUDA device index >= 0"),
    (dict(writers="x"), "writers='x': must be a sequence of writers"),
    (dict(extra_writers=[object()]), "extra_writers=[<object object"),
])
def test_monitor_arguments_are_checked_at_construction(kwargs, rule):
    with pytest.raises(ValueError) as error:
        GPUMonitor(**{"config": _quiet(), **kwargs})
    assert str(error.value).startswith(f"GPUMonitor: {rule}"), str(error.value)


@pytest.mark.parametrize("enabled", [True, False])
@pytest.mark.parametrize("args,rule", [
    (("x",), "iteration='x': must be an int >= 0"),
    ((None,), "iteration=None: must be an int >= 0"),
    ((-1,), "iteration=-1: must be an int >= 0"),
    ((2.0,), "iteration=2.0: must be an int >= 0"),
    ((True,), "iteration=True: must be an int >= 0"),
    ((1, -0.5), "step_time=-0.5: must be a finite number >= 0"),
    ((1, math.nan), "step_time=nan: must be a finite number >= 0"),
    ((1, "0.5"), "step_time='0.5': must be a finite number >= 0"),
])
def test_step_refuses_what_is_no_step(args, rule, enabled):
    """Checked whether or not the monitor runs: a loop that passes a float step must not first learn it from the
    report that refuses its log."""
    with GPUMonitor(_quiet(enabled=enabled), backend=FakeNVMLBackend(), device=0) as monitor:
        with pytest.raises(ValueError) as error:
            monitor.step(*args)
        assert str(error.value).startswith(f"GPUMonitor.step: {rule}"), str(error.value)
        assert monitor.step(1, step_time=0.0) is not None or not enabled  # still usable


def test_a_write_rank_outside_the_world_is_refused_at_start(tmp_path):
    monitor = GPUMonitor(_quiet(write_rank=3, jsonl_path=str(tmp_path / "m.jsonl")), backend=FakeNVMLBackend(),
                         device=0)
    with pytest.raises(ValueError, match=r"MonitorConfig.write_rank=3: not a rank of this group of 1 \(0 to 0\)"):
        monitor.start()
    GPUMonitor(_quiet(write_rank=3), backend=FakeNVMLBackend(), device=0, writers=[]).start().stop()  # own writers
