"""benchmarks/probe_selection_leak.py on a tiny demo run (CPU): dense is causal, Lighthouse's selection is not."""

from __future__ import annotations

import json

from benchmark_utils import run_python

TINY = ["--layers", "2", "--hidden", "32", "--heads", "2", "--ffn", "64", "--seq-len", "1024", "--levels", "2",
        "--pooling-factor", "4", "--topk", "128", "--dense-layers", "0", "--batch-size", "2", "--eval-every", "2",
        "--eval-batches", "1", "--log-every", "2", "--corpus-bytes", "300000", "--warmup", "1", "--steps", "2"]




def test_probe_dense_is_causal_lighthouse_selection_reads_ahead(tmp_path):
    runs = []
    for mode in ("lighthouse", "dense"):
        runs.append(str(tmp_path / mode))
        proc = run_python("-m", "megatron_lighthouse.demo", *TINY, "--mode", mode, "--out", runs[-1])
        assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "leak.json"
    proc = run_python("benchmarks/probe_selection_leak.py", "--run-dir", *runs, "--windows", "6", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert [r["trained_as"] for r in results] == ["lighthouse", "dense"] and all(r["step"] == 2 for r in results)
    for r in results:
        assert r["tile"] == 1024 and r["prefix"] == 511 and r["windows"] == 6
        # dense attention: what follows the prefix cannot change its loss, to the bit
        assert r["dense_gain"] == 0.0 and r["dense_windows_changed"] == 0
        assert r["dense_own"] == r["dense_swapped"]
        # Lighthouse: the tile has 256 coarse entries for 128 picks, and its later half competes with the
        # prefix for them, so the prefix's loss moves
        assert r["lighthouse_windows_changed"] > 0
        assert abs(r["lighthouse_gain"] - (r["lighthouse_swapped"] - r["lighthouse_own"])) < 1e-6
    assert "gain:" in proc.stdout and "lighthouse" in proc.stdout


def test_probe_refuses_a_directory_without_checkpoint(tmp_path):
    proc = run_python("benchmarks/probe_selection_leak.py", "--run-dir", str(tmp_path))
    assert proc.returncode == 2 and "no checkpoint.pt" in proc.stderr
