"""benchmarks/bench_cp.py runs end to end on CPU (gloo, tiny sizes), without megatron-core, W=1 then W=2."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

from benchmark_utils import load_benchmark

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_bench_cp_tiny_cpu_without_megatron(tmp_path):
    blocker = tmp_path / "no_megatron" / "megatron"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('megatron-core is not installed on the GPU machine')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocker.parent), os.environ.get("PYTHONPATH", "")])}
    out = tmp_path / "results"
    for world in (1, 2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
               str(ROOT / "benchmarks" / "bench_cp.py"), "--device", "cpu", "--tiny", "--out-dir", str(out)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "t1/(W*tW)" in proc.stdout

    one, two = (json.loads((out / f"cp_cpu_w{w}.json").read_text()) for w in (1, 2))
    assert one["world"] == 1 and "check" not in one and one["efficiency"] == {} and one["baseline"] is None
    assert two["baseline"]["results"] == one["results"]
    assert two["check"]["passed"] and two["check"]["indices_equal"]
    assert {r["case"].split()[0] for r in two["check"]["rows"]} == {"lighthouse", "dense"}
    assert all(r["cp_vs_single"] < 1e-5 for r in two["check"]["rows"])
    assert two["settings"] == one["settings"] and two["settings"]["max_cp"] == 2
    for method in ("lighthouse", "dense"):
        res = two["results"][method]
        assert res["median_s"] > 0 and res["times_s"]
        want = one["results"][method]["median_s"] / (2 * res["median_s"])
        assert abs(two["efficiency"][method] - want) < 1e-12


def test_baseline_is_the_w1_run_of_the_same_settings(tmp_path):
    bench_cp = load_benchmark("bench_cp")
    settings = dict(seq_len=4096, max_cp=2, dtype="fp32", device="cpu")
    one = dict(world=1, date="2026-12-01", device_name="cpu", settings=settings,
               results={"lighthouse": {"median_s": 3.0}, "dense": {"error": "out of memory"}})
    two = dict(world=2, settings=settings, results={"lighthouse": {"median_s": 2.0}, "dense": {"median_s": 1.0}})
    assert bench_cp.load_baseline(two, str(tmp_path)) == (None, {})  # no W=1 run written yet
    (tmp_path / "cp_cpu_w1.json").write_text(json.dumps(one))
    assert bench_cp.load_baseline(one, str(tmp_path)) == (None, {})  # a W=1 run has no baseline
    base, efficiency = bench_cp.load_baseline(two, str(tmp_path))
    assert base["results"] == one["results"] and base["path"] == str(tmp_path / "cp_cpu_w1.json")
    assert efficiency == {"lighthouse": 3.0 / (2 * 2.0)}  # dense did not run at W=1
    with pytest.raises(SystemExit, match="other settings"):
        bench_cp.load_baseline({**two, "settings": {**settings, "seq_len": 8192}}, str(tmp_path))
