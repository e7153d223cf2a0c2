"""benchmarks/run_quality_gpu.sh at a tiny size on CPU: variants side by side, one merged report, and what comes
back from the device machine (at most 8 files, at most 2 folders down, no checkpoints)."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import tarfile

from benchmark_utils import ROOT
from test_bench_quality import TINY

SCRIPT = ROOT / "benchmarks" / "run_quality_gpu.sh"


def _run(out: pathlib.Path, *argv: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OUT=str(out), PATH=f"{pathlib.Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    return subprocess.run(["bash", str(SCRIPT), *argv], capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env=env)


def test_two_variants_two_seeds_merge_into_one_report_and_an_archive(tmp_path):
    name = f"tiny_{tmp_path.name}"
    proc = _run(tmp_path, name, "0 1", "dense=--mode dense", "two-stage=--mode two-stage --dense-fraction 0.5",
                "--", *TINY, "--device", "cpu")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    dest = tmp_path / name
    files = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert len(files) <= 8 and all(len(f.parts) <= 3 for f in files), files  # $OUT/a/b/file at most
    assert {"quality.json", "quality.png", "merged.log", "runs.tar.gz"} <= {f.name for f in files}
    report = json.loads((dest / "quality.json").read_text())
    assert sorted((r["variant"], r["seed"]) for r in report["runs"]) == [
        ("dense", 0), ("dense", 1), ("two-stage", 0), ("two-stage", 1)]
    assert "two-stage" in (dest / "merged.log").read_text()
    with tarfile.open(dest / "runs.tar.gz") as archive:
        names = {pathlib.PurePosixPath(n).as_posix().lstrip("./") for n in archive.getnames()}
    for variant in ("dense", "two-stage"):
        assert f"{variant}.log" in names and f"{variant}/part0.log" in names and f"{variant}/part1.log" in names
        assert f"{variant}/part1/quality.json" in names
    assert not any(n.endswith(".pt") for n in names)  # checkpoints stay behind


def test_too_few_arguments_print_the_usage(tmp_path):
    proc = _run(tmp_path, "name", "0 1")
    assert proc.returncode == 2 and "usage:" in proc.stderr
