"""bench_kernels.py's logic on CPU (the timing needs a GPU): the compulsory bytes, the geometry list, every step
run under the interpreter at a small size, the geometry sweep setting and restoring the constants, the table."""

from __future__ import annotations

import pytest

from benchmark_utils import load_benchmark

bench_kernels = load_benchmark("bench_kernels")


def test_compulsory_bytes_of_each_step():
    # 1M tokens, 32 query and 4 kv heads, L=4 (S = 40,960), D=128 bf16: one head's tokens are 256 MiB
    n, s, head = 1 << 20, 40960, (1 << 20) * 256
    total = n + n // 4 + n // 16 + n // 64
    sub = 32 * s * 256
    got = bench_kernels.compulsory_bytes(n, 32, 4, 4, s)
    assert got["scatter"] == sub + 32 * head + 4 * 32 * total
    assert got["scatter_bwd"] == 32 * head + sub + 8 * 32 * s
    assert got["gather_bwd"] == 3 * sub + 4 * 32 * total + 40 * head
    assert got["pool_coarsest_q"] == 32 * head + 32 * (n // 64) * 256
    assert got["pool_coarsest_kv"] == 8 * head + 8 * (n // 64) * 256
    assert got["pool_score"] == 36 * head + 4 * 36 * total
    assert got["select"] is None


def test_geometries_parse_and_bad_items_name_the_rule():
    assert bench_kernels.parse_geometries("16x8, 32x4") == [(16, 8), (32, 4)]
    assert bench_kernels.parse_geometries("") == []
    for bad in ("16", "16x3", "24x4", "8x4", "ax4", "16x8x2"):
        with pytest.raises(ValueError, match=f"--geometries item '{bad}'"):
            bench_kernels.parse_geometries(bad)
    with pytest.raises(SystemExit):
        bench_kernels.parse_args(["--geometries", "16x3"])
    with pytest.raises(SystemExit):
        bench_kernels.parse_args(["--pyramid", "flat"])


def _geometries_in_force() -> dict:
    import importlib

    return {name: getattr(importlib.import_module(f"lighthouse_kernels.{module}"), constant)
            for name, (module, constant) in bench_kernels.GEOMETRY_CONSTANTS.items()}


def test_every_step_runs_and_the_sweep_sets_then_restores_each_geometry():
    """The steps run under the interpreter (2 query heads over 1 kv head, N=2048, L=3, k=128); each kernel with a
    geometry is timed at its own and at each listed one, which is in force during that call only."""
    import torch

    from lighthouse_kernels.launch import Geometry

    from megatron_lighthouse import LighthouseConfig

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2048, h, bench_kernels.D, generator=gen) for h in (2, 1, 1))
    steps = bench_kernels.kernel_steps(q, k, v, LighthouseConfig(levels=3, pooling_factor=4, topk=128))
    owns, in_force = _geometries_in_force(), []

    def timer(fn):
        fn()
        in_force.append(_geometries_in_force())
        return float(len(in_force))

    times = bench_kernels.time_steps(steps, [(16, 2), (64, 8)], timer)
    assert list(times) == ["pool_score", "select", "inverse_map", "pool_coarsest_q", "pool_coarsest_kv", "gather",
                           "scatter", "scatter_bwd", "gather_bwd"]
    assert list(times["select"]) == ["own"] and list(times["gather_bwd"]) == ["own", "16x2", "64x8"]
    call = in_force[int(times["scatter_bwd"]["16x2"]) - 1]  # the call timed as "16x2"
    assert call["scatter_bwd"] == Geometry(16, 2) and call["gather_bwd"] == owns["gather_bwd"]
    assert in_force[int(times["scatter_bwd"]["own"]) - 1] == owns
    assert _geometries_in_force() == owns


def test_summary_and_table(capsys):
    times = {"scatter": {"own": 2.0, "16x8": 1.0}, "select": {"own": 0.1}}
    moved = {"scatter": 4 * 10**9, "select": None}
    rows = bench_kernels.summarize(times, moved, copy_gbs=3000.0)
    assert rows[0]["gbs"] == pytest.approx(2000.0) and rows[0]["of_copy"] == pytest.approx(2 / 3)
    assert rows[0]["fastest"] == "16x8" and rows[1]["fastest"] == "own" and "gbs" not in rows[1]
    bench_kernels.print_table("32/4", rows, 3000.0)
    out = capsys.readouterr().out
    assert "scatter" in out and "2000" in out and "0.67" in out and "16x8 (1.000 ms)" in out


def test_a_series_measures_every_step_and_reports_json(monkeypatch, capsys):
    """``measure`` end to end on the CPU (the interpreter, N=2048 with the growing pyramid: L=2), a timer that
    runs each step once: a row per step with its bytes, and a record that JSON takes."""
    import json

    import torch

    # the series' pyramid comes from bench_op.pyramid: its module's TOPK (the one it was imported from)
    monkeypatch.setitem(bench_kernels.pyramid.__globals__, "TOPK", 128)
    record = bench_kernels.measure(2, 1, 2048, "growing", [(16, 8)], torch.device("cpu"),
                                   lambda fn: (fn(), 1.0)[1], copy_gbs=1.0)
    assert (record["N"], record["levels"], record["S"]) == (2048, 2, 2048 // 4 + 4 * 128)
    assert [row["step"] for row in record["rows"]][-2:] == ["scatter_bwd", "gather_bwd"]
    assert all(row["bytes"] for row in record["rows"] if row["step"] != "select")
    assert json.loads(json.dumps(record))["rows"][0]["geometries"] == {"own": 1.0, "16x8": 1.0}
    assert "2/1 heads, N=2048, L=2" in capsys.readouterr().out
