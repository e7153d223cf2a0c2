"""The launch examples parse, validate their variables before launching, and build the documented command,
for a Megatron-LM checkout with and without the hook of ``patches/``; ``benchmarks/run_megatron_lm_gpu.sh`` drives
them through the user path (its ``DRY_RUN=1``).

With ``MEGATRON_LM_DIR`` pointing at a Megatron-LM checkout (e.g. the commit of ``patches/apply.sh``), the tests
marked ``checkout`` also run the examples against a patched and a pristine copy of it, and Megatron-LM's own
argument parser and model builder take the commands they print (``patches/check_patched.py -- COMMAND``, on CPU).
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import shlex
import shutil
import subprocess
import sys
import tarfile

import pytest
import torch

from test_patches import PATCH, parse_patch

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
GPU_SCRIPT = ROOT / "benchmarks" / "run_megatron_lm_gpu.sh"
SCRIPTS = ["pretrain_lighthouse_1gpu.sh", "pretrain_lighthouse_multinode_1m.sh", "resume_dense.sh"]
#: The HybridModel example (pretrain_hybrid.py), and the pattern it builds at NUM_LAYERS=8: a '*-' per GPT block.
HYBRID = "pretrain_lighthouse_hybrid_1gpu.sh"
PATTERN8 = "*-" * 8
MODEL = ("--num-layers 30 --hidden-size 1024 --num-attention-heads 8 --ffn-hidden-size 1536 --swiglu "
         "--normalization RMSNorm --position-embedding-type rope --disable-bias-linear --attention-dropout 0 "
         "--hidden-dropout 0")
#: What TRANSFORMER_IMPL=local adds: Megatron-LM's defaults that need TransformerEngine, off.
LOCAL = "--no-rope-fusion --no-persist-layer-norm"
#: What every implementation adds without Apex (as on this machine): Megatron-LM's default that needs it, off.
NO_APEX = "--no-gradient-accumulation-fusion"
MOCK = "--mock-data --tokenizer-type NullTokenizer --vocab-size 32000 --no-create-attention-mask-in-dataloader"
NO_MASK = "--no-create-attention-mask-in-dataloader"
#: Extra variables each example needs besides MEGATRON_LM_DIR and the data (LIGHTHOUSE_CHECKPOINT: made by _env).
NEEDS = {"pretrain_lighthouse_1gpu.sh": {}, "pretrain_lighthouse_multinode_1m.sh": dict(NNODES="4", MASTER_ADDR="node0"),
         "resume_dense.sh": dict(LIGHTHOUSE_CHECKPOINT="ckpt"), "pretrain_lighthouse_hybrid_1gpu.sh": {}}
LIGHTHOUSE = ("--lighthouse --lighthouse-topk 2048 --lighthouse-pooling-factor 4 --lighthouse-levels 3 "
              "--lighthouse-dense-layers 0,1,-2,-1")


def _run(script: str, tmp_path: pathlib.Path, **env: str) -> subprocess.CompletedProcess:
    """Run an example; with ``DRY_RUN=1`` its ``stdout`` becomes its notes plus the command line as the shell
    reads it (``DRY_RUN`` prints it shell-quoted)."""
    full = {"PATH": f"{pathlib.Path(sys.executable).parent}:{os.environ['PATH']}", "HOME": str(tmp_path)}
    full.update(env)
    proc = subprocess.run(["bash", str(EXAMPLES / script)], env=full, capture_output=True, text=True, timeout=120)
    if proc.returncode == 0 and env.get("DRY_RUN") == "1":
        *notes, command = proc.stdout.strip().splitlines()
        proc.stdout = "\n".join(notes + [" ".join(shlex.split(command))])
    return proc


def _past_preflight(tmp_path: pathlib.Path) -> dict:
    """The environment in which a real (not dry) launch on this CPU machine passes the examples' preflight: torch
    answers that it sees a GPU (a ``sitecustomize`` on ``PYTHONPATH``) and a stand-in ``transformer_engine`` imports."""
    site = tmp_path / "gpu_site"
    (site / "transformer_engine").mkdir(parents=True, exist_ok=True)
    (site / "transformer_engine" / "__init__.py").write_text("")
    (site / "sitecustomize.py").write_text("import torch\ntorch.cuda.is_available = lambda: True\n")
    return {"PYTHONPATH": str(site)}


def _stand_in(root: pathlib.Path, patched: bool, scripts=("pretrain_gpt.py", "pretrain_hybrid.py")) -> pathlib.Path:
    root.mkdir()
    hook = "from megatron_lighthouse.megatron_lm import start_lighthouse\n" if patched else "# stand-in\n"
    for script in scripts:
        (root / script).write_text(hook)
    return root


@pytest.fixture()
def megatron_lm(tmp_path):
    return _stand_in(tmp_path / "Megatron-LM", patched=False)


@pytest.fixture()
def patched(tmp_path):
    return _stand_in(tmp_path / "Megatron-LM-patched", patched=True)


def _base(root: pathlib.Path, **env: str) -> dict:
    return dict(MEGATRON_LM_DIR=str(root), DATA_PATH="/data/x", TOKENIZER_MODEL="tok", DRY_RUN="1", **env)


def _mock(root: pathlib.Path, **env: str) -> dict:
    """MOCK_DATA=1: no DATA_PATH, no TOKENIZER_MODEL."""
    return dict(MEGATRON_LM_DIR=str(root), MOCK_DATA="1", DRY_RUN="1", **env)


def _needs(script: str, tmp_path: pathlib.Path) -> dict:
    """The script's other required variables; a checkpoint directory that exists for resume_dense.sh."""
    (tmp_path / "ckpt").mkdir(exist_ok=True)
    return {k: str(tmp_path / v) if k == "LIGHTHOUSE_CHECKPOINT" else v for k, v in NEEDS[script].items()}


@pytest.mark.parametrize("script", SCRIPTS + ["common.sh", HYBRID])
def test_scripts_parse(script):
    assert subprocess.run(["bash", "-n", str(EXAMPLES / script)]).returncode == 0


@pytest.mark.parametrize("script", SCRIPTS + [HYBRID])
def test_scripts_document_their_variables(script):
    header = [line for line in (EXAMPLES / script).read_text().splitlines() if line.startswith("#")]
    text = "\n".join(header)
    for var in ("MEGATRON_LM_DIR", "DATA_PATH", "TOKENIZER_MODEL", "MOCK_DATA", "SEQ_LEN", "NUM_LAYERS",
                "TRANSFORMER_IMPL", "LR_DECAY_STYLE", "LR_WARMUP_ITERS", "GLOBAL_BATCH", "LOG_INTERVAL", "DRY_RUN"):
        assert var in text, f"{script} does not document {var}"


@pytest.mark.parametrize("script", SCRIPTS)
def test_missing_megatron_lm_dir_is_refused(script, tmp_path):
    proc = _run(script, tmp_path)
    assert proc.returncode == 2 and "MEGATRON_LM_DIR is not set" in proc.stderr
    proc = _run(script, tmp_path, MEGATRON_LM_DIR=str(tmp_path))
    assert proc.returncode == 2 and "no pretrain_gpt.py there" in proc.stderr


def test_one_gpu_unpatched_uses_the_spec_entry(tmp_path, megatron_lm):
    proc = _run("pretrain_lighthouse_1gpu.sh", tmp_path, **_base(megatron_lm))
    assert proc.returncode == 0, proc.stderr
    assert "lighthouse: subsequence 24576 of 131072 tokens" in proc.stdout
    assert "--spec megatron_lighthouse.env_spec lighthouse_layer_spec --transformer-impl transformer_engine" in proc.stdout
    assert MODEL in proc.stdout and "--seq-length 131072 --max-position-embeddings 131072" in proc.stdout
    # The spec module reads its settings from the environment: the printed line carries them, ready to paste.
    command = proc.stdout.splitlines()[-1]
    assert command.startswith("LIGHTHOUSE_LEVELS=3 LIGHTHOUSE_POOLING_FACTOR=4 LIGHTHOUSE_TOPK=2048 "
                              "LIGHTHOUSE_DENSE_LAYERS=0,1,-2,-1 torchrun --nproc-per-node 1 ")
    local = _run("pretrain_lighthouse_1gpu.sh", tmp_path, **_base(megatron_lm), TRANSFORMER_IMPL="local", TOPK="1024")
    assert "LIGHTHOUSE_TOPK=1024 LIGHTHOUSE_DENSE_LAYERS=0,1,-2,-1 torchrun" in local.stdout
    assert "--spec megatron_lighthouse.env_spec lighthouse_local_layer_spec --transformer-impl local" in local.stdout
    refused = _run("pretrain_lighthouse_1gpu.sh", tmp_path, **_base(megatron_lm), DENSE_FROM_ITER="8000")
    assert refused.returncode == 2 and "DENSE_FROM_ITER needs the patched pretrain_gpt.py" in refused.stderr


def test_one_gpu_patched_passes_the_flags(tmp_path, patched):
    proc = _run("pretrain_lighthouse_1gpu.sh", tmp_path, **_base(patched), DENSE_FROM_ITER="8000", DENSE_LAYERS="0")
    assert proc.returncode == 0, proc.stderr
    assert ("--lighthouse --lighthouse-topk 2048 --lighthouse-pooling-factor 4 --lighthouse-levels 3 "
            "--lighthouse-dense-layers 0 --lighthouse-dense-from-iteration 8000") in proc.stdout
    assert "--spec" not in proc.stdout and "LIGHTHOUSE_" not in proc.stdout
    assert proc.stdout.splitlines()[-1].startswith("torchrun --nproc-per-node 1 ")


@pytest.mark.parametrize("env, message", [
    (dict(SEQ_LEN="100000"), "SEQ_LEN/TOPK/POOLING_FACTOR/LEVELS: sequence length 100000: must be divisible by"),
    (dict(SEQ_LEN="16384"), "needs >= 128"),
    (dict(TOPK="abc"), "TOPK=abc: must be a positive integer"),
    (dict(TOPK="100"), "SEQ_LEN/TOPK/POOLING_FACTOR/LEVELS: TOPK=100: must be a positive multiple of 128"),
    (dict(LEVELS="1"), "SEQ_LEN/TOPK/POOLING_FACTOR/LEVELS: LEVELS=1: must be >= 2"),
    (dict(DENSE_LAYERS="0,40"), "DENSE_LAYERS=0,40 with NUM_LAYERS=30: LighthouseConfig.dense_layers entry 40"),
    (dict(DENSE_LAYERS="all"), "DENSE_LAYERS=all: must be comma-separated layer indices"),
    (dict(NUM_LAYERS="3"), "DENSE_LAYERS=0,1,-2,-1 keeps all NUM_LAYERS=3 layers dense: no layer would run Lighthouse"),
    (dict(HIDDEN="1000", HEADS="16"), "HIDDEN=1000 must be divisible by HEADS=16"),
    (dict(TRANSFORMER_IMPL="te"), "TRANSFORMER_IMPL=te: must be transformer_engine or local"),
    (dict(DENSE_FROM_ITER="soon"), "DENSE_FROM_ITER=soon: must be an integer >= 0"),
    (dict(DATA_PATH=""), "DATA_PATH is not set"),
    (dict(LR="fast"), "LR=fast: must be a decimal number such as 2e-3"),
    (dict(LR_DECAY_STYLE="WSD"), "LR_DECAY_STYLE=WSD: must be cosine, constant or linear"),
    (dict(TRAIN_ITERS="4"), "LR_WARMUP_ITERS=2000: the warm-up must end before the last iteration (4)"),
    (dict(LR_WARMUP_ITERS="-1"), "LR_WARMUP_ITERS=-1: must be an integer >= 0"),
    (dict(LR="1e-4"), "MIN_LR=2e-4: must not exceed LR=1e-4"),
    (dict(MOCK_DATA="yes"), "MOCK_DATA=yes: must be 0 or 1"),
    (dict(MOCK_DATA="1", VOCAB_SIZE="32k"), "VOCAB_SIZE=32k: must be a positive integer"),
    (dict(GLOBAL_BATCH="0"), "GLOBAL_BATCH=0: must be a positive integer"),
    (dict(LOG_INTERVAL="often"), "LOG_INTERVAL=often: must be a positive integer"),
    (dict(EVAL_ITERS="0"), "EVAL_ITERS=0: must be a positive integer"),
    (dict(MONITOR="2"), "MONITOR=2: must be 0 or 1"),
    (dict(DENSE="yes"), "DENSE=yes: must be 0 or 1"),
    (dict(DENSE="1", DENSE_FROM_ITER="8000"), "DENSE_FROM_ITER=8000 with DENSE=1: the model is dense from the start"),
    (dict(DRY_RUN="yes"), "DRY_RUN=yes: must be 0 or 1"),  # a typo must not launch
    (dict(LR="0"), "LR=0: must be > 0 (the peak learning rate)"),
    (dict(LR="0.0", MIN_LR="0"), "LR=0.0: must be > 0"),
    (dict(NUM_LAYERS="9" * 20), f"NUM_LAYERS={'9' * 20}: must be a positive integer of at most 18 digits"),
    (dict(LR_WARMUP_ITERS="9" * 20), "must be an integer >= 0 of at most 18 digits"),
    # a misspelt variable would leave the setting at its default without a word
    (dict(POOLNG_FACTOR="2"), "POOLNG_FACTOR=2: not a variable of pretrain_lighthouse_1gpu.sh; did you mean "
                              "POOLING_FACTOR? (its variables: CHECKPOINT_DIR, "),
    (dict(NUM_LAYER="4"), "did you mean NUM_LAYERS?"),
    (dict(TRAIN_ITER="4"), "did you mean TRAIN_ITERS?"),
    # the package's variables: the example passes its own settings to Megatron-LM
    (dict(LIGHTHOUSE_TOPK="1024"), "LIGHTHOUSE_TOPK=1024: not read by pretrain_lighthouse_1gpu.sh, which takes its "
                                   "Lighthouse settings as TOPK, POOLING_FACTOR, LEVELS and DENSE_LAYERS and passes "
                                   "them to Megatron-LM itself; set TOPK"),
    (dict(LIGHTHOUSE_ROPE="tokens"), "LIGHTHOUSE_ROPE=tokens: not read by pretrain_lighthouse_1gpu.sh"),
])
def test_one_gpu_bad_variables_are_refused_before_launch(tmp_path, patched, env, message):
    proc = _run("pretrain_lighthouse_1gpu.sh", tmp_path, **{**_base(patched), **env})
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert "torchrun" not in proc.stdout


def test_multinode_1m_sizes_cp_and_its_monitor_needs_the_patch(tmp_path, megatron_lm, patched):
    multi = dict(NNODES="4", MASTER_ADDR="node0")
    # The default (MONITOR=1) on an unpatched checkout: the run goes on without the monitor, and says so.
    unpatched = _run("pretrain_lighthouse_multinode_1m.sh", tmp_path, **_base(megatron_lm), **multi)
    assert unpatched.returncode == 0, unpatched.stderr
    assert ("note: MONITOR=1: the GPU monitor needs the patched pretrain_gpt.py (patches/apply.sh "
            f"{megatron_lm}); running without it") in unpatched.stderr
    assert "--lighthouse-monitor" not in unpatched.stdout
    assert unpatched.stdout.splitlines()[-1].startswith("LIGHTHOUSE_LEVELS=3 LIGHTHOUSE_POOLING_FACTOR=4 "
                                                        "LIGHTHOUSE_TOPK=2048 LIGHTHOUSE_DENSE_LAYERS=0,1,-2,-1 "
                                                        "CUDA_DEVICE_MAX_CONNECTIONS=1 srun ")
    proc = _run("pretrain_lighthouse_multinode_1m.sh", tmp_path, **_base(megatron_lm), **multi, MONITOR="0")
    assert proc.returncode == 0, proc.stderr
    assert "note: MONITOR" not in proc.stderr
    assert "--context-parallel-size 8 --cp-comm-type p2p" in proc.stdout and "--seq-length 1048576" in proc.stdout
    # Megatron-LM asserts this for context parallelism before Blackwell.
    assert "LIGHTHOUSE_DENSE_LAYERS=0,1,-2,-1 CUDA_DEVICE_MAX_CONNECTIONS=1 srun " in proc.stdout
    single = _run("pretrain_lighthouse_multinode_1m.sh", tmp_path, **_base(megatron_lm), **multi, CP_SIZE="1")
    assert single.returncode == 0 and "CUDA_DEVICE_MAX_CONNECTIONS" not in single.stdout, single.stderr
    # 1M tokens over CP 8: 16 load-balanced chunks selecting 128 each.
    assert "lighthouse: subsequence 81920 of 1048576 tokens (10240 on each of the 8 context-parallel ranks)" in proc.stdout
    assert "srun --ntasks-per-node 1 torchrun --nnodes 4 --nproc-per-node 8" in proc.stdout
    on = _run("pretrain_lighthouse_multinode_1m.sh", tmp_path, **_base(patched), **multi)
    assert on.returncode == 0, on.stderr
    assert LIGHTHOUSE in on.stdout and "--lighthouse-monitor --lighthouse-monitor-interval 1" in on.stdout
    for env, message in [(dict(CP_SIZE="3"), "CP_SIZE=3 must divide NNODES*GPUS_PER_NODE=32"),
                         (dict(CP_SIZE="16"), "TOPK=2048 with chunks=32 (2 x CP_SIZE=16): the per-chunk budget "
                                              "topk/chunks must be a multiple of 128 (TOPK must be a multiple of 4096)"),
                         (dict(MONITOR="yes"), "MONITOR=yes: must be 0 or 1"),
                         (dict(GLOBAL_BATCH="6"), "GLOBAL_BATCH=6 must be a multiple of the 4 data-parallel ranks"),
                         (dict(MASTER_PORT="http"), "MASTER_PORT=http: must be a TCP port, 1 to 65535"),
                         (dict(MASTER_PORT="70000"), "MASTER_PORT=70000: must be a TCP port, 1 to 65535"),
                         (dict(MASTER_PORT="0"), "MASTER_PORT=0: must be a TCP port, 1 to 65535"),
                         (dict(CP_SIZ="4"), "CP_SIZ=4: not a variable of pretrain_lighthouse_multinode_1m.sh; did you "
                                            "mean CP_SIZE?"),
                         (dict(GPUS_PER_NODES="4"), "did you mean GPUS_PER_NODE?"),
                         (dict(MASTER_ADDR=""), "MASTER_ADDR is not set")]:
        bad = _run("pretrain_lighthouse_multinode_1m.sh", tmp_path, **{**_base(patched), **multi, **env})
        assert bad.returncode == 2 and message in bad.stderr, (env, bad.stderr)


def test_multinode_1m_runs_as_a_slurm_batch_script(tmp_path, patched):
    """sbatch runs a copy of the script from SLURM's spool directory: common.sh comes from the submit directory."""
    spool = tmp_path / "spool"
    spool.mkdir()
    shutil.copy(EXAMPLES / "pretrain_lighthouse_multinode_1m.sh", spool / "slurm_script")
    env = {"PATH": f"{pathlib.Path(sys.executable).parent}:{os.environ['PATH']}", "HOME": str(tmp_path),
           **_mock(patched), "NNODES": "4", "MASTER_ADDR": "node0"}
    for submitted_from in (ROOT, EXAMPLES):
        proc = subprocess.run(["bash", str(spool / "slurm_script")], env={**env, "SLURM_SUBMIT_DIR": str(submitted_from)},
                              capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert "srun --ntasks-per-node 1 torchrun --nnodes 4" in proc.stdout
    lost = subprocess.run(["bash", str(spool / "slurm_script")], env={**env, "SLURM_SUBMIT_DIR": str(tmp_path)},
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert lost.returncode == 2 and "examples/common.sh not found" in lost.stderr and "torchrun" not in lost.stdout


@pytest.mark.parametrize("script", SCRIPTS)
def test_empty_dense_layers_means_none(tmp_path, megatron_lm, patched, script):
    on = _run(script, tmp_path, **_mock(patched), **_needs(script, tmp_path), DENSE_LAYERS="")
    assert on.returncode == 0, on.stderr
    if script != "resume_dense.sh":
        # The empty word after the flag (joined with single spaces: two in a row).
        assert "--lighthouse-levels 3 --lighthouse-dense-layers  --transformer-impl" in on.stdout
    off = _run(script, tmp_path, **_mock(megatron_lm), **_needs(script, tmp_path), DENSE_LAYERS="")
    assert off.returncode == 0, off.stderr
    if script != "resume_dense.sh":
        assert "LIGHTHOUSE_DENSE_LAYERS= " in off.stdout


def test_resume_dense(tmp_path, megatron_lm, patched):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    missing = _run("resume_dense.sh", tmp_path, **_base(patched), LIGHTHOUSE_CHECKPOINT=str(tmp_path / "nope"))
    assert missing.returncode == 2 and "no such directory" in missing.stderr
    # Patched: the stage-one model with every Lighthouse layer switched to dense from the first resumed iteration.
    proc = _run("resume_dense.sh", tmp_path, **_base(patched), LIGHTHOUSE_CHECKPOINT=str(ckpt))
    assert proc.returncode == 0, proc.stderr
    assert f"{LIGHTHOUSE} --lighthouse-dense-from-iteration 0 --transformer-impl transformer_engine" in proc.stdout
    assert MODEL in proc.stdout and f"--load {ckpt}" in proc.stdout and "--train-iters 16000" in proc.stdout
    # Stage two's --train-iters differs from stage one's: Megatron must take the schedule from the flags.
    assert "--override-opt_param-scheduler" in proc.stdout
    # Unpatched: a dense spec with the stage-one keys (Megatron's TE spec, or the package's local dense one).
    te = _run("resume_dense.sh", tmp_path, **_base(megatron_lm), LIGHTHOUSE_CHECKPOINT=str(ckpt))
    assert te.returncode == 0, te.stderr
    assert "--spec" not in te.stdout and "--lighthouse" not in te.stdout and MODEL in te.stdout
    local = _run("resume_dense.sh", tmp_path, **_base(megatron_lm), LIGHTHOUSE_CHECKPOINT=str(ckpt),
                 TRANSFORMER_IMPL="local")
    assert "--spec megatron_lighthouse.env_spec dense_local_layer_spec --transformer-impl local" in local.stdout
    refused = _run("resume_dense.sh", tmp_path, **_base(megatron_lm), LIGHTHOUSE_CHECKPOINT=str(ckpt),
                   DENSE_FROM_ITER="5")
    assert refused.returncode == 2 and "DENSE_FROM_ITER needs the patched pretrain_gpt.py" in refused.stderr
    # MEGATRON_SPEC=1: Megatron-LM's own local spec, at a length its core attention can hold.
    own = _run("resume_dense.sh", tmp_path, **_base(megatron_lm), LIGHTHOUSE_CHECKPOINT=str(ckpt),
               TRANSFORMER_IMPL="local", MEGATRON_SPEC="1", SEQ_LEN="8192")
    assert own.returncode == 0, own.stderr
    assert "--spec" not in own.stdout and "megatron_lighthouse" not in own.stdout
    assert "--seq-length 8192" in own.stdout and "--transformer-impl local" in own.stdout
    for env, message in ((dict(TRANSFORMER_IMPL="local", MEGATRON_SPEC="1"),
                          "MEGATRON_SPEC=1 with TRANSFORMER_IMPL=local and SEQ_LEN=131072: "),
                         (dict(MEGATRON_SPEC="yes"), "MEGATRON_SPEC=yes: must be 0 or 1")):
        refused = _run("resume_dense.sh", tmp_path, **_base(megatron_lm), LIGHTHOUSE_CHECKPOINT=str(ckpt), **env)
        assert refused.returncode == 2 and message in refused.stderr, refused.stderr
    refused = _run("resume_dense.sh", tmp_path, **_base(patched), LIGHTHOUSE_CHECKPOINT=str(ckpt), MEGATRON_SPEC="1")
    assert refused.returncode == 2 and "MEGATRON_SPEC=1 needs the unpatched pretrain_gpt.py" in refused.stderr


def test_multinode_1m_on_one_node_runs_torchrun_standalone(tmp_path, patched):
    """NNODES=1, or NNODES unset outside SLURM: torchrun --standalone on this machine, no srun, no MASTER_ADDR
    (set, it is noted as unused); NNODES unset under SLURM is SLURM's node count."""
    for env in (dict(NNODES="1"), {}):
        proc = _run("pretrain_lighthouse_multinode_1m.sh", tmp_path, **_mock(patched), **env, GPUS_PER_NODE="2",
                    CP_SIZE="2", SEQ_LEN="262144", GLOBAL_BATCH="1")
        assert proc.returncode == 0, proc.stderr
        command = proc.stdout.splitlines()[-1]
        assert command.startswith("CUDA_DEVICE_MAX_CONNECTIONS=1 torchrun --standalone --nproc-per-node 2 "), command
        assert "srun" not in command and "--rdzv" not in command and "--nnodes" not in command
        assert "--context-parallel-size 2 --cp-comm-type p2p" in command
        assert "lighthouse: subsequence 32768 of 262144 tokens (16384 on each of the 2 context-parallel ranks)" \
            in proc.stdout
    noted = _run("pretrain_lighthouse_multinode_1m.sh", tmp_path, **_mock(patched), NNODES="1", MASTER_ADDR="node0")
    assert noted.returncode == 0 and "note: MASTER_ADDR=node0 is not used with NNODES=1" in noted.stderr, noted.stderr
    slurm = _run("pretrain_lighthouse_multinode_1m.sh", tmp_path, **_mock(patched), SLURM_NNODES="4",
                 MASTER_ADDR="node0")
    assert slurm.returncode == 0 and "srun --ntasks-per-node 1 torchrun --nnodes 4 " in slurm.stdout, slurm.stderr
    # more than one node needs the rendezvous address
    lost = _run("pretrain_lighthouse_multinode_1m.sh", tmp_path, **_mock(patched), NNODES="2")
    assert lost.returncode == 2 and "MASTER_ADDR is not set" in lost.stderr, lost.stderr


def _te_cp_comm_types() -> tuple:
    pytest.importorskip("megatron.core")
    from megatron_lighthouse.causal_core_attention import TE_CP_COMM_TYPES

    return TE_CP_COMM_TYPES


@pytest.mark.parametrize("script", ["pretrain_lighthouse_multinode_1m.sh", "resume_dense.sh"])
def test_cp_comm_type_takes_what_the_package_takes(tmp_path, patched, script):
    """CP_COMM_TYPE accepts exactly the package's check_cp_comm_type set (TransformerEngine's), in both
    implementations, and reaches Megatron-LM as --cp-comm-type; a2a+p2p brings its hierarchical sizes."""
    from megatron_lighthouse.causal_core_attention import check_cp_comm_type

    base = {**_mock(patched), **_needs(script, tmp_path), "GPUS_PER_NODE": "4", "CP_SIZE": "4",
            "SEQ_LEN": "524288", "GLOBAL_BATCH": "1"}
    if script != "resume_dense.sh":
        base["NNODES"] = "1"  # one node: torchrun --standalone
        del base["MASTER_ADDR"]
    for comm in _te_cp_comm_types():
        check_cp_comm_type(comm, 4)  # the package takes it
        for impl in ("transformer_engine", "local"):
            proc = _run(script, tmp_path, **base, CP_COMM_TYPE=comm, TRANSFORMER_IMPL=impl)
            assert proc.returncode == 0, (comm, impl, proc.stderr)
            flags = f"--context-parallel-size 4 --cp-comm-type {comm}"
            if comm == "a2a+p2p":
                flags += " --hierarchical-context-parallel-sizes 4 1"
            assert flags + " --micro-batch-size" in proc.stdout, (comm, impl, proc.stdout)
            assert ("note: CP_COMM_TYPE" in proc.stderr) == (impl == "local"), proc.stderr
    for comm, hint in (("allgather", "; use all_gather (TransformerEngine's spelling)"), ("ring", ""),
                       ("p2p a2a", "")):
        with pytest.raises(ValueError, match="not a context-parallel communication type"):
            check_cp_comm_type(comm, 4)
        proc = _run(script, tmp_path, **base, CP_COMM_TYPE=comm)
        assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == (
            f"error: CP_COMM_TYPE={comm}: not a context-parallel communication type of TransformerEngine, which "
            f"accepts p2p, all_gather, a2a, a2a+p2p{hint}"), proc.stderr
    bad = _run(script, tmp_path, **base, CP_COMM_TYP="a2a")
    assert bad.returncode == 2 and "did you mean CP_COMM_TYPE?" in bad.stderr, bad.stderr


@pytest.mark.parametrize("env, message", [
    (dict(CP_COMM_TYPE="a2a", HEADS="6", HIDDEN="1536"), "CP_COMM_TYPE=a2a with HEADS=6 and CP_SIZE=4: "
                                                         "TransformerEngine's all-to-all splits the heads over the CP "
                                                         "ranks, so CP_SIZE must divide HEADS"),
    (dict(CP_COMM_TYPE="a2a+p2p", HEADS="6", HIDDEN="1536"), "CP_COMM_TYPE=a2a+p2p with HEADS=6: TransformerEngine's "
                                                             "all-to-all inside a node splits the heads over its 4 CP "
                                                             "ranks (gcd of CP_SIZE=4 and GPUS_PER_NODE=4)"),
    (dict(CP_SIZE="3"), "CP_SIZE=3 must divide GPUS_PER_NODE=4"),
    (dict(CP_SIZE="two"), "CP_SIZE=two: must be a positive integer"),
    (dict(GLOBAL_BATCH="3", CP_SIZE="2"), "GLOBAL_BATCH=3 must be a multiple of the 2 data-parallel ranks "
                                          "(GPUS_PER_NODE/CP_SIZE)"),
    (dict(TOPK="1024", CP_SIZE="8", GPUS_PER_NODE="8"), "TOPK=1024 with chunks=16 (2 x CP_SIZE=8): the per-chunk "
                                                        "budget topk/chunks must be a multiple of 128"),
])
def test_resume_dense_refuses_bad_context_parallel_settings(tmp_path, patched, env, message):
    proc = _run("resume_dense.sh", tmp_path, **{**_mock(patched), **_needs("resume_dense.sh", tmp_path),
                                                  "GPUS_PER_NODE": "4", "CP_SIZE": "4", "GLOBAL_BATCH": "4", **env})
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert "torchrun" not in proc.stdout


def test_resume_dense_at_stage_one_context_parallelism(tmp_path, patched, megatron_lm):
    """Stage two at stage one's CP: the CP flags, CUDA_DEVICE_MAX_CONNECTIONS=1, and (patched, where Lighthouse
    layers are built) the settings checked against 2 x CP_SIZE chunks; CP_SIZE=1 keeps the one-chunk check."""
    env = dict(**_mock(patched), **_needs("resume_dense.sh", tmp_path), GPUS_PER_NODE="2", CP_SIZE="2",
               SEQ_LEN="262144", CP_COMM_TYPE="all_gather")
    proc = _run("resume_dense.sh", tmp_path, **env)
    assert proc.returncode == 0, proc.stderr
    command = proc.stdout.splitlines()[-1]
    assert command.startswith("CUDA_DEVICE_MAX_CONNECTIONS=1 torchrun --nproc-per-node 2 "), command
    assert "--context-parallel-size 2 --cp-comm-type all_gather" in command and "--lighthouse-dense-from-iteration 0" \
        in command
    assert "lighthouse: subsequence 32768 of 262144 tokens (16384 on each of the 2 context-parallel ranks)" in proc.stdout
    one = _run("resume_dense.sh", tmp_path, **{**env, "CP_SIZE": "1"})
    assert one.returncode == 0 and "lighthouse: subsequence 32768 of 262144 tokens\n" in one.stdout + "\n", one.stdout
    assert "CUDA_DEVICE_MAX_CONNECTIONS" not in one.stdout and "--context-parallel-size 1" in one.stdout
    # the 16-chunk check only applies where Lighthouse layers are built: the unpatched route is dense
    chunks = dict(GPUS_PER_NODE="8", CP_SIZE="8", TOPK="1024", GLOBAL_BATCH="8")
    dense = _run("resume_dense.sh", tmp_path, **{**env, **chunks, "MEGATRON_LM_DIR": str(megatron_lm)})
    assert dense.returncode == 0 and "--context-parallel-size 8" in dense.stdout, dense.stderr
    refused = _run("resume_dense.sh", tmp_path, **{**env, **chunks})
    assert refused.returncode == 2 and "(2 x CP_SIZE=8)" in refused.stderr, refused.stderr
    own = _run("resume_dense.sh", tmp_path, **{**env, "MEGATRON_LM_DIR": str(megatron_lm), "MEGATRON_SPEC": "1",
                                               "TRANSFORMER_IMPL": "local", "SEQ_LEN": "8192"})
    assert own.returncode == 2 and ("MEGATRON_SPEC=1 with TRANSFORMER_IMPL=local and CP_SIZE=2: Megatron-LM's local "
                                    "core attention has no context parallelism") in own.stderr, own.stderr


OPTIMIZER = ("--min-lr 2e-4 --lr-warmup-iters 2000 --lr-decay-style {} --weight-decay 0.1 --adam-beta1 0.9 "
             "--adam-beta2 0.95 --clip-grad 1.0")


@pytest.mark.parametrize("script, env", [
    ("pretrain_lighthouse_1gpu.sh", {}),
    ("pretrain_lighthouse_multinode_1m.sh", dict(NNODES="4", MASTER_ADDR="node0")),
    ("resume_dense.sh", dict(LIGHTHOUSE_CHECKPOINT="ckpt")),
])
def test_every_example_takes_the_learning_rate_and_its_decay(tmp_path, patched, script, env):
    """LR and LR_DECAY_STYLE reach Megatron in each example (default: 2e-3, cosine); constant is the published
    configs' schedule."""
    (tmp_path / "ckpt").mkdir()
    env = {k: str(tmp_path / v) if k == "LIGHTHOUSE_CHECKPOINT" else v for k, v in env.items()}
    default = _run(script, tmp_path, **_base(patched), **env)
    assert default.returncode == 0, default.stderr
    assert "--lr 2e-3 " + OPTIMIZER.format("cosine") in default.stdout
    constant = _run(script, tmp_path, **_base(patched), **env, LR="1e-3", LR_DECAY_STYLE="constant")
    assert constant.returncode == 0, constant.stderr
    assert "--lr 1e-3 " + OPTIMIZER.format("constant") in constant.stdout


def test_dry_run_only_prints(tmp_path, patched):
    """Without DRY_RUN the script execs the launcher: a stand-in torchrun on PATH records its arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "argv"
    (bin_dir / "torchrun").write_text(f'#!/usr/bin/env bash\necho "$@" > {record}\n')
    (bin_dir / "torchrun").chmod(0o755)
    env = {**_base(patched), "PATH": f"{bin_dir}:{pathlib.Path(sys.executable).parent}:{os.environ['PATH']}",
           **_past_preflight(tmp_path)}
    env.pop("DRY_RUN")
    proc = _run("pretrain_lighthouse_1gpu.sh", tmp_path, **env)
    assert proc.returncode == 0, proc.stderr
    assert LIGHTHOUSE in record.read_text() and "--train-iters 10000" in record.read_text()


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("impl", ["transformer_engine", "local"])
@pytest.mark.parametrize("hook", ["patched", "megatron_lm"])
def test_mock_data_needs_no_dataset_or_tokenizer(request, tmp_path, script, impl, hook):
    """MOCK_DATA=1: Megatron-LM's mock data and NullTokenizer, nothing else to provide; never the data loader's
    [s, s] attention mask."""
    root = request.getfixturevalue(hook)
    proc = _run(script, tmp_path, **_mock(root, TRANSFORMER_IMPL=impl), **_needs(script, tmp_path))
    assert proc.returncode == 0, proc.stderr
    command = proc.stdout.splitlines()[-1]
    assert command.endswith(MOCK) or f"{MOCK} " in command
    assert "--data-path" not in command and "--tokenizer-model" not in command
    assert (LOCAL in command) == (impl == "local")
    other = _run(script, tmp_path, **_mock(root, TRANSFORMER_IMPL=impl, VOCAB_SIZE="50304"), **_needs(script, tmp_path))
    assert "--mock-data --tokenizer-type NullTokenizer --vocab-size 50304" in other.stdout


def _with_apex(tmp_path: pathlib.Path) -> dict:
    """A stand-in for Apex's ``fused_weight_gradient_mlp_cuda`` extension on ``PYTHONPATH`` (what the examples look
    up; Megatron-LM imports it for gradient-accumulation fusion)."""
    site = tmp_path / "apex_site"
    site.mkdir(exist_ok=True)
    (site / "fused_weight_gradient_mlp_cuda.py").write_text("")
    return {"PYTHONPATH": str(site)}


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("impl", ["transformer_engine", "local"])
def test_gradient_accumulation_fusion_follows_apex(tmp_path, patched, script, impl):
    """Without Apex's extension (a TransformerEngine from the package registry), the command passes
    --no-gradient-accumulation-fusion, with a note, in every implementation: Megatron's output layer needs it for
    the default fusion and died at the first iteration. With Apex the fusion stays on."""
    env = dict(**_mock(patched, TRANSFORMER_IMPL=impl), **_needs(script, tmp_path))
    without = _run(script, tmp_path, **env)
    assert without.returncode == 0, without.stderr
    assert NO_APEX in without.stdout.splitlines()[-1]
    assert "note: Apex's fused_weight_gradient_mlp_cuda is not importable by python3: passing " \
           "--no-gradient-accumulation-fusion" in without.stderr
    with_apex = _run(script, tmp_path, **env, **_with_apex(tmp_path))
    assert with_apex.returncode == 0, with_apex.stderr
    assert NO_APEX not in with_apex.stdout and "Apex" not in with_apex.stderr
    assert with_apex.stdout.splitlines()[-1] == without.stdout.splitlines()[-1].replace(f" {NO_APEX}", "")


@pytest.mark.parametrize("script", SCRIPTS)
def test_fp8_adds_the_fp8_format_with_transformer_engine_only(tmp_path, patched, script):
    """FP8=hybrid|e4m3: TransformerEngine's FP8 linear layers (--fp8-format, Megatron-LM's default recipe); refused
    with TRANSFORMER_IMPL=local and for other values, naming the variable."""
    env = dict(**_mock(patched), **_needs(script, tmp_path))
    for fmt in ("hybrid", "e4m3"):
        proc = _run(script, tmp_path, **env, FP8=fmt)
        assert proc.returncode == 0, proc.stderr
        assert f"--fp8-format {fmt}" in proc.stdout.splitlines()[-1]
    assert "--fp8-format" not in _run(script, tmp_path, **env).stdout
    for extra, message in ((dict(FP8="hybrid", TRANSFORMER_IMPL="local"),
                            "error: FP8=hybrid with TRANSFORMER_IMPL=local: FP8 training needs TransformerEngine"),
                           (dict(FP8="fp8"), "error: FP8=fp8: must be hybrid, e4m3 or empty (bf16)")):
        proc = _run(script, tmp_path, **{**env, **extra})
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_real_data_never_builds_the_dataloader_mask(tmp_path, patched, script):
    proc = _run(script, tmp_path, **_base(patched), **_needs(script, tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert ("--data-path /data/x --tokenizer-type HuggingFaceTokenizer --tokenizer-model tok "
            f"{NO_MASK}") in proc.stdout
    assert "--mock-data" not in proc.stdout


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_example_takes_the_run_settings(tmp_path, patched, script):
    """GLOBAL_BATCH and the intervals reach Megatron-LM; a short run with a short warm-up is accepted."""
    env = dict(GLOBAL_BATCH="8", SAVE_INTERVAL="5", LOG_INTERVAL="2", EVAL_INTERVAL="3", EVAL_ITERS="4",
               LR_WARMUP_ITERS="1", TRAIN_ITERS="6", TOTAL_ITERS="6")
    proc = _run(script, tmp_path, **_mock(patched, **env), **_needs(script, tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert ("--micro-batch-size 1 --global-batch-size 8 --recompute-granularity full --recompute-method uniform "
            "--recompute-num-layers 1 --bf16 --train-iters 6 --save ") in proc.stdout
    assert "--save-interval 5 --log-interval 2 --eval-interval 3 --eval-iters 4" in proc.stdout
    assert "--lr-warmup-iters 1 " in proc.stdout


def test_one_gpu_dense_mode(tmp_path, patched, megatron_lm):
    """DENSE=1: the same model dense from the start, as a user runs the baseline: Megatron-LM's own TE spec, or the
    package's dense local spec (Megatron-LM's local core attention cannot run 128K); patched or not."""
    for root in (patched, megatron_lm):
        te = _run("pretrain_lighthouse_1gpu.sh", tmp_path, **_mock(root, DENSE="1"))
        assert te.returncode == 0, te.stderr
        command = te.stdout.splitlines()[-1]
        assert "--lighthouse" not in command and "--spec" not in command and "LIGHTHOUSE_" not in command
        assert f"pretrain_gpt.py --transformer-impl transformer_engine {MODEL}" in command
        assert "--save ./checkpoints/dense_baseline " in command and "subsequence" not in te.stdout
        local = _run("pretrain_lighthouse_1gpu.sh", tmp_path, **_mock(root, DENSE="1", TRANSFORMER_IMPL="local"))
        assert (f"pretrain_gpt.py --spec megatron_lighthouse.env_spec dense_local_layer_spec --transformer-impl local "
                f"{MODEL}") in local.stdout
    # The Lighthouse settings are not checked in dense mode: they are not used, and a note says so.
    unused = _run("pretrain_lighthouse_1gpu.sh", tmp_path, **_mock(patched, DENSE="1", TOPK="100", DENSE_LAYERS=""))
    assert unused.returncode == 0, unused.stderr
    assert ("note: TOPK=100 is not used with DENSE=1 (the dense model has no Lighthouse layers)\n"
            "note: DENSE_LAYERS= is not used with DENSE=1") in unused.stderr


def test_other_tools_variables_and_the_dense_kernel_knob_pass(tmp_path, patched):
    """Not misspellings: another tool's variable that holds an example's name (SLURM_GPUS_PER_NODE, the GPU
    script's D_SEQ_LEN), names far from every variable, and the package's LIGHTHOUSE_DENSE_KERNEL."""
    env = dict(SLURM_GPUS_PER_NODE="8", D_SEQ_LEN="8192", FOO="1", LIGHTHOUSE_DENSE_KERNEL="cudnn")
    proc = _run("pretrain_lighthouse_1gpu.sh", tmp_path, **_base(patched), **env)
    assert proc.returncode == 0 and "note:" not in proc.stderr.replace("note: Apex", ""), proc.stderr


def test_one_gpu_monitor(tmp_path, patched, megatron_lm):
    off = _run("pretrain_lighthouse_1gpu.sh", tmp_path, **_mock(patched))
    assert "--lighthouse-monitor" not in off.stdout
    on = _run("pretrain_lighthouse_1gpu.sh", tmp_path, **_mock(patched, MONITOR="1", CHECKPOINT_DIR="/ck"))
    assert on.returncode == 0, on.stderr
    assert on.stdout.splitlines()[-1].endswith("--lighthouse-monitor --lighthouse-monitor-interval 1")
    dense = _run("pretrain_lighthouse_1gpu.sh", tmp_path, **_mock(patched, MONITOR="1", DENSE="1"))
    assert "--lighthouse-monitor --lighthouse-monitor-interval 1" in dense.stdout  # a flag of the hook, not of Lighthouse
    unpatched = _run("pretrain_lighthouse_1gpu.sh", tmp_path, **_mock(megatron_lm, MONITOR="1"))
    assert unpatched.returncode == 0 and "note: MONITOR=1: the GPU monitor needs the patched" in unpatched.stderr
    assert "--lighthouse-monitor" not in unpatched.stdout


def _recording_torchrun(tmp_path: pathlib.Path) -> tuple:
    """A stand-in torchrun on PATH that records its LIGHTHOUSE_* environment and its arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    record = tmp_path / "argv"
    (bin_dir / "torchrun").write_text(f'#!/usr/bin/env bash\n{{ env | grep ^LIGHTHOUSE_ | sort; echo "$@"; }} > {record}\n')
    (bin_dir / "torchrun").chmod(0o755)
    return f"{bin_dir}:{pathlib.Path(sys.executable).parent}:{os.environ['PATH']}", record


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_launch_without_a_gpu_is_one_error_line(tmp_path, patched):
    """A real launch on a machine where torch sees no GPU stops before torchrun, in one line."""
    path, record = _recording_torchrun(tmp_path)
    env = {k: v for k, v in _mock(patched, TRANSFORMER_IMPL="local", PATH=path).items() if k != "DRY_RUN"}
    proc = _run("pretrain_lighthouse_1gpu.sh", tmp_path, **env, **_with_apex(tmp_path))  # no Apex note
    assert proc.returncode == 2 and not record.exists(), proc
    assert proc.stderr.strip() == ("error: torch sees no CUDA GPU here, and Megatron-LM's pretrain_gpt.py needs one "
                                   "(DRY_RUN=1 prints the command instead of launching it)"), proc.stderr


@pytest.mark.skipif(importlib.util.find_spec("transformer_engine") is not None, reason="TransformerEngine installed")
@pytest.mark.parametrize("script", ["pretrain_lighthouse_1gpu.sh", "resume_dense.sh"])
def test_launch_without_transformer_engine_is_one_error_line(tmp_path, patched, script):
    """The default TRANSFORMER_IMPL=transformer_engine without TransformerEngine installed: one line pointing at
    TRANSFORMER_IMPL=local, before torchrun (Megatron-LM's own message names an unrelated rope fusion)."""
    path, record = _recording_torchrun(tmp_path)
    site = _past_preflight(tmp_path)
    (tmp_path / "gpu_site" / "transformer_engine" / "__init__.py").unlink()
    (tmp_path / "gpu_site" / "transformer_engine").rmdir()
    env = {k: v for k, v in _mock(patched, PATH=path, **site).items() if k != "DRY_RUN"}
    proc = _run(script, tmp_path, **env, **_needs(script, tmp_path))
    assert proc.returncode == 2 and not record.exists(), proc
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: TRANSFORMER_IMPL=transformer_engine (the default): transformer_engine is not installed in this "
        "Python; install it (pip install -e '.[te]') or set TRANSFORMER_IMPL=local"), proc.stderr


@pytest.mark.parametrize("nodes, error", [
    ("4", "error: srun: not found; this example runs under SLURM (sbatch "),
    # one node needs no srun: the launch reaches torchrun's preflight (here, without a GPU, its one error line)
    pytest.param("1", "error: torch sees no CUDA GPU here", marks=pytest.mark.skipif(
        torch.cuda.is_available(), reason="this machine has a GPU")),
])
def test_multinode_launch_outside_slurm_is_one_error_line(tmp_path, patched, nodes, error):
    env = {k: v for k, v in _base(patched, NNODES=nodes, MASTER_ADDR="node0", TRANSFORMER_IMPL="local",
                                       PATH=f"{pathlib.Path(sys.executable).parent}:/usr/bin:/bin").items()
           if k != "DRY_RUN"}
    proc = _run("pretrain_lighthouse_multinode_1m.sh", tmp_path, **env)
    assert proc.returncode == 2, proc
    assert proc.stderr.strip().splitlines()[-1].startswith(error), proc.stderr


def test_unpatched_line_runs_as_printed(tmp_path, megatron_lm):
    """The unpatched route's settings travel in LIGHTHOUSE_* variables: exported when the example launches, and
    in front of the printed command, which runs the same when pasted into a shell."""
    path, record = _recording_torchrun(tmp_path)
    env = {k: v for k, v in _mock(megatron_lm, TOPK="1024", PATH=path, **_past_preflight(tmp_path)).items()
           if k != "DRY_RUN"}
    launched = _run("pretrain_lighthouse_1gpu.sh", tmp_path, **env)
    assert launched.returncode == 0, launched.stderr
    expected = ("LIGHTHOUSE_DENSE_LAYERS=0,1,-2,-1\nLIGHTHOUSE_LEVELS=3\nLIGHTHOUSE_POOLING_FACTOR=4\n"
                "LIGHTHOUSE_TOPK=1024\n")
    as_launched = record.read_text()
    assert as_launched.startswith(expected) and "--spec megatron_lighthouse.env_spec lighthouse_layer_spec" in as_launched
    printed = subprocess.run(["bash", str(EXAMPLES / "pretrain_lighthouse_1gpu.sh")], capture_output=True, text=True,
                             env={**env, "HOME": str(tmp_path), "DRY_RUN": "1"}, check=True).stdout.splitlines()[-1]
    record.unlink()
    subprocess.run(["bash", "-c", printed], env={"PATH": path, "HOME": str(tmp_path)}, check=True)
    assert record.read_text() == as_launched


# -- the HybridModel example (pretrain_hybrid.py) ------------------------------------------------------------------


def test_hybrid_example_builds_the_pretrain_hybrid_command(tmp_path, patched, megatron_lm):
    """A '*-' per GPT block, the dense layers counted among its attention layers; patched: the --lighthouse flags,
    unpatched: the env_spec's hybrid stack spec with the LIGHTHOUSE_* settings."""
    on = _run(HYBRID, tmp_path, **_mock(patched, NUM_LAYERS="8"))
    assert on.returncode == 0, on.stderr
    assert ("lighthouse: subsequence 24576 of 131072 tokens\nlighthouse: 4 of 8 attention layers run Lighthouse "
            "(hybrid layers 5, 7, 9, 11); dense: 1, 3, 13, 15") in on.stdout
    command = on.stdout.splitlines()[-1]
    assert command.startswith(f"torchrun --nproc-per-node 1 {patched}/pretrain_hybrid.py {LIGHTHOUSE} "
                              f"--transformer-impl transformer_engine --hybrid-layer-pattern {PATTERN8} --hidden-size "
                              "1024 "), command
    assert "--num-layers" not in command and "--save ./checkpoints/hybrid_lighthouse " in command
    assert command.endswith(MOCK)
    default = _run(HYBRID, tmp_path, **_mock(patched)).stdout.splitlines()[-1]
    assert f"--hybrid-layer-pattern {'*-' * 30} " in default  # NUM_LAYERS=30, the GPT examples' model
    mamba = _run(HYBRID, tmp_path, **_mock(patched, HYBRID_LAYER_PATTERN="M*M*M*|M*M*", DENSE_FROM_ITER="9"))
    assert "lighthouse: 1 of 5 attention layers run Lighthouse (hybrid layers 6); dense: 2, 4, 8, 10" in mamba.stdout
    assert "--lighthouse-dense-from-iteration 9 " in mamba.stdout and "--hybrid-layer-pattern M*M*M*|M*M* " in mamba.stdout
    for impl, name in (("transformer_engine", "lighthouse_hybrid_stack_spec"),
                       ("local", "lighthouse_local_hybrid_stack_spec")):
        off = _run(HYBRID, tmp_path, **_mock(megatron_lm, NUM_LAYERS="8", TRANSFORMER_IMPL=impl))
        assert off.returncode == 0, off.stderr
        assert off.stdout.splitlines()[-1].startswith(
            "LIGHTHOUSE_LEVELS=3 LIGHTHOUSE_POOLING_FACTOR=4 LIGHTHOUSE_TOPK=2048 LIGHTHOUSE_DENSE_LAYERS=0,1,-2,-1 "
            f"torchrun --nproc-per-node 1 {megatron_lm}/pretrain_hybrid.py --spec megatron_lighthouse.env_spec {name} "
            f"--transformer-impl {impl} --hybrid-layer-pattern {PATTERN8} ")


def test_hybrid_example_dense_mode(tmp_path, patched, megatron_lm):
    """DENSE=1: Megatron-LM's own hybrid_stack_spec with TransformerEngine (as its migration guide names it), the
    package's dense local hybrid stack without; patched or not."""
    for root in (patched, megatron_lm):
        te = _run(HYBRID, tmp_path, **_mock(root, DENSE="1", NUM_LAYERS="8"))
        assert te.returncode == 0, te.stderr
        command = te.stdout.splitlines()[-1]
        assert (f"pretrain_hybrid.py --spec megatron.core.models.hybrid.hybrid_layer_specs hybrid_stack_spec "
                f"--transformer-impl transformer_engine --hybrid-layer-pattern {PATTERN8} ") in command
        assert "--lighthouse" not in command and "LIGHTHOUSE_" not in command and "lighthouse:" not in te.stdout
        assert "--save ./checkpoints/hybrid_dense_baseline " in command
        local = _run(HYBRID, tmp_path, **_mock(root, DENSE="1", TRANSFORMER_IMPL="local"))
        assert ("pretrain_hybrid.py --spec megatron_lighthouse.env_spec dense_local_hybrid_stack_spec "
                "--transformer-impl local --hybrid-layer-pattern ") in local.stdout


@pytest.mark.parametrize("env, message", [
    (dict(HYBRID_LAYER_PATTERN="*-x"), "HYBRID_LAYER_PATTERN=*-x: must be Megatron's layer symbols"),
    # fewer than five attention layers with the paper's dense layers: refused, as NUM_LAYERS=4 is for GPT
    (dict(HYBRID_LAYER_PATTERN="*-*-*-*-"), "HYBRID_LAYER_PATTERN=*-*-*-*- with DENSE_LAYERS=0,1,-2,-1: keeps all 4 "
                                            "attention layers (hybrid layers 1, 3, 5, 7) dense: no layer would run "
                                            "Lighthouse"),
    (dict(NUM_LAYERS="8", DENSE_LAYERS="0,9"), f"HYBRID_LAYER_PATTERN={PATTERN8} with DENSE_LAYERS=0,9: "
                                               "LighthouseConfig.dense_layers entry 9: out of range for a model of 8 "
                                               "attention layers"),
    (dict(HYBRID_LAYER_PATTERN="*-*-*-*-*-/*-"), "its multi-token-prediction part ('/*-') has attention layers"),
    (dict(HYBRID_LAYER_PATTERN="M*M*M*M*M*", TRANSFORMER_IMPL="local"),
     "HYBRID_LAYER_PATTERN=M*M*M*M*M* with TRANSFORMER_IMPL=local: the local hybrid stack builds * (attention), - "
     "(MLP) and E (MoE) layers only"),
    (dict(NUM_LAYERS="many"), "NUM_LAYERS=many: must be a positive integer"),
    (dict(NUM_LAYERS="9" * 20), "must be a positive integer, at most 9999"),  # the pattern's blocks: no endless seq
    (dict(DENSE="yes"), "DENSE=yes: must be 0 or 1"),
    (dict(HYBRID_LAYER_PATERN="*-*-"), "HYBRID_LAYER_PATERN=*-*-: not a variable of pretrain_lighthouse_1gpu.sh; did "
                                       "you mean HYBRID_LAYER_PATTERN?"),
])
def test_hybrid_example_refuses_bad_variables_before_launch(tmp_path, patched, env, message):
    proc = _run(HYBRID, tmp_path, **{**_mock(patched), **env})
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert "torchrun" not in proc.stdout


def test_hybrid_example_needs_pretrain_hybrid(tmp_path):
    old = _stand_in(tmp_path / "Megatron-LM-0.16", patched=True, scripts=("pretrain_gpt.py",))
    proc = _run(HYBRID, tmp_path, **_mock(old))
    assert proc.returncode == 2 and proc.stderr.strip() == f"error: MEGATRON_LM_DIR={old}: no pretrain_hybrid.py there"


def test_resume_dense_of_a_hybrid_model(tmp_path, patched, megatron_lm):
    """Stage two of a HybridModel: patched, the Lighthouse model switched to dense; unpatched, the dense stack with
    the same keys: Megatron-LM's hybrid_stack_spec (also with MEGATRON_SPEC=1), or the package's local one."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    env = dict(HYBRID_LAYER_PATTERN=PATTERN8, LIGHTHOUSE_CHECKPOINT=str(ckpt))
    on = _run("resume_dense.sh", tmp_path, **_mock(patched, **env))
    assert on.returncode == 0, on.stderr
    assert (f"{patched}/pretrain_hybrid.py {LIGHTHOUSE} --lighthouse-dense-from-iteration 0 --transformer-impl "
            f"transformer_engine --hybrid-layer-pattern {PATTERN8} ") in on.stdout
    megatron = f"{megatron_lm}/pretrain_hybrid.py --spec megatron.core.models.hybrid.hybrid_layer_specs hybrid_stack_spec "
    for spec in ("0", "1"):
        te = _run("resume_dense.sh", tmp_path, **_mock(megatron_lm, **env, MEGATRON_SPEC=spec))
        assert te.returncode == 0 and megatron in te.stdout and f"--load {ckpt}" in te.stdout, te.stderr
    local = _run("resume_dense.sh", tmp_path, **_mock(megatron_lm, **env, TRANSFORMER_IMPL="local"))
    assert "pretrain_hybrid.py --spec megatron_lighthouse.env_spec dense_local_hybrid_stack_spec " in local.stdout
    refused = _run("resume_dense.sh", tmp_path, **_mock(megatron_lm, **env, TRANSFORMER_IMPL="local",
                                                        MEGATRON_SPEC="1"))
    assert refused.returncode == 2 and ("MEGATRON_SPEC=1 with HYBRID_LAYER_PATTERN and TRANSFORMER_IMPL=local: "
                                        "Megatron-LM's hybrid stack spec is TransformerEngine's throughout") in \
        refused.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_hybrid_launch_without_a_gpu_is_one_error_line(tmp_path, patched):
    path, record = _recording_torchrun(tmp_path)
    env = {k: v for k, v in _mock(patched, TRANSFORMER_IMPL="local", PATH=path).items() if k != "DRY_RUN"}
    proc = _run(HYBRID, tmp_path, **env, **_with_apex(tmp_path))
    assert proc.returncode == 2 and not record.exists(), proc
    assert proc.stderr.strip() == ("error: torch sees no CUDA GPU here, and Megatron-LM's pretrain_hybrid.py needs "
                                   "one (DRY_RUN=1 prints the command instead of launching it)"), proc.stderr


# -- benchmarks/run_megatron_lm_gpu.sh: the user path on one GPU, dry run -----------------------------------------


def _patchable_stand_in(root: pathlib.Path) -> pathlib.Path:
    """A Megatron-LM look-alike the patch applies to: pretrain_gpt.py and pretrain_hybrid.py hold each hunk's
    pre-image between filler lines (no Megatron-LM code here), plus an empty megatron/ package."""
    (root / "megatron").mkdir(parents=True)
    for script, hunks in parse_patch(PATCH.read_text()).items():
        lines = []
        for i, hunk in enumerate(hunks):
            lines += [f"# filler {i}.{j}" for j in range(5)] + hunk["old"]
        (root / script).write_text("\n".join(lines + ["# end"]) + "\n")
    return root


def _gpu_dry_run(tmp_path: pathlib.Path, source: pathlib.Path, **env: str) -> tuple:
    out, work = tmp_path / "out", tmp_path / "work"
    full = {"PATH": f"{pathlib.Path(sys.executable).parent}:{os.environ['PATH']}", "HOME": str(tmp_path),
            "PYTHON": sys.executable, "WORK_DIR": str(work), "DRY_RUN": "1", **env}
    proc = subprocess.run(["bash", str(GPU_SCRIPT), str(source), str(out)], env=full, capture_output=True, text=True,
                          timeout=300)
    return proc, out, work


def _stages(stdout: str) -> dict:
    """``{stage: the lines it printed}`` from the script's ``== name (timeout ...)`` headers."""
    stages, name = {}, None
    for line in stdout.splitlines():
        if line.startswith("== ") and "(timeout " in line:
            name = line.split()[1]
            stages[name] = []
        elif line.startswith("== "):
            name = None
        elif name:
            stages[name].append(" ".join(shlex.split(line)) if "/pretrain_" in line else line)
    return stages


def _user_path_dry_run(tmp_path: pathlib.Path, script: str, **env: str) -> tuple:
    """The GPU script's default stages, dry run on a patchable stand-in: checks that it succeeds with stages a, e,
    b, d, c in that order and that only the patched copy of ``script`` carries the hook; returns ``(stages, out,
    patched, pristine, work)``."""
    proc, out, work = _gpu_dry_run(tmp_path, _patchable_stand_in(tmp_path / "Megatron-LM"), **env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    stages = _stages(proc.stdout)
    assert list(stages) == ["a_lighthouse", "e_monitor_report", "b_resume_dense", "d_unpatched_dense",
                            "c_dense_scratch"]
    patched, pristine = work / "megatron-lm-patched", work / "megatron-lm-pristine"
    assert "megatron_lighthouse" in (patched / script).read_text()
    assert "megatron_lighthouse" not in (pristine / script).read_text()
    return stages, out, patched, pristine, work


def test_gpu_script_dry_run_runs_the_user_path(tmp_path):
    stages, out, patched, pristine, work = _user_path_dry_run(tmp_path, "pretrain_gpt.py")
    common = (f"--transformer-impl local --num-layers 8 --hidden-size 1024 --num-attention-heads 8 "
              f"--ffn-hidden-size 1536 --swiglu --normalization RMSNorm --position-embedding-type rope "
              f"--disable-bias-linear --attention-dropout 0 --hidden-dropout 0 --seq-length 131072 "
              f"--max-position-embeddings 131072 {LOCAL} {NO_APEX} --lr 2e-3 --min-lr 2e-4 --lr-warmup-iters 1 "
              f"--lr-decay-style constant")
    (a,) = [line for line in stages["a_lighthouse"] if "pretrain_gpt.py" in line]
    assert a.startswith(f"torchrun --nproc-per-node 1 {patched}/pretrain_gpt.py --lighthouse --lighthouse-topk 2048 ")
    assert common in a and "--global-batch-size 1 " in a and "--train-iters 4 " in a
    assert f"--save {work}/ckpt_a_lighthouse " in a and "--log-interval 1 " in a
    assert a.endswith(f"{MOCK} --lighthouse-monitor --lighthouse-monitor-interval 1")
    assert stages["e_monitor_report"] == [
        f"{sys.executable} -m megatron_lighthouse.monitor report {work}/ckpt_a_lighthouse/gpu_monitor.jsonl "
        f"--out {out}/gpu_monitor.png"]
    (b,) = [line for line in stages["b_resume_dense"] if "pretrain_gpt.py" in line]
    assert f"{patched}/pretrain_gpt.py --lighthouse " in b and "--lighthouse-dense-from-iteration 4 " in b
    assert common in b and "--train-iters 6 " in b and f"--save {work}/ckpt_b_resume_dense " in b
    assert "--override-opt_param-scheduler" in b and b.endswith(f"{MOCK} --load {work}/ckpt_a_lighthouse")
    (d,) = [line for line in stages["d_unpatched_dense"] if "pretrain_gpt.py" in line]
    # Megatron-LM's own spec (nothing of this package) at 8,192 tokens, where its local core attention fits
    assert f"{pristine}/pretrain_gpt.py {common.replace('131072', '8192')}" in d and "megatron_lighthouse" not in d
    assert "--lighthouse" not in d and "--train-iters 8 " in d and d.endswith(f"--load {work}/ckpt_b_resume_dense")
    (c,) = [line for line in stages["c_dense_scratch"] if "pretrain_gpt.py" in line]
    assert f"{patched}/pretrain_gpt.py --spec megatron_lighthouse.env_spec dense_local_layer_spec {common}" in c
    assert "--lighthouse" not in c and "--train-iters 6 " in c and "--load" not in c
    # What comes back from the device: few files, the stage logs in one archive.
    assert sorted(p.name for p in out.iterdir()) == ["megatron_lm_gpu.json", "megatron_lm_gpu.txt",
                                                     "megatron_lm_gpu_logs.tar.gz"]
    with tarfile.open(out / "megatron_lm_gpu_logs.tar.gz") as tar:
        assert sorted(tar.getnames()) == ["logs", *(f"logs/{name}.log" for name in (
            "a_lighthouse", "b_resume_dense", "c_dense_scratch", "d_unpatched_dense", "e_monitor_report", "setup")),
            "logs/stages.tsv"]
    record = json.loads((out / "megatron_lm_gpu.json").read_text())["stages"]
    assert {name: stage["status"]["rc"] for name, stage in record.items()} == dict.fromkeys(stages, 0)


def test_gpu_script_settings_and_a_patched_source(tmp_path):
    """The model and lengths are variables; a checkout patched already still gives a pristine copy."""
    source = _patchable_stand_in(tmp_path / "Megatron-LM")
    subprocess.run(["git", "apply", str(PATCH)], cwd=source, check=True)
    proc, out, work = _gpu_dry_run(tmp_path, source, NUM_LAYERS="6", ITERS_A="3", ITERS_B="1", ITERS_D="1",
                                   VOCAB_SIZE="50304")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "megatron_lighthouse" not in (work / "megatron-lm-pristine" / "pretrain_gpt.py").read_text()
    assert "megatron_lighthouse" in (source / "pretrain_gpt.py").read_text()  # the given checkout is left alone
    stages = _stages(proc.stdout)
    assert "--lighthouse-dense-from-iteration 3 " in stages["b_resume_dense"][-1]
    assert "--train-iters 5 " in stages["d_unpatched_dense"][-1] and "--num-layers 6 " in stages["c_dense_scratch"][-1]
    assert "--vocab-size 50304 " in stages["a_lighthouse"][-1]


def test_gpu_script_transformer_engine_mode_with_fp8_stages(tmp_path):
    """TRANSFORMER_IMPL=transformer_engine: no local flags, stage d with Megatron-LM's own TE spec at the full length;
    FP8_FORMAT adds stage a's and stage c's runs in FP8 (f, g), their lm loss compared with bf16's; STAGES picks."""
    proc, out, work = _gpu_dry_run(tmp_path, _patchable_stand_in(tmp_path / "Megatron-LM"),
                                   TRANSFORMER_IMPL="transformer_engine", FP8_FORMAT="hybrid", ITERS_A="20",
                                   ITERS_C="5", ITERS_G="3")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    stages = _stages(proc.stdout)
    assert list(stages) == ["a_lighthouse", "e_monitor_report", "b_resume_dense", "d_unpatched_dense",
                            "c_dense_scratch", "f_lighthouse_fp8", "g_dense_fp8"]
    lines = {name: [line for line in stages[name] if "pretrain_gpt.py" in line] for name in stages}
    for name in ("a_lighthouse", "b_resume_dense", "d_unpatched_dense", "c_dense_scratch", "f_lighthouse_fp8",
                 "g_dense_fp8"):
        (line,) = lines[name]
        assert "--transformer-impl transformer_engine " in line and LOCAL not in line, line
        assert ("--fp8-format hybrid" in line) == (name in ("f_lighthouse_fp8", "g_dense_fp8")), line
    (d,) = lines["d_unpatched_dense"]
    assert "--seq-length 131072 " in d and "--spec" not in d and "--lighthouse" not in d
    assert "--train-iters 20 " in lines["f_lighthouse_fp8"][0] and "--lighthouse " in lines["f_lighthouse_fp8"][0]
    assert "--train-iters 5 " in lines["c_dense_scratch"][0] and "--train-iters 3 " in lines["g_dense_fp8"][0]
    assert "--compare-loss a_lighthouse:f_lighthouse_fp8 --compare-loss c_dense_scratch:g_dense_fp8" in proc.stdout
    proc, out, work = _gpu_dry_run(tmp_path / "two", _patchable_stand_in(tmp_path / "two" / "Megatron-LM"),
                                   TRANSFORMER_IMPL="transformer_engine", STAGES="a c")
    assert proc.returncode == 0, proc.stderr
    assert list(_stages(proc.stdout)) == ["a_lighthouse", "c_dense_scratch"]


@pytest.mark.parametrize("impl", ["transformer_engine", "local"])
def test_gpu_script_hybrid_model(tmp_path, impl):
    """MODEL=hybrid: the same stages through pretrain_hybrid.py with a '*-' pattern of NUM_LAYERS attention layers;
    stage d loads stage b's checkpoint into the pristine script with Megatron-LM's hybrid_stack_spec (TE), or the
    package's dense local hybrid stack (Megatron-LM has no local one), at the full length."""
    stages, _, patched, pristine, work = _user_path_dry_run(tmp_path, "pretrain_hybrid.py", MODEL="hybrid",
                                                            TRANSFORMER_IMPL=impl)
    lines = {name: [line for line in stages[name] if "/pretrain_" in line] for name in stages if name[0] != "e"}
    for name, (line,) in lines.items():
        assert f"/pretrain_hybrid.py " in line and f"--hybrid-layer-pattern {PATTERN8} " in line, line
        assert "--seq-length 131072 " in line and "--num-layers" not in line, line
    assert "lighthouse: 4 of 8 attention layers run Lighthouse (hybrid layers 5, 7, 9, 11)" in "\n".join(
        stages["a_lighthouse"])
    assert f"{patched}/pretrain_hybrid.py --lighthouse " in lines["a_lighthouse"][0]
    assert "--lighthouse-dense-from-iteration 4 " in lines["b_resume_dense"][0]
    spec = ("megatron.core.models.hybrid.hybrid_layer_specs hybrid_stack_spec" if impl == "transformer_engine"
            else "megatron_lighthouse.env_spec dense_local_hybrid_stack_spec")
    (d,) = lines["d_unpatched_dense"]
    assert d.startswith(f"torchrun --nproc-per-node 1 {pristine}/pretrain_hybrid.py --spec {spec} ")
    assert d.endswith(f"--load {work}/ckpt_b_resume_dense")
    assert f"{patched}/pretrain_hybrid.py --spec {spec} " in lines["c_dense_scratch"][0]


def test_gpu_script_gpt_checkpoint_into_a_hybrid_model(tmp_path):
    """Stage h: stage a's Lighthouse GPT checkpoint into the patched pretrain_hybrid.py ('*-' per GPT layer) as
    stage b again, its lm loss compared with stage b's."""
    proc, out, work = _gpu_dry_run(tmp_path, _patchable_stand_in(tmp_path / "Megatron-LM"), STAGES="a b h")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    stages = _stages(proc.stdout)
    assert list(stages) == ["a_lighthouse", "b_resume_dense", "h_gpt_to_hybrid"]
    (b,) = [line for line in stages["b_resume_dense"] if "/pretrain_" in line]
    (h,) = [line for line in stages["h_gpt_to_hybrid"] if "/pretrain_" in line]
    assert h.startswith(f"torchrun --nproc-per-node 1 {work}/megatron-lm-patched/pretrain_hybrid.py {LIGHTHOUSE} "
                        f"--lighthouse-dense-from-iteration 4 --transformer-impl local --hybrid-layer-pattern {PATTERN8} ")
    assert h.endswith(f"--load {work}/ckpt_a_lighthouse") and b.endswith(f"--load {work}/ckpt_a_lighthouse")
    assert b.replace("pretrain_gpt.py", "pretrain_hybrid.py").replace("--num-layers 8", f"--hybrid-layer-pattern {PATTERN8}") \
        .replace("ckpt_b_resume_dense", "ckpt_h_gpt_to_hybrid") == h  # otherwise stage b's command
    assert "--compare-loss b_resume_dense:h_gpt_to_hybrid" in proc.stdout


@pytest.mark.parametrize("argv, env, message", [
    ((), {}, "usage:"),
    (("SRC",), dict(TRANSFORMER_IMPL="te"), "TRANSFORMER_IMPL=te: must be local or transformer_engine"),
    (("SRC",), dict(FP8_FORMAT="hybrid"), "FP8_FORMAT=hybrid with TRANSFORMER_IMPL=local: FP8 needs TransformerEngine"),
    (("SRC",), dict(FP8_FORMAT="fp8", TRANSFORMER_IMPL="transformer_engine"),
     "FP8_FORMAT=fp8: must be hybrid, e4m3 or empty"),
    (("SRC",), dict(STAGES="a f"), "STAGES=a f: stage f is an FP8 stage; set FP8_FORMAT"),
    (("SRC",), dict(STAGES="a x"), "STAGES=a x: x is not a stage"),
    (("SRC",), dict(ITERS_C="0"), "ITERS_C=0: must be a positive integer"),
    (("SRC",), dict(MODEL="mamba"), "MODEL=mamba: must be gpt or hybrid"),
    (("SRC",), dict(MODEL="hybrid", STAGES="a h"), "STAGES=a h: stage h loads stage a's GPT checkpoint into a "
                                                   "HybridModel; it needs MODEL=gpt"),
    (("/nonexistent",), {}, "MEGATRON_LM_DIR=/nonexistent: not a Megatron-LM checkout"),
    (("SRC",), dict(ITERS_A="0"), "ITERS_A=0: must be a positive integer"),
    (("SRC",), dict(BUDGET_S="ten"), "BUDGET_S=ten: must be a positive integer"),
    (("SRC",), dict(DRY_RUN="yes"), "DRY_RUN=yes: must be 0 or 1"),
])
def test_gpu_script_refuses_bad_usage(tmp_path, argv, env, message):
    source = _patchable_stand_in(tmp_path / "Megatron-LM")
    argv = [str(source) if a == "SRC" else a for a in argv]
    command = ["bash", str(GPU_SCRIPT), *argv] + ([str(tmp_path / "out")] if argv else [])
    proc = subprocess.run(command, env={**os.environ, **env}, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr


# -- against a real Megatron-LM checkout (MEGATRON_LM_DIR) -------------------------------------------------------

CHECKOUT = pathlib.Path(os.environ.get("MEGATRON_LM_DIR") or "/nonexistent")
needs_checkout = pytest.mark.skipif(
    not (CHECKOUT / "pretrain_gpt.py").is_file(),
    reason="set MEGATRON_LM_DIR to a Megatron-LM checkout (e.g. the commit of patches/apply.sh) to run these")
#: What pretrain_gpt.py needs of a checkout (the rest of a clone is not copied).
CHECKOUT_FILES = ("megatron", "pretrain_gpt.py", "gpt_builders.py", "model_provider.py", "pretrain_hybrid.py",
                  "hybrid_builders.py")
#: A small model of the examples' shape at their 131072 tokens: 5 layers, the middle one Lighthouse.
SMALL = dict(NUM_LAYERS="5", HIDDEN="64", HEADS="4", FFN="128", VOCAB_SIZE="256", TRANSFORMER_IMPL="local")


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> dict:
    """``{"patched": ..., "pristine": ...}``: two copies of MEGATRON_LM_DIR, one with patches/apply.sh applied."""
    root = tmp_path_factory.mktemp("megatron_lm")
    copies = {}
    for name in ("pristine", "patched"):
        copies[name] = root / name
        copies[name].mkdir()
        for item in CHECKOUT_FILES:
            source = CHECKOUT / item
            if source.is_dir():
                shutil.copytree(source, copies[name] / item, ignore=shutil.ignore_patterns("__pycache__"))
            elif source.is_file():
                shutil.copy2(source, copies[name] / item)
    for script in ("pretrain_gpt.py", "pretrain_hybrid.py"):
        if "megatron_lighthouse" in (copies["pristine"] / script).read_text():
            subprocess.run(["git", "apply", "--reverse", f"--include={script}", str(PATCH)], cwd=copies["pristine"],
                           check=True)
    subprocess.run(["bash", str(ROOT / "patches" / "apply.sh"), str(copies["patched"])], check=True,
                   capture_output=True)
    return copies


@needs_checkout
@pytest.mark.parametrize("impl", ["transformer_engine", "local"])
def test_checkout_examples_launch_with_mock_data(tmp_path, checkout, impl):
    """Against a patched Megatron-LM checkout, all three examples need no dataset or tokenizer and launch with
    --mock-data and --no-create-attention-mask-in-dataloader; the pristine one takes the unpatched route."""
    for script in SCRIPTS:
        for copy, hook in ((checkout["patched"], "--lighthouse "), (checkout["pristine"], "--spec ")):
            proc = _run(script, tmp_path, **_mock(copy, TRANSFORMER_IMPL=impl), **_needs(script, tmp_path))
            assert proc.returncode == 0, (script, proc.stderr)
            command = proc.stdout.splitlines()[-1]
            assert MOCK in command and (LOCAL in command) == (impl == "local"), (script, command)
            if script != "resume_dense.sh" or copy == checkout["patched"] or impl == "local":
                assert f"pretrain_gpt.py {hook}" in command, (script, command)


def _check_command(copy: pathlib.Path, command: str) -> subprocess.CompletedProcess:
    """``patches/check_patched.py COPY -- COMMAND``: Megatron-LM's parser and model builder on CPU."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "kernels"),
                                                         os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, str(ROOT / "patches" / "check_patched.py"), str(copy), "--", command],
                          capture_output=True, text=True, timeout=300, env=env)


@needs_checkout
@pytest.mark.parametrize("script, copy, env, layers, lighthouse", [
    # stage one, patched: the Lighthouse flags; layers 0, 1, -2, -1 dense
    ("pretrain_lighthouse_1gpu.sh", "patched", {}, ["SDPACoreAttention"] * 2 + ["LighthouseCoreAttention"]
     + ["SDPACoreAttention"] * 2, "[2]"),
    # a stage-two checkpoint in the unpatched script, an ordinary dense model (the GPU script's stage d)
    ("resume_dense.sh", "pristine", {}, ["SDPACoreAttention"] * 5, "none"),
    # the same model dense from scratch through the patched script, monitor on (the GPU script's stage c)
    ("pretrain_lighthouse_1gpu.sh", "patched", {"DENSE": "1", "MONITOR": "1"}, ["SDPACoreAttention"] * 5, "none"),
    # stage two through the patched script: the Lighthouse model, switched to dense from the resumed iteration
    ("resume_dense.sh", "patched", {"DENSE_FROM_ITER": "4"}, ["SDPACoreAttention"] * 2 + ["LighthouseCoreAttention"]
     + ["SDPACoreAttention"] * 2, "[2]"),
    # stage one, unpatched: --spec megatron_lighthouse.env_spec with the printed LIGHTHOUSE_* variables; the dense
    # layers are Lighthouse modules that run dense
    ("pretrain_lighthouse_1gpu.sh", "pristine", {}, ["LighthouseCoreAttention"] * 5, "[2]"),
    # a HybridModel ('*-' x 5) through pretrain_hybrid.py: the middle attention layer (hybrid layer 5) runs
    # Lighthouse, patched and unpatched (every attention layer a Lighthouse module, the dense ones running dense)
    (HYBRID, "patched", {}, ["LighthouseCoreAttention", "MLPLayer"] * 5, "[4]"),
    (HYBRID, "pristine", {}, ["LighthouseCoreAttention", "MLPLayer"] * 5, "[4]"),
    (HYBRID, "patched", {"DENSE": "1", "MONITOR": "1"}, ["SDPACoreAttention", "MLPLayer"] * 5, "none"),
    ("resume_dense.sh", "patched", {"DENSE_FROM_ITER": "4", "HYBRID_LAYER_PATTERN": "*-" * 5},
     ["LighthouseCoreAttention", "MLPLayer"] * 5, "[4]"),
    # its stage-two checkpoint in the unpatched pretrain_hybrid.py without TransformerEngine: the package's dense
    # local hybrid stack (Megatron-LM's hybrid_stack_spec, TE throughout, takes it on the GPU)
    ("resume_dense.sh", "pristine", {"HYBRID_LAYER_PATTERN": "*-" * 5}, ["SDPACoreAttention", "MLPLayer"] * 5, "none"),
])
def test_megatron_accepts_the_local_mock_commands(tmp_path, checkout, script, copy, env, layers, lighthouse):
    """Megatron-LM's own argument parser (the patched script's, with the hook's start-up checks) takes every flag the
    example passes with TRANSFORMER_IMPL=local and MOCK_DATA=1, and builds the model without TransformerEngine."""
    proc = _run(script, tmp_path, **_mock(checkout[copy], **SMALL, **env), **_needs(script, tmp_path))
    assert proc.returncode == 0, proc.stderr
    checked = _check_command(checkout[copy], proc.stdout.splitlines()[-1])
    assert checked.returncode == 0, checked.stdout[-2000:] + checked.stderr[-4000:]
    assert f"core attention per layer: {layers}" in checked.stdout
    assert f"Lighthouse layers: {lighthouse}" in checked.stdout
    assert "accepts the command and builds its model" in checked.stdout
    assert "end of arguments" not in checked.stdout + checked.stderr  # Megatron-LM's own output is kept back


@needs_checkout
def test_the_patched_scripts_train_and_switch(checkout):
    """``patches/check_patched.py`` on the patched copy: pretrain_gpt.py's and pretrain_hybrid.py's own argument
    parsers, model builders and forward_step, Lighthouse where --lighthouse-dense-layers says (in the hybrid model:
    among its attention layers), switched to dense at --lighthouse-dense-from-iteration."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "kernels"),
                                                         os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(ROOT / "patches" / "check_patched.py"), str(checkout["patched"])],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for script in ("pretrain_gpt.py", "pretrain_hybrid.py"):
        assert f"OK: the patched {script} parses the flags, builds Lighthouse layers, trains and switches to dense" \
            in proc.stdout
    assert ("--hybrid-layer-pattern *-*-*-*-*-*-: 4 of 6 attention layers run Lighthouse (hybrid layers 3, 5, 7, 9); "
            "dense: 1, 11") in proc.stdout
    assert proc.stdout.count("iteration 2: 4 Lighthouse layers ran dense") == 2


@needs_checkout
@pytest.mark.parametrize("comm", ["p2p", "a2a+p2p"])
def test_megatron_accepts_the_multinode_command_as_one_rank(tmp_path, checkout, comm):
    """The 1M example at context parallelism 8 on one node, parsed as rank 0 of 8 on a Hopper GPU: Megatron-LM
    asserts CUDA_DEVICE_MAX_CONNECTIONS=1 there, which the example sets; the hook validates 16 chunks; a2a+p2p
    comes with the hierarchical sizes Megatron-LM asserts for it."""
    proc = _run("pretrain_lighthouse_multinode_1m.sh", tmp_path,
                **_mock(checkout["patched"], **{**SMALL, "NUM_LAYERS": "6"}), NNODES="1", CP_COMM_TYPE=comm)
    assert proc.returncode == 0, proc.stderr
    command = proc.stdout.splitlines()[-1]
    checked = _check_command(checkout["patched"], command)
    assert checked.returncode == 0, checked.stdout[-2000:] + checked.stderr[-4000:]
    assert "Lighthouse: seq_length 1048576 -> subsequence 81920" in checked.stdout
    assert "Lighthouse layers: [2, 3]" in checked.stdout and "builds its model (as rank 0 of 8, its tensor x pipeline x context parallel ranks)" in checked.stdout
    refused = _check_command(checkout["patched"], command.replace("CUDA_DEVICE_MAX_CONNECTIONS=1 ", ""))
    assert refused.returncode == 1
    assert refused.stderr.splitlines()[-1].endswith("AssertionError: Using tensor model parallelism or context "
                                                    "parallelism require setting the environment variable "
                                                    "CUDA_DEVICE_MAX_CONNECTIONS to 1"), refused.stderr[-2000:]


@needs_checkout
def test_a_te_command_is_checked_in_its_local_form_without_te(tmp_path, checkout):
    """On a CPU machine the command DRY_RUN prints for TransformerEngine (and FP8) is checked as far as it can be:
    its local form, said so, instead of Megatron-LM's 'apply_rope_fusion is not available'."""
    if importlib.util.find_spec("transformer_engine") is not None:
        pytest.skip("TransformerEngine is installed: the command is checked as it is")
    env = {**SMALL, "FP8": "hybrid"}
    del env["TRANSFORMER_IMPL"]
    proc = _run("pretrain_lighthouse_1gpu.sh", tmp_path, **_mock(checkout["patched"], **env))
    assert proc.returncode == 0, proc.stderr
    checked = _check_command(checkout["patched"], proc.stdout.splitlines()[-1])
    assert checked.returncode == 0, checked.stdout[-2000:] + checked.stderr[-4000:]
    assert checked.stdout.startswith("note: this Python has no TransformerEngine: the command is checked in its local "
                                     "form (--transformer-impl local --no-rope-fusion"), checked.stdout
    assert "without --fp8-format hybrid" in checked.stdout and "can only be checked where TransformerEngine" in \
        checked.stdout
    assert "accepts the command in its local form and builds its model" in checked.stdout


@needs_checkout
def test_without_the_rope_flag_megatron_refuses(tmp_path, checkout):
    """The check can fail: without --no-rope-fusion Megatron-LM stops at start-up (no TransformerEngine here; the
    other local flags are refused by the hook's start-up checks, tested in test_megatron_lm_args.py)."""
    if importlib.util.find_spec("transformer_engine") is not None:
        pytest.skip("TransformerEngine is installed: Megatron-LM's RoPE fusion works here")
    proc = _run("pretrain_lighthouse_1gpu.sh", tmp_path, **_mock(checkout["patched"], **SMALL))
    command = proc.stdout.splitlines()[-1]
    assert " --no-rope-fusion " in command
    checked = _check_command(checkout["patched"], command.replace(" --no-rope-fusion ", " "))
    assert checked.returncode == 1, checked.stdout[-2000:]
    last = checked.stderr.splitlines()[-1]  # one line: what Megatron-LM said, and what to do here
    assert last.startswith(f"error: {checkout['patched']}/pretrain_gpt.py refuses the command: ValueError: "
                           "apply_rope_fusion is not available. Please install TE >= 1.4."), checked.stderr[-3000:]
    assert "check the TRANSFORMER_IMPL=local form of the command" in last


@needs_checkout
def test_gpu_script_dry_run_on_the_checkout(tmp_path):
    proc, out, work = _gpu_dry_run(tmp_path, CHECKOUT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "megatron_lighthouse" in (work / "megatron-lm-patched" / "pretrain_gpt.py").read_text()
    assert "megatron_lighthouse" not in (work / "megatron-lm-pristine" / "pretrain_gpt.py").read_text()
    # Stage d: the pristine script with Megatron-LM's own layer spec, at a length its local attention runs.
    unpatched = _stages(proc.stdout)["d_unpatched_dense"][-1]
    assert f"{work}/megatron-lm-pristine/pretrain_gpt.py --transformer-impl local" in unpatched
    assert "--spec" not in unpatched and "--seq-length 8192 " in unpatched


@needs_checkout
def test_gpu_script_hybrid_dry_run_on_the_checkout(tmp_path):
    """MODEL=hybrid on the checkout: both copies of pretrain_hybrid.py set up, stage d with Megatron-LM's own
    hybrid_stack_spec in the pristine one (TransformerEngine)."""
    proc, out, work = _gpu_dry_run(tmp_path, CHECKOUT, MODEL="hybrid", TRANSFORMER_IMPL="transformer_engine")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "megatron_lighthouse" in (work / "megatron-lm-patched" / "pretrain_hybrid.py").read_text()
    assert "megatron_lighthouse" not in (work / "megatron-lm-pristine" / "pretrain_hybrid.py").read_text()
    unpatched = _stages(proc.stdout)["d_unpatched_dense"][-1]
    assert (f"{work}/megatron-lm-pristine/pretrain_hybrid.py --spec megatron.core.models.hybrid.hybrid_layer_specs "
            f"hybrid_stack_spec --transformer-impl transformer_engine --hybrid-layer-pattern {PATTERN8} ") in unpatched


#: A stand-in for torchrun + Megatron-LM: prints Megatron-LM's log lines for the iterations it is asked to run
#: (from its --load checkpoint's iteration on), the hook's switch line, and saves a checkpoint marker in --save.
FAKE_TORCHRUN = '''
import os, sys, time
argv = sys.argv[1:]
def value(flag):
    return argv[argv.index(flag) + 1] if flag in argv else None
if os.environ.get("FAKE_SLEEP") and "--lighthouse-monitor" in argv:
    time.sleep(float(os.environ["FAKE_SLEEP"]))
start = int(open(os.path.join(value("--load"), "latest_checkpointed_iteration.txt")).read()) if value("--load") else 0
total, dense_from = int(value("--train-iters")), value("--lighthouse-dense-from-iteration")
if dense_from is not None and start >= int(dense_from):
    print(f"INFO:megatron_lighthouse.megatron_lm:Lighthouse: iteration {start} >= --lighthouse-dense-from-iteration "
          f"{dense_from}: 4 Lighthouse layers switched to dense attention (layers 3, 4, 5, 6)")
for it in range(start + 1, total + 1):
    print(f" [2026-08-23 10:00:00.000000] iteration {it:8d}/{total:8d} | consumed samples: {it:12d} |"
          f" elapsed time per iteration (ms): {1000.0 * it:.1f} | learning rate: 2.000000E-03 |"
          f" global batch size:     1 | lm loss: {11 - it / 2:.6E} | loss scale: 1.0 | grad norm: 1.000 |"
          f" number of skipped iterations:   0 | number of nan iterations:   0 |")
    print(f"[Rank 0] (after {it} iterations) memory (MB) | allocated: 100.00 | max allocated: {500.0 + it:.2f}"
          f" | reserved: 600.00 | max reserved: 700.00")
os.makedirs(value("--save"), exist_ok=True)
open(os.path.join(value("--save"), "latest_checkpointed_iteration.txt"), "w").write(str(total))
'''


def _fake_run(tmp_path: pathlib.Path, **env: str) -> tuple:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "torchrun").write_text(f"#!{sys.executable}\n{FAKE_TORCHRUN}")
    (bin_dir / "torchrun").chmod(0o755)
    path = f"{bin_dir}:{pathlib.Path(sys.executable).parent}:{os.environ['PATH']}"
    return _gpu_dry_run(tmp_path, _patchable_stand_in(tmp_path / "Megatron-LM"), DRY_RUN="0", PATH=path,
                        **_past_preflight(tmp_path), **env)


def test_gpu_script_chains_the_stages_and_reads_their_logs(tmp_path):
    """A real (not dry) run over a stand-in torchrun: each stage loads what the one before saved, the report reads
    Megatron-LM's lines; without a monitor log (no NVML) the PNG stage is skipped and the script says so."""
    proc, out, work = _fake_run(tmp_path)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "== stages that did not finish: e_monitor_report" in proc.stderr
    record = json.loads((out / "megatron_lm_gpu.json").read_text())["stages"]
    assert {name: stage["status"]["rc"] for name, stage in record.items()} == {
        "a_lighthouse": 0, "b_resume_dense": 0, "d_unpatched_dense": 0, "c_dense_scratch": 0,
        "e_monitor_report": "skipped"}
    summaries = {name: stage["summary"] for name, stage in record.items()}
    assert [summaries[n]["iterations"] for n in ("a_lighthouse", "b_resume_dense", "d_unpatched_dense",
                                                 "c_dense_scratch")] == [[1, 4], [5, 6], [7, 8], [1, 6]]
    assert summaries["b_resume_dense"]["switched_at"] == 4
    assert summaries["d_unpatched_dense"]["continues"] == {"stage": "b_resume_dense", "lm_loss_before": 8.0,
                                                           "lm_loss_after": 7.5}
    table = (out / "megatron_lm_gpu.txt").read_text()
    assert "b_resume_dense: 4 Lighthouse layers switched to dense at iteration 4" in table
    assert sorted(p.name for p in out.iterdir()) == ["megatron_lm_gpu.json", "megatron_lm_gpu.txt",
                                                     "megatron_lm_gpu_logs.tar.gz"]


def test_gpu_script_bounds_each_stage(tmp_path):
    """Stage a over its timeout: killed (rc 124), the stages needing its checkpoint skipped, the rest run."""
    proc, out, work = _fake_run(tmp_path, FAKE_SLEEP="60", TIMEOUT_A="10")
    assert proc.returncode == 1
    record = json.loads((out / "megatron_lm_gpu.json").read_text())["stages"]
    assert {name: stage["status"]["rc"] for name, stage in record.items()} == {
        "a_lighthouse": 124, "c_dense_scratch": 0, "e_monitor_report": "skipped", "b_resume_dense": "skipped",
        "d_unpatched_dense": "skipped"}
    assert record["a_lighthouse"]["status"]["seconds"] < 40
