"""The launch examples parse, validate their variables before launching, and build the documented command."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"
SCRIPTS = ["pretrain_lighthouse_1gpu.sh", "pretrain_lighthouse_multinode_1m.sh", "resume_dense.sh"]


def _run(script: str, tmp_path: pathlib.Path, **env: str) -> subprocess.CompletedProcess:
    full = {"PATH": f"{pathlib.Path(sys.executable).parent}:{os.environ['PATH']}", "HOME": str(tmp_path)}
    full.update(env)
    return subprocess.run(["bash", str(EXAMPLES / script)], env=full, capture_output=True, text=True, timeout=120)


@pytest.fixture()
def megatron_lm(tmp_path):
    root = tmp_path / "Megatron-LM"
    root.mkdir()
    (root / "pretrain_gpt.py").write_text("# stand-in\n")
    return root


@pytest.mark.parametrize("script", SCRIPTS + ["common.sh"])
def test_scripts_parse(script):
    assert subprocess.run(["bash", "-n", str(EXAMPLES / script)]).returncode == 0


@pytest.mark.parametrize("script", SCRIPTS)
def test_missing_megatron_lm_dir_is_refused(script, tmp_path):
    proc = _run(script, tmp_path)
    assert proc.returncode == 2 and "MEGATRON_LM_DIR is not set" in proc.stderr


def test_one_gpu_dry_run_and_validation(tmp_path, megatron_lm):
    base = dict(MEGATRON_LM_DIR=str(megatron_lm), DATA_PATH="/data/x", TOKENIZER_MODEL="tok", DRY_RUN="1")
    proc = _run("pretrain_lighthouse_1gpu.sh", tmp_path, **base)
    assert proc.returncode == 0, proc.stderr
    assert "lighthouse: subsequence 24576 of 131072 tokens" in proc.stdout
    assert "--spec megatron_lighthouse.spec lighthouse_layer_spec" in proc.stdout
    assert "--seq-length 131072" in proc.stdout
    bad = _run("pretrain_lighthouse_1gpu.sh", tmp_path, **base, SEQ_LEN="100000")
    assert bad.returncode == 2 and "SEQ_LEN/TOPK/POOLING_FACTOR/LEVELS" in bad.stderr
    assert _run("pretrain_lighthouse_1gpu.sh", tmp_path, **base, TOPK="abc").stderr.strip().endswith(
        "TOPK=abc: must be a positive integer")
    assert "DATA_PATH is not set" in _run("pretrain_lighthouse_1gpu.sh", tmp_path, MEGATRON_LM_DIR=str(megatron_lm)).stderr


def test_multinode_1m_checks_cp_and_monitor(tmp_path, megatron_lm):
    base = dict(MEGATRON_LM_DIR=str(megatron_lm), DATA_PATH="/d", TOKENIZER_MODEL="t", NNODES="4",
                MASTER_ADDR="node0", DRY_RUN="1")
    refused = _run("pretrain_lighthouse_multinode_1m.sh", tmp_path, **base)
    assert refused.returncode == 2 and "MONITOR=1 needs the patched pretrain_gpt.py" in refused.stderr
    proc = _run("pretrain_lighthouse_multinode_1m.sh", tmp_path, **base, MONITOR="0")
    assert proc.returncode == 0, proc.stderr
    assert "--context-parallel-size 8" in proc.stdout and "--seq-length 1048576" in proc.stdout
    (megatron_lm / "pretrain_gpt.py").write_text("import megatron_lighthouse\n")
    assert "--lighthouse-monitor" in _run("pretrain_lighthouse_multinode_1m.sh", tmp_path, **base).stdout
    bad = _run("pretrain_lighthouse_multinode_1m.sh", tmp_path, **base, CP_SIZE="3")
    assert bad.returncode == 2 and "CP_SIZE=3 must divide" in bad.stderr


def test_resume_dense_needs_the_checkpoint(tmp_path, megatron_lm):
    base = dict(MEGATRON_LM_DIR=str(megatron_lm), DATA_PATH="/d", TOKENIZER_MODEL="t", DRY_RUN="1")
    missing = _run("resume_dense.sh", tmp_path, **base, LIGHTHOUSE_CHECKPOINT=str(tmp_path / "nope"))
    assert missing.returncode == 2 and "no such directory" in missing.stderr
    proc = _run("resume_dense.sh", tmp_path, **base, LIGHTHOUSE_CHECKPOINT=str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert "dense_local_layer_spec" in proc.stdout and f"--load {tmp_path}" in proc.stdout


def test_patched_script_gets_the_lighthouse_flags(tmp_path, megatron_lm):
    base = dict(MEGATRON_LM_DIR=str(megatron_lm), DATA_PATH="/d", TOKENIZER_MODEL="t", DRY_RUN="1")
    unpatched = _run("pretrain_lighthouse_1gpu.sh", tmp_path, **base, DENSE_FROM_ITER="8000")
    assert unpatched.returncode == 2 and "DENSE_FROM_ITER needs the patched pretrain_gpt.py" in unpatched.stderr
    (megatron_lm / "pretrain_gpt.py").write_text("from megatron_lighthouse.megatron_lm import start_lighthouse\n")
    proc = _run("pretrain_lighthouse_1gpu.sh", tmp_path, **base, DENSE_FROM_ITER="8000", DENSE_LAYERS="0")
    assert proc.returncode == 0, proc.stderr
    assert ("--lighthouse --lighthouse-topk 2048 --lighthouse-pooling-factor 4 --lighthouse-levels 3 "
            "--lighthouse-dense-layers 0 --lighthouse-dense-from-iteration 8000") in proc.stdout
    assert "--spec" not in proc.stdout
    bad = _run("pretrain_lighthouse_1gpu.sh", tmp_path, **base, DENSE_FROM_ITER="soon")
    assert bad.returncode == 2 and "DENSE_FROM_ITER=soon: must be an integer >= 0" in bad.stderr
    multi = _run("pretrain_lighthouse_multinode_1m.sh", tmp_path, **base, NNODES="4", MASTER_ADDR="node0")
    assert multi.returncode == 0, multi.stderr
    assert "--lighthouse --lighthouse-topk 2048" in multi.stdout and "--lighthouse-monitor" in multi.stdout
