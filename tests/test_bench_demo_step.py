"""benchmarks/bench_demo_step.py: the lone-process step timing of the demo, at a tiny size on CPU."""

from __future__ import annotations

import json
import statistics

import pytest

from benchmark_utils import ROOT, load_benchmark, run_python

TINY = ["--layers", "2", "--hidden", "32", "--heads", "2", "--ffn", "64", "--seq-len", "256", "--levels", "2",
        "--pooling-factor", "2", "--topk", "128", "--dense-layers", "0", "--batch-size", "2",
        "--corpus-bytes", "300000", "--warmup", "1"]


def test_step_seconds_leaves_out_the_first_steps():
    bench = load_benchmark("bench_demo_step")
    train = [dict(step=i, seconds=0.1 * (i + 1), loss=1.0) for i in range(6)]
    assert bench.step_seconds(train, 4) == pytest.approx([0.5, 0.6])
    assert bench.step_seconds(train, 0) == pytest.approx([0.1 * (i + 1) for i in range(6)])


def test_summarize_pools_runs_and_compares_with_the_first_variant():
    bench = load_benchmark("bench_demo_step")
    runs = [dict(variant="dense", tokens_per_step=100, step_seconds=[0.2, 0.4, 0.3]),
            dict(variant="lh", tokens_per_step=100, step_seconds=[0.1, 0.1]),
            dict(variant="dense", tokens_per_step=100, step_seconds=[0.5, 0.6]),
            dict(variant="lh", tokens_per_step=100, step_seconds=[0.2, 0.3, 0.15])]
    dense, lh = bench.summarize(runs, ["dense", "lh"])
    assert dense["median_step_ms"] == pytest.approx(400.0)  # median of 0.2 0.3 0.4 0.5 0.6
    assert dense["per_run_median_ms"] == pytest.approx([300.0, 550.0])
    assert lh["median_step_ms"] == pytest.approx(150.0)
    assert lh["tokens_per_s"] == pytest.approx(100 / 0.15)
    assert (dense["vs_baseline"], lh["vs_baseline"]) == pytest.approx((1.0, 0.375))


def test_cpu_run_writes_json_and_table(tmp_path):
    proc = run_python(str(ROOT / "benchmarks" / "bench_demo_step.py"), "--out-dir", str(tmp_path), "--steps", "9",
                      "--skip", "3", "--repeats", "2", "--variant", "dense=--mode dense",
                      "--variant", "lighthouse=--mode lighthouse", "--", *TINY)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "demo_step.json").read_text())
    assert [(r["variant"], r["repeat"]) for r in report["runs"]] == [("dense", 0), ("lighthouse", 0),
                                                                   ("dense", 1), ("lighthouse", 1)]
    for run in report["runs"]:
        assert len(run["step_seconds"]) == 6 and all(s > 0 for s in run["step_seconds"])
        assert run["tokens_per_step"] == 2 * 256
    for row in report["rows"]:
        pooled = [s for r in report["runs"] if r["variant"] == row["variant"] for s in r["step_seconds"]]
        assert row["median_step_ms"] == pytest.approx(1e3 * statistics.median(pooled))
        assert f"{row['median_step_ms']:.2f}" in proc.stdout
    assert report["rows"][0]["vs_baseline"] == 1.0
    assert report["device"] == "cpu"


@pytest.mark.parametrize("argv, message", [
    (["--steps", "8", "--skip", "4"], "at least 5 timed steps"),
    (["--repeats", "0"], "--repeats 0"),
    (["--", "--steps", "5"], "--steps: set by this script"),
    (["--", "--eval-every", "5"], "--eval-every: set by this script"),
])
def test_bad_settings_are_named(tmp_path, argv, message):
    bench = load_benchmark("bench_demo_step")
    own = argv[:argv.index("--")] if "--" in argv else argv
    rest = argv[argv.index("--"):] if "--" in argv else []
    with pytest.raises(SystemExit, match=message):
        bench.parse_args(["--out-dir", str(tmp_path), "--variant", "dense=--mode dense", *own, *rest])
