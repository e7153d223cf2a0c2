"""The main job runs end to end at a tiny size: two stages, the dense baseline, Lighthouse throughout, resume."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

TINY = ["--layers", "2", "--hidden", "32", "--heads", "2", "--ffn", "64", "--seq-len", "256", "--levels", "2",
        "--pooling-factor", "2", "--topk", "128", "--dense-layers", "0", "--batch-size", "2", "--eval-every", "3",
        "--eval-batches", "1", "--log-every", "3", "--corpus-bytes", "300000", "--warmup", "2"]


def _demo(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-W", "ignore", "-m", "megatron_lighthouse.demo", *TINY, *args],
                          capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("mode,stages", [("two-stage", ["lighthouse", "dense"]), ("dense", ["dense"]),
                                         ("lighthouse", ["lighthouse"])])
def test_modes_train_and_write_outputs(tmp_path, mode, stages):
    proc = _demo("--mode", mode, "--steps", "6", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert [s["stage"] for s in metrics["stages"]] == stages
    assert [t["stage"] for t in metrics["train"]][-1] == stages[-1]
    assert all(e["val_loss"] > 0 for e in metrics["evals"]) and len(metrics["evals"]) == 2
    assert (tmp_path / "loss.png").stat().st_size > 5000
    assert "final val loss (dense)" in proc.stdout
    if mode == "two-stage":
        assert "switching Lighthouse off" in proc.stdout
        assert [t["stage"] for t in metrics["train"]] == ["lighthouse"] * 5 + ["dense"]
    # The saved model is a plain dense state dict: no Lighthouse-specific keys.
    state = torch.load(tmp_path / "model_dense.pt", weights_only=False)
    assert not any("inner" in key for key in state)


def test_baseline_flag_is_dense(tmp_path):
    proc = _demo("--baseline", "--steps", "3", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "metrics.json").read_text())["config"]["mode"] == "dense"


def test_resume_continues_from_the_checkpoint(tmp_path):
    first = _demo("--mode", "lighthouse", "--steps", "3", "--out", str(tmp_path))
    assert first.returncode == 0, first.stderr[-3000:]
    second = _demo("--mode", "lighthouse", "--steps", "6", "--out", str(tmp_path), "--resume")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stdout and "at step 3" in second.stdout
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert [t["step"] for t in metrics["train"]] == list(range(6))


@pytest.mark.parametrize("args,message", [
    (["--seq-len", "200"], "--seq-len 200 does not fit the Lighthouse settings"),
    (["--corpus", "/nonexistent/corpus"], "--corpus /nonexistent/corpus: no such file or directory"),
    (["--dense-layers", "0,1"], "keeps all 2 layers dense"),
    (["--hidden", "33"], "--hidden 33: must be divisible by --heads 2"),
])
def test_bad_settings_fail_clearly(args, message):
    proc = _demo(*args)
    assert proc.returncode == 2
    assert message in proc.stderr
