"""demo.runs.load_trained_run: a finished demo run's model back, with the settings it was trained with."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = ["--layers", "2", "--hidden", "32", "--heads", "2", "--ffn", "64", "--seq-len", "256", "--levels", "2",
        "--pooling-factor", "2", "--topk", "128", "--dense-layers", "0", "--batch-size", "2", "--eval-every", "2",
        "--eval-batches", "1", "--log-every", "2", "--corpus-bytes", "300000", "--warmup", "1", "--steps", "2"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "run"
    proc = subprocess.run([sys.executable, "-m", "megatron_lighthouse.demo", *TINY, "--rope", "tokens", "--out",
                           str(out)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_loads_the_model_and_its_settings(run_dir):
    from megatron_lighthouse.demo.runs import load_trained_run

    run = load_trained_run(str(run_dir))
    assert run.trained_as == "two-stage" and run.step == 2 and run.cfg.rope == "tokens" and run.cfg.layers == 2
    saved = torch.load(run_dir / "checkpoint.pt", weights_only=False)["model"]
    state = run.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in saved.items() if isinstance(v, torch.Tensor))


def test_a_checkpoint_from_before_the_rope_and_dense_every_settings(run_dir, tmp_path):
    from megatron_lighthouse.demo.runs import load_trained_run

    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    del ckpt["config"]["rope"], ckpt["config"]["dense_every"]
    ckpt["config"]["seed"] = 7
    (tmp_path / "old").mkdir()
    torch.save(ckpt, tmp_path / "old" / "checkpoint.pt")
    run = load_trained_run(str(tmp_path / "old"))
    assert run.cfg.rope == "tokens" and run.cfg.dense_every == 0 and run.cfg.seed == 7


def test_no_checkpoint_is_a_clear_error(tmp_path):
    from megatron_lighthouse.demo.runs import load_trained_run

    with pytest.raises(ValueError, match="no checkpoint.pt"):
        load_trained_run(str(tmp_path))
