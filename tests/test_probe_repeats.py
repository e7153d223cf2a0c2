"""benchmarks/probe_repeats.py: the repeat detector on built sequences, and the probe on a tiny demo run (CPU)."""

from __future__ import annotations

import json
import random

import pytest

from benchmark_utils import load_benchmark, run_python

TINY = ["--layers", "2", "--hidden", "32", "--heads", "2", "--ffn", "64", "--seq-len", "1024", "--levels", "2",
        "--pooling-factor", "4", "--topk", "128", "--dense-layers", "0", "--batch-size", "2", "--eval-every", "2",
        "--eval-batches", "2", "--log-every", "2", "--corpus-bytes", "300000", "--warmup", "1", "--steps", "2"]


def _probe_module():
    return load_benchmark("probe_repeats")




def test_repeat_distances_find_a_copied_passage():
    probe = _probe_module()
    rng = random.Random(0)
    text = bytes(rng.randrange(256) for _ in range(40))
    window = text + text[:10]  # bytes 40..49 copy bytes 0..9
    dist = probe.repeat_distances(window, ngram=4)
    assert len(dist) == len(window) - 1
    # target i (loss position i-1) is a repeat once its 4 context bytes are inside the copy too: i = 44..49
    assert [i + 1 for i, d in enumerate(dist) if d] == list(range(44, 50))
    assert {d for d in dist if d} == {40}
    # the latest earlier occurrence counts: a third copy is 10 bytes after the second
    assert probe.repeat_distances(window + text[:10], ngram=4)[-1] == 10


def test_bucket_ids_by_distance_ranges():
    probe = _probe_module()
    assert probe.bucket_names([256, 4096]) == ["new", "d<256", "256<=d<4096", "d>=4096"]
    assert probe.bucket_ids([0, 1, 255, 256, 4095, 4096, 9000], [256, 4096]).tolist() == [0, 1, 1, 2, 2, 3, 3]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("repeats") / "two-stage"
    proc = run_python("-m", "megatron_lighthouse.demo", *TINY, "--mode", "two-stage", "--dense-fraction", "0.5",
                      "--out", str(run))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


def test_probe_splits_the_runs_own_validation_loss(demo_run, tmp_path):
    out = tmp_path / "repeats.json"
    proc = run_python("benchmarks/probe_repeats.py", "--run-dir", str(demo_run), "--ngram", "8", "--distances", "64",
                      "256", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (r,) = json.loads(out.read_text())
    assert r["trained_as"] == "two-stage" and r["step"] == 2 and r["windows"] == 4
    assert r["buckets"] == ["new", "d<64", "64<=d<256", "d>=256"]
    final = json.loads((demo_run / "metrics.json").read_text())["final_val_loss"]
    assert r["dense"]["all"]["loss"] == pytest.approx(final, rel=1e-5)  # the demo's own validation windows
    assert r["lighthouse"]["all"]["loss"] != pytest.approx(final, rel=1e-5)
    for mode in ("dense", "lighthouse"):
        parts = [r[mode][b] for b in r["buckets"]]
        assert sum(p["fraction"] for p in parts) == pytest.approx(1.0)
        assert sum(p["fraction"] * p["loss"] for p in parts if p["fraction"]) == pytest.approx(r[mode]["all"]["loss"])
    assert r["dense"]["new"]["fraction"] < 1.0  # source code repeats 9-grams within 1K bytes
    assert "d>=256" in proc.stdout and "lighthouse" in proc.stdout


@pytest.mark.parametrize("argv,message", [
    (["--distances", "256", "64"], "--distances 256 64: must be positive and strictly increasing"),
    (["--ngram", "0"], "--ngram 0: must be >= 1"),
    (["--windows", "0"], "--windows 0: must be >= 1"),
])
def test_bad_flags(argv, message, tmp_path):
    proc = run_python("benchmarks/probe_repeats.py", "--run-dir", str(tmp_path), *argv)
    assert proc.returncode == 2 and message in proc.stderr


def test_directory_without_checkpoint(tmp_path):
    proc = run_python("benchmarks/probe_repeats.py", "--run-dir", str(tmp_path))
    assert proc.returncode == 2 and "no checkpoint.pt" in proc.stderr
