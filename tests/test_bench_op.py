"""bench_op.py's arithmetic on CPU (the timing needs a GPU): the two pyramids, the exponent fit, the table."""

from __future__ import annotations

import math

import pytest

from benchmark_utils import load_benchmark

bench_op = load_benchmark("bench_op")


def test_fixed_and_growing_pyramids():
    assert {n: bench_op.pyramid(n, "fixed").levels for n in (1 << 15, 1 << 22)} == {1 << 15: 3, 1 << 22: 3}
    growing = {n: bench_op.pyramid(n, "growing") for n in (1 << 15, 1 << 18, 1 << 22)}
    assert {n: c.levels for n, c in growing.items()} == {1 << 15: 2, 1 << 18: 3, 1 << 22: 5}
    # the subsequence stays bounded with the growing pyramid, and grows as N/16 with the fixed one
    assert growing[1 << 22].subsequence_length(1 << 22) == 16384 + 4 * 4 * 2048
    assert bench_op.pyramid(1 << 22, "fixed").subsequence_length(1 << 22) == (1 << 22) // 16 + 2 * 4 * 2048


def test_fit_exponent_recovers_a_power_law():
    lengths = [2**i for i in range(15, 23)]
    assert bench_op.fit_exponent(lengths, [3e-9 * n**1.7 for n in lengths]) == pytest.approx(1.7)
    assert bench_op.fit_exponent(lengths, [5.0 + 0 * n for n in lengths]) == pytest.approx(0.0, abs=1e-12)
    assert math.isnan(bench_op.fit_exponent([1024], [1.0]))


def test_exponents_fit_lighthouse_over_128k_to_4m_and_dense_over_what_ran(capsys):
    def rows(a, start=15):
        return [{"N": 2**i, "fwd_bwd_ms": 2.0 ** (a * (i - 15)), "peak_gib": 1.0, "levels": 3, "S": 1}
                for i in range(start, 24)]

    growing = rows(1.0)
    growing[0]["fwd_bwd_ms"] *= 50  # below 128K: not in the fit
    growing[-1]["fwd_bwd_ms"] *= 50  # 8M, above 4M: not in the fit
    series = {"fixed": rows(1.5), "growing": growing, "dense": rows(2.0)[:5] + [{"N": 2**20, "oom": True}]}
    fits = bench_op.exponents(series)
    assert fits == pytest.approx({"fixed": 1.5, "growing": 1.0, "dense": 2.0})
    bench_op.print_table(series, fits)
    table = capsys.readouterr().out
    assert "| 1048576 |" in table and "| OOM | - |" in table
    assert "growth exponent a (time ∝ N^a): fixed 1.500, growing 1.000, dense 2.000" in table
