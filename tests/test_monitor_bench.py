"""``benchmarks/bench_monitor.py --fake`` end to end on CPU: two ranks, every output, a named straggler."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_bench_monitor_fake_two_ranks(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_monitor.py"), "--fake", "--out", str(tmp_path),
           "--world-size", "2", "--seconds", "0.4", "--repeats", "1", "--warmup", "0", "--cost-repeats", "20",
           "--straggler-slowdown", "2.0"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "GPU monitor overhead (2 rank(s)" in proc.stdout
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["fake"] and summary["world_size"] == 2 and summary["dist_backend"] == "gloo"
    for rank in summary["ranks"]:
        assert set(rank["step_s"]) == {"off", "on", "stress"} and all(len(v) == 1 for v in rank["step_s"].values())
        assert rank["samples_taken"]["stress"] > rank["samples_taken"]["on"] > 0
        assert rank["sample_cost_idle_us"]["n"] == 20 and rank["sample_cost_idle_us"]["p50"] > 0
        assert set(rank["metric_cost_idle_us"]) >= {"utilization", "power_w", "nvlink_kib_total"}
        assert rank["straggler"]["injected_rank"] == 1 and rank["straggler"]["named"], rank["straggler"]
        assert rank["straggler"]["where"].endswith(":gpu1")
    lines = [json.loads(line) for line in (tmp_path / "run.jsonl").read_text().splitlines()]
    assert lines[0]["kind"] == "run" and any(r["kind"] == "interval" and r["world_size"] == 2 for r in lines)
    assert (tmp_path / "report.png").stat().st_size > 20_000
    assert (tmp_path / "report.txt").read_text().splitlines()[0].split()[0] == "rank"
    assert len(list((tmp_path / "tb").glob("events.out.tfevents.*"))) == 1


def test_bench_monitor_fake_without_tensorboard(tmp_path, monkeypatch, capsys, caplog):
    """One rank, in this process (no spawn, imports already done), with tensorboard's import failing."""
    torch = pytest.importorskip("torch")
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    for name in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST"):  # the benchmark sets these
        monkeypatch.setenv(name, os.environ.get(name, "0"))
    spec = importlib.util.spec_from_file_location("bench_monitor", ROOT / "benchmarks" / "bench_monitor.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", ["bench_monitor.py", "--fake", "--out", str(out), "--world-size", "1",
                                      "--seconds", "0.1", "--repeats", "1", "--warmup", "0", "--cost-repeats", "5",
                                      "--size", "32", "--inner", "1"])
    threads = torch.get_num_threads()
    try:
        bench.main()
    finally:
        torch.set_num_threads(threads)
    assert any("pip install tensorboard" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "no tb/: tensorboard is not installed" in capsys.readouterr().out
    assert json.loads((out / "summary.json").read_text())["tensorboard"] is False
    assert not (out / "tb").exists() and (out / "report.png").exists()
