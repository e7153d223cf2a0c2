"""``python -m megatron_lighthouse.monitor``: a failure is one ``error: ...`` line on stderr and exit code 2."""

from __future__ import annotations

import json

import pytest

import megatron_lighthouse.monitor.__main__ as cli
from megatron_lighthouse.monitor import FakeGPU, FakeNVMLBackend, GPUMonitor, MonitorConfig
from megatron_lighthouse.monitor.report import LogFormatError, load_run
from megatron_lighthouse.monitor.writers import JSONLWriter


def _log(path, intervals: int = 2) -> list:
    """A one-rank monitor log of ``intervals`` intervals at ``path``; returns its lines."""
    config = MonitorConfig(interval_s=0.005, log_interval=1, jsonl_path=str(path), console=False, wandb=False)
    with GPUMonitor(config, backend=FakeNVMLBackend([FakeGPU(gpu_util=66)]), device=0) as monitor:
        for it in range(1, intervals + 1):
            monitor.step(it, step_time=0.1)
    return path.read_text().splitlines()


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def _interval_with(**changes) -> str:
    record = {"kind": "interval", "iteration": 1, "time": 1.0, "stragglers": [],
              "ranks": [{"rank": 0, "host": "h", "local_gpu": 0, "gpu_util_pct": 50.0}]}
    record.update(changes)
    return json.dumps(record)


BAD_LOGS = {
    "empty": ("", "an empty file"),
    "blank lines": ("\n\n", "an empty file"),
    "random text": ("hello world\nthis is not json\n", "line 1 is not JSON"),
    "torn line mid-file": ('{"kind": "run"}\n{"kind": "inter\n' + _interval_with() + "\n", "line 2 is not JSON"),
    "JSON list": ("[1, 2, 3]\n", "line 1 is not a monitor record (a JSON list)"),
    "JSON of another shape": ('{"loss": 2.5, "step": 10}\n', "line 1 is not a monitor record ('kind': None)"),
    "unknown kind": ('{"kind": "metrics"}\n', "'kind': 'metrics'"),
    "interval without ranks": ('{"kind": "interval", "iteration": 1, "time": 1.0}\n', "needs 'ranks'"),
    "a string for a number": (_interval_with(ranks=[{"rank": 0, "host": "h", "local_gpu": 0, "power_w": "high"}]),
                              "power_w='high' is not a finite number"),
    "a number too large": (_interval_with().replace('"gpu_util_pct": 50.0', '"power_w": 1e400'),  # JSON reads inf
                           "power_w=inf is not a finite number"),
    "stale not a bool": (_interval_with(ranks=[{"rank": 0, "host": "h", "local_gpu": 0, "stale": "yes"}]),
                         "stale='yes' is not true or false"),
    "throttle reasons not names": (_interval_with(ranks=[{"rank": 0, "host": "h", "local_gpu": 0,
                                                          "throttle_reasons": [1, "a"]}]),
                                   "throttle_reasons=[1, 'a'] is not a list of strings"),
    "throttle reasons of objects": (_interval_with(ranks=[{"rank": 0, "host": "h", "local_gpu": 0,
                                                           "throttle_reasons": [{}]}]), "throttle_reasons=[{}]"),
    "straggler of no rank": (_interval_with(stragglers=[{"rank": 3, "reason": "step_time"}]), "'stragglers'"),
    "straggler reason not a name": (_interval_with(stragglers=[{"rank": 0, "reason": ["x"]}]), "'reason' (a string)"),
    "only a torn line": ('{"kind": "run", "wor', "only a torn line"),
    "a rank twice in one interval": (_interval_with(ranks=[{"rank": 1, "host": "h", "local_gpu": 0}] * 2),
                                     "rank 1 appears twice in one interval"),
    "a negative rank": (_interval_with(ranks=[{"rank": -1, "host": "h", "local_gpu": 0}]), "'rank' (an int >= 0)"),
    "a negative iteration": (_interval_with(iteration=-5), "an int 'iteration' >= 0"),
    "a float iteration": (_interval_with(iteration=2.0), "an int 'iteration' >= 0"),
    "times going backwards": (_interval_with(time=10.0) + "\n" + _interval_with(iteration=2, time=5.0),
                              "line 2: time 5.0 is before line 1's 10.0"),
}


@pytest.mark.parametrize("case", list(BAD_LOGS))
def test_report_of_a_file_that_is_not_a_monitor_log(case, tmp_path, capsys):
    text, problem = BAD_LOGS[case]
    path = tmp_path / "bad.jsonl"
    path.write_text(text)
    assert cli.main(["report", str(path)]) == cli.EXIT_ERROR == 2
    line = _one_error_line(capsys)
    assert str(path) in line and problem in line, line
    assert not (tmp_path / "bad.png").exists()


def test_report_of_files_it_cannot_read(tmp_path, capsys):
    missing = tmp_path / "MISSING.jsonl"
    assert cli.main(["report", str(missing)]) == 2
    line = _one_error_line(capsys)
    assert line == f"error: {missing}: cannot read it (No such file or directory)"
    assert cli.main(["report", str(tmp_path)]) == 2
    assert "Is a directory" in _one_error_line(capsys)
    binary = tmp_path / "events.bin"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00")
    assert cli.main(["report", str(binary)]) == 2
    assert "not UTF-8 text" in _one_error_line(capsys)


def test_report_of_a_header_without_intervals(tmp_path, capsys):
    path = tmp_path / "run.jsonl"
    lines = _log(path)
    path.write_text(lines[0] + "\n")
    assert cli.main(["report", str(path)]) == 2
    assert "no interval records yet" in _one_error_line(capsys)


def test_report_to_an_unwritable_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    path = tmp_path / "run.jsonl"
    _log(path)
    out = tmp_path / "no" / "such" / "dir" / "x.png"
    assert cli.main(["report", str(path), "--out", str(out)]) == 2
    assert str(out) in _one_error_line(capsys)


@pytest.mark.parametrize("out", ["x.foo", "out", "png"])
def test_report_refuses_an_image_format_it_cannot_write_before_reading_the_log(out, tmp_path, capsys):
    assert cli.main(["report", str(tmp_path / "MISSING.jsonl"), "--out", str(tmp_path / out)]) == 2
    line = _one_error_line(capsys)
    assert line.startswith(f"error: --out {tmp_path / out}: must end in .png, .pdf, .svg"), line
    assert not list(tmp_path.iterdir())


def test_report_writes_the_image_it_names(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    path = tmp_path / "run.jsonl"
    _log(path)
    out = tmp_path / "timeline.svg"
    assert cli.main(["report", str(path), "--out", str(out)]) == 0
    assert capsys.readouterr().out.endswith(f"-> {out}\n") and out.read_text().lstrip().startswith("<?xml")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.jsonl", "timeline.svg"]


def test_help_is_plain_text_and_live_says_what_mem_busy_is(monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "1000")  # one sentence a line: none is wrapped
    for argv in (["--help"], ["live", "--help"]):
        with pytest.raises(SystemExit) as done:
            cli.main(argv)
        assert done.value.code == 0
    text = capsys.readouterr().out
    assert "``" not in text and "'report' draws the per-rank timeline" in text
    assert "mem busy% the share of time its memory was read or written (NVML's memory utilization), not how " \
           "full it is" in text


def test_report_tolerates_a_torn_last_line_with_a_warning(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    path = tmp_path / "run.jsonl"
    lines = _log(path)
    with open(path, "a") as f:
        f.write(lines[-1][:25])  # a job killed in the middle of writing its next record
    assert cli.main(["report", str(path)]) == 0
    captured = capsys.readouterr()
    assert captured.err == f"warning: {path}: line 4 is torn (a job killed while writing it?); skipped\n"
    assert "1 ranks, 2 intervals" in captured.out and (tmp_path / "run.png").exists()


def test_a_restart_after_a_kill_appends_on_a_line_of_its_own(tmp_path):
    path = tmp_path / "run.jsonl"
    lines = _log(path)
    with open(path, "a") as f:
        f.write(lines[-1][:25])  # killed mid-write, then restarted on the same log
    _log(path, intervals=3)
    run = load_run(str(path))
    assert run.skipped_lines == [4] and len(run.intervals) == 5
    assert [r["iteration"] for r in run.intervals] == [1, 2, 1, 2, 3]
    with open(path, "a") as f:
        f.write("garbage\n")
    JSONLWriter(str(path)).write({"kind": "interval"})  # garbage followed by something else than a new run
    with pytest.raises(LogFormatError, match="line 9 is not JSON"):
        load_run(str(path))


def test_live_without_nvml_suggests_fake(monkeypatch, capsys):
    class NoNVML(FakeNVMLBackend):
        def __init__(self) -> None:
            super().__init__(init_error="NVML Shared Library Not Found")

    monkeypatch.setattr(cli, "NVMLBackend", NoNVML)
    assert cli.main(["live", "--count", "1"]) == 2
    line = _one_error_line(capsys)
    assert line == ("error: NVML unavailable (NVML Shared Library Not Found); add --fake N to show N fake GPUs "
                    "instead")


def test_live_when_the_gpus_fail_mid_run(monkeypatch, capsys):
    class Lost(FakeNVMLBackend):
        def device_name(self, index):
            raise RuntimeError("GPU is lost")

    monkeypatch.setattr(cli, "FakeNVMLBackend", Lost)
    assert cli.main(["live", "--fake", "2", "--count", "1"]) == 2
    assert _one_error_line(capsys) == "error: reading the GPUs failed: RuntimeError('GPU is lost')"


@pytest.mark.parametrize("args", [["--interval", "0"], ["--interval", "nan"], ["--interval", "inf"], ["--count", "0"],
                                  ["--fake", "-1"], ["--fake", "0"], ["--fake", "x"], ["--interval", "soon"],
                                  ["--interval", "1e308"], ["--interval", "3601"], ["--fake", "1000000000000"],
                                  ["--fake", "1e12"], ["--fake", "65"]])
def test_live_rejects_bad_settings(args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["live", "--count", "1", *args])  # --count 1 first: a later --count wins
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {args[0]}: {args[1]}: must be" in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), err  # one line, no usage block


def test_the_command_line_imports_no_torch_and_the_package_names_resolve():
    """``python -m megatron_lighthouse.monitor`` starts without torch (its names load on first use: the CLI starts
    at once and Ctrl-C never lands inside torch's import); every public name still resolves to its definition."""
    import os
    import pathlib
    import subprocess
    import sys

    import megatron_lighthouse.monitor as monitor

    root = pathlib.Path(monitor.__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), str(root / "kernels")]))
    code = "import sys, megatron_lighthouse.monitor.__main__; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], env=env, timeout=60).returncode == 0, "the CLI imported torch"
    for name in monitor.__all__:
        assert getattr(monitor, name).__name__ == name, name
    with pytest.raises(AttributeError, match="no attribute 'GPUMonitr'"):
        monitor.GPUMonitr  # noqa: B018
