"""bench_op.py's logic on CPU (the timing needs a GPU): the pyramids, the head layouts, the byte floor, the rounds'
statistics, the grid's series (stubbed rows), the exponent fit, the table."""

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


def test_default_grid_and_head_layouts():
    args = bench_op.parse_args([])
    assert args.layouts == [(32, 8), (32, 4), (16, 1), (8, 8)]
    assert args.length_list == [131072, 524288, 1048576]
    assert (args.dense, args.rounds, args.expanded_baseline, args.full_dense) == ("cudnn", 5, False, False)
    assert bench_op.parse_heads("16/1, 8/8") == [(16, 1), (8, 8)]
    for bad in ("32/5", "32", "0/1", "a/b", "8/8/8"):
        with pytest.raises(ValueError, match=f"--heads item '{bad}'"):
            bench_op.parse_heads(bad)
    with pytest.raises(SystemExit):
        bench_op.parse_args(["--heads", "6/4"])
    with pytest.raises(SystemExit):
        bench_op.parse_args(["--rounds", "0"])


def test_byte_floor_counts_q_k_v_out_and_their_gradients_once():
    # 1M tokens, 32 query and 4 kv heads, D=128, bf16: q, out, dq, dout 8 GiB each; k, v, dk, dv 1 GiB each
    assert bench_op.floor_bytes(1 << 20, 32, 4) == 36 * 2**30
    assert bench_op.floor_bytes(1 << 20, 8, 8) == 16 * 2**30


def test_rounds_give_the_floor_and_the_ratio_per_round():
    copy_ms = 2 * bench_op.COPY_BYTES / 2e9  # 2 GB/ms: 1 GiB read and written in ~1.07 ms
    bytes_moved = 4 * 10**9  # 2 ms at that bandwidth
    rounds = {"op": [12.0, 13.0, 30.0], "dense": [9.0, 10.0, 10.0], "copy": [copy_ms] * 3,
              "expanded": [22.0, 24.0, 60.0]}
    got = bench_op.summarize_rounds(rounds, bytes_moved)
    assert got["bytes_ms"] == pytest.approx(2.0) and got["bandwidth_gbs"] == pytest.approx(2000.0)
    assert got["floor_ms"] == pytest.approx(12.0) and got["dense_ms"] == 10.0 and got["op_ms"] == 13.0
    # per-round ratios 12/11, 13/12, 30/12: median and range (one slow round does not move the median)
    assert got["op_ratio"] == pytest.approx(12 / 11)
    assert got["op_ratio_range"] == pytest.approx([13 / 12, 30 / 12])
    assert got["expanded_ratio"] == pytest.approx(2.0) and got["rounds"] == 3
    assert "expanded_ratio" not in bench_op.summarize_rounds({k: rounds[k] for k in ("op", "dense", "copy")}, 1)


def _row(n, heads, kind, ms):
    h, h_kv = heads
    return {"levels": bench_op.pyramid(n, kind).levels, "S": 1, "op_ms": ms, "floor_ms": ms / 1.05,
            "dense_ms": ms / 1.2, "bytes_ms": 1.0, "op_ratio": 1.05, "op_ratio_range": [1.0, 1.1],
            "op_peak_gib": 2.0, "expanded_ms": 2 * ms, "expanded_ratio": 2.1, "expanded_peak_gib": 4.0}


def test_grid_reuses_equal_pyramids_and_stops_a_series_at_out_of_memory(monkeypatch, capsys):
    calls = []

    def row(n, heads, kv_heads, kind, attention, rounds, expanded):
        calls.append((n, heads, kind))
        if (heads, kind, n) == (32, "fixed", 1 << 20):
            raise bench_op.torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 27 GiB")
        return _row(n, (heads, kv_heads), kind, float(n >> 10))

    def dense(n, heads, kv_heads):
        return {"fwd_bwd_ms": 4000.0 * (n >> 17) ** 2, "peak_gib": 1.0}

    monkeypatch.setattr(bench_op, "bench_row", row)
    monkeypatch.setattr(bench_op, "bench_full_dense", dense)
    monkeypatch.setattr(bench_op.torch.cuda, "empty_cache", lambda: None)
    lengths = [1 << 17, 1 << 19, 1 << 20, 1 << 21]
    rows = bench_op.run_grid([(32, 4)], lengths, None, 1, True, True)
    # 128K: the growing pyramid is the fixed one (levels 3), timed once; 1M fixed ran out of memory, so 2M fixed
    # is not run; dense stops after 512K, its first length over 10 s
    assert (1 << 17, 32, "growing") not in calls and (1 << 21, 32, "fixed") not in calls
    assert (1 << 21, 32, "growing") in calls
    kinds = [(r["N"], r["pyramid"]) for r in rows]
    assert kinds.count((1 << 17, "growing")) == 1 and (1 << 20, "dense") not in kinds
    assert [r.get("oom", False) for r in rows if r["pyramid"] == "fixed"] == [False, False, True]
    assert next(r for r in rows if (r["N"], r["pyramid"]) == (1 << 17, "growing"))["op_ms"] == 128.0
    fits = bench_op.exponents(rows)
    assert set(fits) == {"32/4 fixed", "32/4 growing", "32/4 dense"}
    assert fits["32/4 growing"] == pytest.approx(1.0) and fits["32/4 dense"] == pytest.approx(2.0)
    capsys.readouterr()
    bench_op.print_table(rows, fits)
    table = capsys.readouterr().out
    assert "| 32/4 | 1048576 | fixed | out of memory |" in table
    assert "| 32/4 | 131072 | fixed | 3 | 1 | 128 | 121.9 (106.7 + 1.00) | 1.050 [1.000-1.100] | 2 | 256 | 2.100 | 4 |" \
        in table
    assert "| 32/4 | 524288 | 64000 | 1 |" in table  # the full dense rows
    assert "growth exponent a (time ∝ N^a): 32/4 dense 2.000" in table


def test_table_marks_an_expanded_path_out_of_memory(capsys):
    row = {"heads": "32/4", "H": 32, "H_kv": 4, "N": 1 << 20, "pyramid": "growing",
           **_row(1 << 20, (32, 4), "growing", 100.0), "expanded_oom": True}
    bench_op.print_table([row], {})
    assert "| 1.050 [1.000-1.100] | 2 | out of memory | - | - |" in capsys.readouterr().out


def test_fit_exponent_recovers_a_power_law():
    lengths = [2**i for i in range(15, 23)]
    assert bench_op.fit_exponent(lengths, [3e-9 * n**1.7 for n in lengths]) == pytest.approx(1.7)
    assert bench_op.fit_exponent(lengths, [5.0 + 0 * n for n in lengths]) == pytest.approx(0.0, abs=1e-12)
    assert math.isnan(bench_op.fit_exponent([1024], [1.0]))


def test_stage_times_runs_every_stage_forward_and_backward(monkeypatch):
    """Each stage's callable runs (the kernels under the interpreter, at a small size); the backward stages return
    the gradients of their own inputs."""
    import torch

    from megatron_lighthouse import LighthouseConfig

    results = {}

    def record(fn):
        results[len(results)] = fn()
        return float(len(results))

    monkeypatch.setattr(bench_op, "median_ms", record)
    monkeypatch.setattr(bench_op, "TOPK", 128)
    n, config = 2048, LighthouseConfig(levels=3, pooling_factor=4, topk=128)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, n, h, bench_op.D, generator=gen) for h in (2, 1, 1))
    times = bench_op.stage_times(q, k, v, config, n, lambda q, k, v, scale: v)
    assert list(times) == ["pool_score_ms", "select_ms", "gather_ms", "dense_sub_ms", "scatter_ms",
                           "scatter_bwd_ms", "gather_bwd_ms"]
    assert list(times.values()) == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]
    (d_sub,), (dq, dk, dv) = results[5], results[6]
    assert d_sub.shape == (1, 2, config.subsequence_length(n), bench_op.D)
    assert (dq.shape, dk.shape, dv.shape) == (q.shape, k.shape, v.shape)
