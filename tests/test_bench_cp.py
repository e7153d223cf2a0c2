"""benchmarks/bench_cp.py on CPU: end to end (gloo, tiny sizes) without megatron-core, W=1 then W=2; with
``--inner te`` over the fake TransformerEngine (tests/fake_te.py) in the shared pool of 4 spawned ranks
(``test_te_fake.POOL``; W=2 runs as two CP groups of 2), each ``--cp-comm-type``."""

from __future__ import annotations

import contextlib
import io
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from benchmark_utils import load_benchmark
from spawn import run_on_ranks
from test_te_cp_lighthouse import fake_te_context_parallel
from test_te_fake import POOL, own_process_groups

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_bench_cp_tiny_cpu_without_megatron(tmp_path):
    blocker = tmp_path / "no_megatron" / "megatron"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('megatron-core is not installed on the GPU machine')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocker.parent), os.environ.get("PYTHONPATH", "")])}
    out = tmp_path / "results"
    for world in (1, 2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
               str(ROOT / "benchmarks" / "bench_cp.py"), "--device", "cpu", "--tiny", "--out-dir", str(out)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "t1/(W*tW)" in proc.stdout

    one, two = (json.loads((out / f"cp_cpu_w{w}.json").read_text()) for w in (1, 2))
    assert one["world"] == 1 and "check" not in one and one["efficiency"] == {} and one["baseline"] is None
    assert two["baseline"]["results"] == one["results"]
    assert two["check"]["passed"] and two["check"]["indices_equal"]
    assert {r["case"].split()[0] for r in two["check"]["rows"]} == {"lighthouse", "dense"}
    assert all(r["cp_vs_single"] < 1e-5 for r in two["check"]["rows"])
    assert two["settings"] == one["settings"] and two["settings"]["max_cp"] == 2
    for method in ("lighthouse", "dense"):
        res = two["results"][method]
        assert res["median_s"] > 0 and res["times_s"]
        want = one["results"][method]["median_s"] / (2 * res["median_s"])
        assert abs(two["efficiency"][method] - want) < 1e-12


def test_baseline_is_the_w1_run_of_the_same_settings(tmp_path):
    bench_cp = load_benchmark("bench_cp")
    settings = dict(seq_len=4096, max_cp=2, dtype="fp32", device="cpu", inner="own")
    one = dict(world=1, date="2026-12-01", device_name="cpu", settings=settings,
               results={"lighthouse": {"median_s": 3.0}, "dense": {"error": "out of memory"}})
    two = dict(world=2, settings=settings, results={"lighthouse": {"median_s": 2.0}, "dense": {"median_s": 1.0}})
    assert bench_cp.load_baseline(two, str(tmp_path)) == (None, {})  # no W=1 run written yet
    (tmp_path / "cp_cpu_w1.json").write_text(json.dumps(one))
    assert bench_cp.load_baseline(one, str(tmp_path)) == (None, {})  # a W=1 run has no baseline
    base, efficiency = bench_cp.load_baseline(two, str(tmp_path))
    assert base["results"] == one["results"] and base["path"] == str(tmp_path / "cp_cpu_w1.json")
    assert efficiency == {"lighthouse": 3.0 / (2 * 2.0)}  # dense did not run at W=1
    with pytest.raises(SystemExit, match="other settings"):
        bench_cp.load_baseline({**two, "settings": {**settings, "seq_len": 8192}}, str(tmp_path))


# -- --inner te: LighthouseCoreAttention with TEDotProductAttention inside, over the fake TE (tests/fake_te.py) -----
def test_inner_te_without_transformer_engine_or_megatron_is_refused_before_any_work(tmp_path):
    """No TransformerEngine here (and then no megatron-core either): one argparse error line, nothing run."""
    bench = [sys.executable, str(ROOT / "benchmarks" / "bench_cp.py"), "--device", "cpu", "--tiny", "--inner", "te",
             "--out-dir", str(tmp_path)]
    proc = subprocess.run(bench, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines()[-1].endswith(
        "error: --inner te: TransformerEngine is not importable here (transformer_engine); install it (pip install -e "
        "'.[te]' for TransformerEngine), or run the default --inner own"), proc.stderr
    blocker = tmp_path / "no_megatron" / "megatron"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('no megatron-core')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocker.parent), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(bench, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2 and "error: --inner te: megatron-core is not importable here (megatron.core)" \
        in proc.stderr, proc.stderr
    assert not list(tmp_path.glob("*.json")) and "equality check" not in proc.stdout


def test_cp_comm_type_needs_inner_te():
    bench_cp = load_benchmark("bench_cp")
    with pytest.raises(SystemExit) as exit_info:
        bench_cp.parse_args(["--cp-comm-type", "a2a"])
    assert exit_info.value.code == 2
    args = bench_cp.parse_args(["--device", "cpu", "--tiny"])
    assert args.inner == "own" and args.cp_comm_type is None and args.dtype == "fp32"
    assert bench_cp.result_name("cuda", "own", None, 2) == "cp_cuda_w2"
    assert bench_cp.result_name("cuda", "te", None, 1) == "cp_cuda_te_w1"
    assert bench_cp.result_name("cuda", "te", "a2a", 2) == "cp_cuda_te_a2a_w2"


def _bench_te_task(rank, pool_world, world, task, *task_args):
    with own_process_groups():
        with fake_te_context_parallel(world):
            globals()[task](rank, world, *task_args)


def _bench_args(*argv: str):
    """bench_cp's arguments at tiny sizes, ``--inner te`` (the fake TE installed: it imports)."""
    return load_benchmark("bench_cp").parse_args(["--device", "cpu", "--tiny", "--inner", "te", "--max-cp", "2",
                                                  *argv])


def _refusals(rank, world):
    """``--cp-comm-type`` errors (TE importable here): one argparse line naming the setting, before any work."""
    for argv, message in ((["--cp-comm-type", "allgather"], "--cp-comm-type: cp_comm_type='allgather' "
                                                            "(context_parallel_size=2): not a context-parallel "
                                                            "communication type of TransformerEngine"),
                          (["--cp-comm-type", "ring"], "which accepts 'p2p', 'all_gather', 'a2a', 'a2a+p2p'"),
                          (["--cp-comm-type", "a2a", "--max-cp", "4"], "--cp-comm-type a2a with --heads 2: TE's "
                                                                       "all-to-all splits the heads over the CP "
                                                                       "ranks, so --max-cp 4 must divide them")):
        err = io.StringIO()
        with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exit_info:
            _bench_args(*argv)
        assert exit_info.value.code == 2 and message in err.getvalue(), (argv, err.getvalue())
    args = _bench_args()
    assert args.cp_comm_type == "p2p" and args.dtype == "bf16"  # TE's default; TE has no fp32 backend under CP


def test_inner_te_refuses_bad_comm_types():
    run_on_ranks(_bench_te_task, POOL["world"], 2, "_refusals", pool=POOL["pool"], timeout_s=120)


def _measure(rank, world, cp_comm_type):
    """One tiny run of bench_cp's measurement (W = ``world``) through the fake TE: the check passes within the
    shared bf16 bound on every rank, TE got the communication type, the timing and the ring step are recorded."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    import fake_te

    bench_cp = load_benchmark("bench_cp")
    fake = fake_te.install()
    fake.calls.clear()
    args = _bench_args("--cp-comm-type", cp_comm_type)
    record = bench_cp.measure(args, parallel_state.get_context_parallel_group(), torch.device("cpu"))
    inits = [call for kind, call in fake.calls if kind == "init"]
    assert len(inits) == 2 and all(init["cp_comm_type"] == cp_comm_type for init in inits), inits
    if world == 1:  # the chunked single-device run, TE without CP as its dense kernel
        assert "check" not in record and "ring_step" not in record
        assert all(init["cp_group"] is None for init in inits), inits
    else:
        check = record["check"]
        assert check["passed"] and check["indices_equal"], check
        assert [(r["case"].split()[0], r["field"]) for r in check["rows"]] == [
            (case, field) for case in ("lighthouse", "dense") for field in ("out", "dq", "dk", "dv")]
        assert all(0 < r["worst_rank_vs_fp32"] <= bench_cp.TE_BF16_REL_L2 for r in check["rows"]), check["rows"]
        assert all(r["worst_rank_vs_fp32"] >= r["cp_vs_fp32"] - 1e-12 for r in check["rows"]), check["rows"]
        forwards = [call for kind, call in fake.calls if kind == "forward"]
        assert forwards and all(call["cp_comm_type"] == cp_comm_type for call in forwards)
        assert all(dist.get_world_size(call["cp_group"]) == world for call in forwards if call["cp_group"] is not None)
        for method, step in record["ring_step"].items():
            assert step["exchange_s"] > 0 and step["attention_s"] > 0, (method, step)
            assert step["ratio"] == step["exchange_s"] / step["attention_s"]
        assert record["ring_step"]["dense"]["entries"] == args.seq_len // world
    assert record["settings"]["inner"] == "te" and record["cp_comm_type"] == cp_comm_type
    for method in ("lighthouse", "dense"):
        result = record["results"][method]
        assert result["median_s"] > 0 and result["te_backend"].startswith("unknown"), result  # the fake keeps none


@pytest.mark.parametrize("cp_comm_type", ["p2p", "all_gather", "a2a"])
def test_inner_te_check_and_timing_over_fake_te(cp_comm_type):
    run_on_ranks(_bench_te_task, POOL["world"], 2, "_measure", cp_comm_type, pool=POOL["pool"], timeout_s=240)


def test_inner_te_single_device_run():
    run_on_ranks(_bench_te_task, POOL["world"], 1, "_measure", "p2p", pool=POOL["pool"], timeout_s=240)


def _wrong_budget_fails(rank, world):
    """The check can fail: CP modules built with twice the budget select more entries than the reference."""
    from megatron.core import parallel_state

    bench_cp = load_benchmark("bench_cp")
    args, device = _bench_args(), torch.device("cpu")
    wrong = _bench_args()
    wrong.topk = 2 * args.topk  # (--tiny sets --topk)
    layers = bench_cp.te_layers(args, bench_cp.te_core_attentions(wrong, world, device, torch.bfloat16))
    check = bench_cp.run_check(args, parallel_state.get_context_parallel_group(), device, torch.bfloat16, layers)
    assert not check["passed"], check
    assert {r["case"].split()[0] for r in check["rows"] if not r["passed"]} == {"lighthouse"}, check["rows"]
    assert min(r["worst_rank_vs_fp32"] for r in check["rows"] if not r["passed"]) > 1e-1


def test_inner_te_check_fails_on_a_wrong_answer():
    run_on_ranks(_bench_te_task, POOL["world"], 2, "_wrong_budget_fails", pool=POOL["pool"], timeout_s=240)


# -- benchmarks/run_cp_gpu.sh, with stand-ins for torchrun's launch and nvidia-smi ---------------------------------
def _run_cp_gpu(tmp_path: pathlib.Path, te: bool, **env: str) -> tuple:
    """``bash benchmarks/run_cp_gpu.sh --seq-len 65536`` with ``python3 -m torch.distributed.run`` and
    ``nvidia-smi`` recorded instead of run (every other ``python3`` is this Python), ``te``: the fake TE installed
    in every Python process (a ``sitecustomize``); returns the process and the recorded launches."""
    bin_dir, record = tmp_path / "bin", tmp_path / "launches"
    bin_dir.mkdir(parents=True, exist_ok=True)
    (bin_dir / "python3").write_text(
        f'#!/usr/bin/env bash\nif [ "$1 $2" = "-m torch.distributed.run" ]; then echo "${{@:3}}" >> {record}; '
        f'exit 0; fi\nexec {sys.executable} "$@"\n')
    (bin_dir / "nvidia-smi").write_text("#!/usr/bin/env bash\necho 'name, memory.total, driver_version'\n")
    for tool in ("python3", "nvidia-smi"):
        (bin_dir / tool).chmod(0o755)
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    if te:
        (site / "sitecustomize.py").write_text("import fake_te\nfake_te.install()\n")
    full = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}",
            "PYTHONPATH": os.pathsep.join([str(site), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]), **env}
    full.pop("OUT", None)
    full.setdefault("RESULTS_DIR", str(tmp_path / "results"))
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "run_cp_gpu.sh"), "--seq-len", "65536"], env=full,
                          capture_output=True, text=True, timeout=300)
    return proc, record.read_text().splitlines() if record.exists() else []


def test_run_cp_gpu_runs_w1_then_each_comm_type(tmp_path):
    before = sorted((ROOT / "benchmarks" / "results").iterdir())
    proc, launches = _run_cp_gpu(tmp_path, te=True, INNER="te", W_MAX="4", CP_COMM_TYPES="p2p all_gather a2a")
    assert proc.returncode == 0, proc.stderr
    common = f"benchmarks/bench_cp.py --max-cp 4 --out-dir {tmp_path / 'results'} --inner te"
    assert launches == [f"--standalone --nproc-per-node 1 {common} --seq-len 65536"] + [
        f"--standalone --nproc-per-node 4 {common} --cp-comm-type {comm} --seq-len 65536"
        for comm in ("p2p", "all_gather", "a2a")]
    proc, launches = _run_cp_gpu(tmp_path / "own", te=False)
    assert proc.returncode == 0, proc.stderr
    assert launches == [f"--standalone --nproc-per-node {w} benchmarks/bench_cp.py --max-cp 2 --out-dir "
                        f"{tmp_path / 'own' / 'results'} --inner own --seq-len 65536" for w in (1, 2)]
    assert sorted((ROOT / "benchmarks" / "results").iterdir()) == before  # the measured files stay


@pytest.mark.parametrize("te, env, message", [
    (True, dict(INNER="te", CP_COMM_TYPES="p2p allgather"), "cp_comm_type='allgather' (context_parallel_size=2): not "
                                                            "a context-parallel communication type of TransformerEngine"),
    (True, dict(INNER="te", W_MAX="16", CP_COMM_TYPES="a2a"), "--cp-comm-type a2a with --heads 8: TE's all-to-all"),
    (False, dict(INNER="te"), "--inner te: TransformerEngine is not importable here"),
    (False, dict(CP_COMM_TYPES="a2a"), "CP_COMM_TYPES=a2a: only with INNER=te"),
    (False, dict(INNER="TE"), "INNER=TE: must be own or te"),
    (False, dict(W_MAX="1"), "W_MAX=1: must be an integer >= 2"),
])
def test_run_cp_gpu_refuses_bad_settings_before_any_run(tmp_path, te, env, message):
    proc, launches = _run_cp_gpu(tmp_path, te=te, **env)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert launches == [] and "gpus" not in proc.stdout  # nothing measured, not even the GPU query
