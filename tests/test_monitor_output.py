"""GPU monitor output: JSONL (also after a SIGKILL), TensorBoard, W&B, console, report PNG/table, CLIs."""

from __future__ import annotations

import importlib.machinery
import io
import json
import logging
import os
import subprocess
import sys
import textwrap
import types

import pytest

from megatron_lighthouse.monitor import FakeGPU, FakeNVMLBackend, GPUMonitor, MonitorConfig
from megatron_lighthouse.monitor import aggregate
from megatron_lighthouse.monitor.__main__ import main
from megatron_lighthouse.monitor.live import run_live
from megatron_lighthouse.monitor.report import format_table, load_run, plot_timeline, render_timeline
from megatron_lighthouse.monitor.sample import DeviceReader
from megatron_lighthouse.monitor.writers import ConsoleWriter, JSONLWriter, default_writers


def _quiet(**overrides) -> MonitorConfig:
    return MonitorConfig(**{"interval_s": 0.005, "log_interval": 5, "console": False, "wandb": False, **overrides})


def test_jsonl_stays_valid_when_the_process_is_killed(tmp_path):
    path = tmp_path / "run.jsonl"
    script = textwrap.dedent(
        f"""
        import os, signal, time
        from megatron_lighthouse.monitor import FakeGPU, FakeNVMLBackend, GPUMonitor, MonitorConfig
        config = MonitorConfig(interval_s=0.001, log_interval=1, jsonl_path={str(path)!r}, console=False, wandb=False)
        monitor = GPUMonitor(config, backend=FakeNVMLBackend([FakeGPU(wobble=5.0)]), device=0).start()
        for it in range(1, 13):
            monitor.step(it, step_time=0.01)
        def lines():
            return open({str(path)!r}).read().count("\\n") if os.path.exists({str(path)!r}) else 0
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and lines() < 13:
            time.sleep(0.01)  # the writer thread catches up
        for it in range(13, 301):  # the writer thread is busy with these when the kill comes
            monitor.step(it, step_time=0.01)
        os.kill(os.getpid(), signal.SIGKILL)  # no stop(), no close(), no interpreter exit
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    text = path.read_text()
    assert text.endswith("\n")
    records = [json.loads(line) for line in text.splitlines()]  # every line is a whole JSON record
    assert [r["kind"] for r in records] == ["run"] + ["interval"] * (len(records) - 1)
    assert [r["iteration"] for r in records[1:]] == list(range(1, len(records)))  # in order, none lost between
    assert len(records) >= 13


def test_report_skips_a_torn_last_line(tmp_path):
    path = tmp_path / "run.jsonl"
    writer = JSONLWriter(str(path))
    config = _quiet(jsonl_path=None)
    with GPUMonitor(config, backend=FakeNVMLBackend(), device=0, writers=[writer]) as monitor:
        for it in range(1, 11):
            monitor.step(it, step_time=0.1)
    with open(path, "a") as f:
        f.write('{"kind": "interval", "iteration": 15, "ran')  # what a kill in the middle of a write leaves
    run = load_run(str(path))
    assert run.skipped_lines == [4] and len(run.intervals) == 2 and run.header["world_size"] == 1


def test_tensorboard_event_file_reads_back(tmp_path):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    config = _quiet(tensorboard_dir=str(tmp_path / "tb"))
    with GPUMonitor(config, backend=FakeNVMLBackend([FakeGPU(gpu_util=72, power_w=333)]), device=0) as monitor:
        records = [r for r in (monitor.step(it, step_time=0.25) for it in range(1, 16)) if r]
    acc = event_accumulator.EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    scalars = acc.Tags()["scalars"]
    for tag in ("gpu_monitor/gpu_util_pct/mean", "gpu_monitor/power_w/max", "gpu_monitor/step_time_s/rank0",
                "gpu_monitor/gpu_util_pct/rank0", "gpu_monitor/stragglers"):
        assert tag in scalars
    util = acc.Scalars("gpu_monitor/gpu_util_pct/mean")
    assert [e.step for e in util] == [5, 10, 15] == [r["iteration"] for r in records]
    assert [e.value for e in util] == pytest.approx([72.0] * 3)
    assert [e.value for e in acc.Scalars("gpu_monitor/power_w/rank0")] == pytest.approx([333.0] * 3)
    assert [e.value for e in acc.Scalars("gpu_monitor/step_time_s/rank0")] == pytest.approx([0.25] * 3)


def test_without_tensorboard_the_tensorboard_output_is_skipped_with_one_warning(monkeypatch, tmp_path, caplog):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails: tensorboard not installed
    config = _quiet(tensorboard_dir=str(tmp_path / "tb"), jsonl_path=str(tmp_path / "run.jsonl"))
    with caplog.at_level(logging.WARNING, logger="megatron_lighthouse.monitor"):
        with GPUMonitor(config, backend=FakeNVMLBackend(), device=0) as monitor:
            records = [r for r in (monitor.step(it, step_time=0.1) for it in range(1, 11)) if r]
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "pip install tensorboard" in warnings[0] and "tensorboard_dir" in warnings[0]
    assert len(records) == 2 and not (tmp_path / "tb").exists()
    lines = (tmp_path / "run.jsonl").read_text().splitlines()  # the other outputs are unaffected
    assert [json.loads(line)["kind"] for line in lines] == ["run", "interval", "interval"]


class _FakeWandbRun:
    def __init__(self) -> None:
        self.logged = []

    def log(self, data, step):
        self.logged.append((step, data))


def test_wandb_gets_the_scalars_when_a_run_is_active(monkeypatch):
    fake = types.ModuleType("wandb")
    fake.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    fake.run = None
    monkeypatch.setitem(sys.modules, "wandb", fake)
    assert default_writers(_quiet(wandb=True)) == []  # installed, but no active run: nothing to log to
    fake.run = _FakeWandbRun()
    with GPUMonitor(_quiet(wandb=True), backend=FakeNVMLBackend([FakeGPU(gpu_util=61)]), device=0) as monitor:
        for it in range(1, 11):
            monitor.step(it, step_time=0.5)
    assert [step for step, _ in fake.run.logged] == [5, 10]
    assert all(data["gpu_monitor/gpu_util_pct/rank0"] == 61.0 for _, data in fake.run.logged)


def test_console_line_and_broken_writer(caplog):
    class Broken:
        def write(self, record):
            raise OSError("disk full")

        def close(self):
            pass

    backend = FakeNVMLBackend([FakeGPU(gpu_util=83, power_w=420)])
    with caplog.at_level(logging.INFO, logger="megatron_lighthouse.monitor"):
        monitor = GPUMonitor(_quiet(), backend=backend, device=0, writers=[ConsoleWriter(), Broken()]).start()
        records = [r for r in (monitor.step(it, step_time=0.2) for it in range(1, 16)) if r]
        monitor.stop()
    assert len(records) == 3  # the broken writer did not stop the monitor
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("gpu-monitor it")]
    assert len(lines) == 3 and "util 83/83/83 %" in lines[0] and "power 420/420/420 W" in lines[0]
    assert "step 0.200/0.200/0.200 s" in lines[0]
    assert sum("Broken.write failed" in r.getMessage() for r in caplog.records) == 1


def _four_rank_log(path: str, intervals: int = 6) -> None:
    """A 4-rank run log built by the monitor's own reduction and record code (rank 2 runs at 35%)."""
    gpus = [FakeGPU(gpu_util=u, power_w=p, wobble=8.0) for u, p in ((92, 640), (90, 620), (35, 260), (91, 630))]
    backend = FakeNVMLBackend(gpus)
    readers = [DeviceReader(backend, r) for r in range(4)]
    who = [aggregate.RankIdentity(r, f"node{r // 2}", r % 2, r % 2, "Fake GPU 80GB", True) for r in range(4)]
    writer = JSONLWriter(path)
    writer.write(aggregate.run_record(who, 1.0, 10, 1000.0))
    for i in range(intervals):
        summaries = [
            aggregate.summarize_interval([rd.read(), rd.read()], [0.5 + 0.01 * r]) for r, rd in enumerate(readers)
        ]
        writer.write(aggregate.build_record(10 * (i + 1), 10.0 * i, 1000.0 + 10 * i, summaries, who, MonitorConfig()))
    writer.close()


def test_report_png_and_table(tmp_path):
    pytest.importorskip("matplotlib")
    log = str(tmp_path / "run.jsonl")
    _four_rank_log(log)
    run = load_run(log)
    assert run.ranks == [0, 1, 2, 3] and len(run.intervals) == 6

    fig = plot_timeline(run)
    assert len(fig.axes) == 4
    for ax in fig.axes:
        assert len(ax.get_lines()) == 4  # one line per rank in every panel
        assert all(len(line.get_xdata()) == 6 for line in ax.get_lines())
    labels = [line.get_label() for line in fig.axes[0].get_lines()]
    assert labels == ["rank 0 node0:gpu0", "rank 1 node0:gpu1", "rank 2 node1:gpu0", "rank 3 node1:gpu1"]

    png = tmp_path / "timeline.png"
    render_timeline(run, str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    from matplotlib import image

    height, width, _ = image.imread(str(png)).shape
    assert height > 500 and width > 800

    table = format_table(run).splitlines()
    assert len(table) == 5 and table[0].split()[:3] == ["rank", "where", "util%"]
    row2 = table[3].split()
    assert row2[:2] == ["2", "node1:gpu0"] and 30 <= float(row2[2]) <= 40
    assert row2[9] == "6"  # named a straggler (low utilization) in each of the 6 intervals
    assert all(line.split()[9] == "0" for line in (table[1], table[2], table[4]))


def test_report_cli(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    log = str(tmp_path / "run.jsonl")
    _four_rank_log(log, intervals=3)
    assert main(["report", log]) == 0
    out = capsys.readouterr().out
    assert "node1:gpu0" in out and "4 ranks, 3 intervals" in out
    assert os.path.getsize(str(tmp_path / "run.png")) > 20_000
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert main(["report", str(empty)]) == 2


def test_live_table(capsys):
    stream = io.StringIO()
    backend = FakeNVMLBackend([FakeGPU(gpu_util=12), FakeGPU(gpu_util=97, throttle_mask=0x4)])
    run_live(backend, stream, interval_s=0.02, count=2)
    tables = stream.getvalue().strip().split("\n\n")
    assert len(tables) == 2
    rows = tables[1].splitlines()
    assert len(rows) == 4 and rows[1].startswith("gpu")
    assert "mem busy%" in rows[1] and "mem%" not in rows[1]  # memory-controller busy time, not how full it is
    assert rows[2].split()[:5] == ["0", "Fake", "GPU", "80GB", "12"]
    assert rows[3].split()[4] == "97" and rows[3].endswith("sw_power_cap")
    nvlink = [float(v) for v in rows[2].split()[11].split("/")]  # a rate from two counter readings
    assert nvlink == pytest.approx([1024.0, 1024.0], rel=0.05)  # the fake's 1 GiB/s
    assert main(["live", "--fake", "2", "--count", "1"]) == 0
    assert capsys.readouterr().out.count("Fake GPU 80GB") == 2


class _FakeSummaryWriter:
    def __init__(self) -> None:
        self.scalars = []
        self.closed = False

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def flush(self):
        pass

    def close(self):
        self.closed = True


def test_from_args_inside_megatron_reuses_its_writers(monkeypatch, tmp_path):
    tb, run = _FakeSummaryWriter(), _FakeWandbRun()
    global_vars = types.ModuleType("megatron.training.global_vars")
    global_vars.get_tensorboard_writer = lambda: tb
    global_vars.get_wandb_writer = lambda: run
    monkeypatch.setitem(sys.modules, "megatron.training", types.ModuleType("megatron.training"))
    monkeypatch.setitem(sys.modules, "megatron.training.global_vars", global_vars)
    args = types.SimpleNamespace(lighthouse_monitor=True, lighthouse_monitor_interval=0.01, log_interval=4,
                                 save=str(tmp_path), tensorboard_dir=str(tmp_path / "tb"))
    monitor = GPUMonitor.from_args(args, backend=FakeNVMLBackend([FakeGPU(gpu_util=57)]), device=0)
    assert monitor.config.log_interval == 4 and monitor.config.interval_s == 0.01 and not monitor.config.wandb
    with monitor:
        for it in range(1, 9):
            monitor.step(it, step_time=0.1)
    assert not tb.closed  # Megatron's writer stays open for Megatron
    util = [(value, step) for tag, value, step in tb.scalars if tag == "gpu_monitor/gpu_util_pct/rank0"]
    assert util == [(57.0, 4), (57.0, 8)]
    assert [step for step, _ in run.logged] == [4, 8]
    lines = (tmp_path / "tb" / "gpu_monitor.jsonl").read_text().splitlines()  # --tensorboard-dir before --save
    assert [json.loads(line)["kind"] for line in lines] == ["run", "interval", "interval"]
    assert os.listdir(tmp_path / "tb") == ["gpu_monitor.jsonl"]  # no second event file beside Megatron's
