"""benchmarks/bench_train.py runs end to end at a tiny CPU size and writes its table and JSON."""

from __future__ import annotations

import json
import math
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_bench_train_tiny_cpu(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_train.py"), "--device", "cpu", "--tiny",
         "--out-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "speedup" in proc.stdout
    record = json.loads((tmp_path / "train_cpu_tiny.json").read_text())
    rows = {r["mode"]: r for r in record["rows"]}
    assert set(rows) == {"dense", "lighthouse"}
    assert record["settings"]["rope"] == "entries"  # the published placement is what the benchmark times by default
    for row in rows.values():
        assert row["seq_len"] == 512 and row["step_s"] > 0 and math.isfinite(row["step_s"])
        assert len(row["losses"]) == 3 and all(math.isfinite(x) for x in row["losses"])
