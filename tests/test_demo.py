"""The main job runs end to end at a tiny size, in this process: both stages, the dense baseline, Lighthouse
throughout, its outputs, an interrupted run resumed from its checkpoint, and clear errors; and once as a user runs
it, in a subprocess."""

from __future__ import annotations

import json
import logging
import math
import os
import pathlib
import pickle
import re
import shutil
import subprocess
import sys

import pytest
import torch

import megatron_lighthouse
from megatron_lighthouse import atomic
from megatron_lighthouse.demo import cli
from megatron_lighthouse.demo import train

TINY = ["--layers", "2", "--hidden", "32", "--heads", "2", "--ffn", "64", "--seq-len", "256", "--batch-size", "2",
        "--eval-every", "3", "--eval-batches", "1", "--log-every", "3", "--corpus-bytes", "300000", "--warmup", "2",
        "--steps", "6"]
#: The Lighthouse settings of the tiny runs (not given to the dense baseline, which has no Lighthouse layers).
TINY_LIGHTHOUSE = ["--levels", "2", "--pooling-factor", "2", "--topk", "128", "--dense-layers", "0"]
STAGES = {"two-stage": ["lighthouse", "dense"], "dense": ["dense"], "lighthouse": ["lighthouse"]}


def _main(*args: str) -> int:
    dense = "--baseline" in args or "dense" in args
    return cli.main([*TINY, *([] if dense else TINY_LIGHTHOUSE), *args])


def _main_default_warmup(*args: str) -> int:
    """:func:`_main` without ``--warmup``: the warm-up that follows ``--steps``."""
    i = TINY.index("--warmup")
    return cli.main([*TINY[:i], *TINY[i + 2:], *TINY_LIGHTHOUSE, *args])


def _copy_run(runs, mode: str, to: pathlib.Path) -> pathlib.Path:
    """A copy of a finished tiny run of ``runs`` (6 steps; two-stage: switch at step 5), to change it."""
    shutil.copytree(runs[mode][0], to)
    return to


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    """Runs without ``--out`` write ``./demo_out``: keep it out of the checkout."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The three modes of the same tiny run (the baseline through ``--baseline``), each with ``--out``."""
    out = {}
    for mode in STAGES:
        path = tmp_path_factory.mktemp(mode)
        flags = ["--baseline"] if mode == "dense" else ["--mode", mode]
        assert _main(*flags, "--out", str(path)) == 0
        out[mode] = (path, json.loads((path / "metrics.json").read_text()))
    return out


@pytest.mark.parametrize("mode", list(STAGES))
def test_modes_train_evaluate_and_write_outputs(runs, mode):
    path, metrics = runs[mode]
    assert metrics["config"]["mode"] == mode
    assert metrics["switch_step"] == {"two-stage": 5, "dense": 0, "lighthouse": None}[mode]
    assert [s["stage"] for s in metrics["stages"]] == STAGES[mode]
    assert all(s["tokens_per_s"] > 0 and s["seconds"] > 0 and s["final_val_loss"] > 0 for s in metrics["stages"])
    assert [e["step"] for e in metrics["evals"]] == [3, 6]
    assert metrics["final_val_loss"] == metrics["evals"][-1]["val_loss"]
    for e in metrics["evals"]:  # the Lighthouse stage is also scored as it trains, and that is another model
        assert ("val_loss_lighthouse" in e) == (e["stage"] == "lighthouse")
        if e["stage"] == "lighthouse":
            assert e["val_loss_lighthouse"] > 0 and e["val_loss_lighthouse"] != pytest.approx(e["val_loss"], rel=1e-6)
    expected = {"two-stage": ["lighthouse"] * 5 + ["dense"], "dense": ["dense"] * 6,
                "lighthouse": ["lighthouse"] * 6}[mode]
    assert [t["stage"] for t in metrics["train"]] == expected
    assert (path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (path / "loss.png").stat().st_size > 5000
    assert (path / "checkpoint.pt").exists()
    assert not list(path.glob(".*.tmp"))  # every atomic write renamed its temporary file


def test_same_start_then_lighthouse_changes_the_training(runs):
    """Same seed, data and initialization: the first dense-stage loss equals across modes only for dense runs."""
    losses = {mode: [t["loss"] for t in metrics["train"]] for mode, (_, metrics) in runs.items()}
    assert losses["two-stage"][:5] == pytest.approx(losses["lighthouse"][:5], rel=1e-5)
    assert losses["two-stage"][1] != pytest.approx(losses["dense"][1], rel=1e-6)


def test_settings_progress_and_summary_are_printed(tmp_path, caplog, capsys):
    """Once at the start the settings in use (Lighthouse's, its subsequence and FLOP ratio at --seq-len, the switch
    step, the model size); then a progress bar per --log-every steps; at the end the summary table."""
    with caplog.at_level(logging.INFO, logger="megatron_lighthouse.demo.train"):
        assert _main("--steps", "3", "--out", str(tmp_path)) == 0
    messages = caplog.messages
    cost = train.LighthouseConfig(levels=2, pooling_factor=2, topk=128).attention_cost(256, 2, 16)
    settings = "\n".join(m for m in messages if m.startswith(("model:", "training:", "Lighthouse:", "schedule:")))
    assert len(settings.splitlines()) == 4, settings
    assert "levels 2, pooling factor 2, topk 128" in settings and "layers 0 stay dense" in settings
    assert f"S = {cost['subsequence_length']} of the 256 positions: {cost['ratio']:.2f}x" in settings
    assert "dense from step 2 (the switch step" in settings and "Lighthouse for steps 0-1" in settings
    parameters = sum(p.numel() for p in train.build_model(cli.parse_args([*TINY, *TINY_LIGHTHOUSE]),
                                                            torch.device("cpu")).parameters())
    assert f"{parameters / 1e6:.2f}M parameters" in settings and "RoPE" not in settings  # CPU: learned positions
    assert sum(m.startswith("schedule:") for m in messages) == 1
    lines = [m for m in messages if m.startswith("step") and "tokens/s" in m]
    assert re.match(r"step    1/3 \[#{6}-{14}\]  33% eta \d:\d\d:\d\d  lighthouse  loss \d+\.\d{4} +\d+ tokens/s$",
                    lines[0]), lines[0]
    assert re.match(r"step    3/3 \[#{20}\] 100% eta 0:00:00  dense ", lines[-1]), lines[-1]
    out = capsys.readouterr().out
    head, lighthouse, dense = out.split("final validation loss")[0].strip().splitlines()[-3:]
    assert head.split() == ["stage", "steps", "val", "loss,", "Lighthouse", "on", "val", "loss,", "all", "dense",
                            "wall", "s", "tokens/s"], head
    assert lighthouse.split()[:4] == ["lighthouse", "2", "-", "-"] and dense.split()[:3] == ["dense", "1", "-"]
    assert re.fullmatch(r"\d+\.\d{4}", dense.split()[3]), dense  # evaluated at step 3 only: in the dense stage
    assert "final validation loss (all dense, the model the run ships):" in out


def test_summary_says_how_each_loss_was_measured(runs, capsys):
    """The Lighthouse stage's losses with its Lighthouse layers on and with every layer dense, each in the column
    that says so; the dense stage has no Lighthouse-on loss."""
    cli.print_summary(runs["two-stage"][1])
    rows = capsys.readouterr().out.strip().splitlines()
    lighthouse, dense = (row.split() for row in rows[1:3])
    stages = {s["stage"]: s for s in runs["two-stage"][1]["stages"]}
    assert lighthouse[2:4] == [f"{stages['lighthouse']['final_val_loss_lighthouse']:.4f}",
                               f"{stages['lighthouse']['final_val_loss']:.4f}"]
    assert dense[2:4] == ["-", f"{stages['dense']['final_val_loss']:.4f}"]


def test_settings_show_only_what_the_mode_uses():
    """--mode dense says Lighthouse is off and shows none of its settings; --mode lighthouse has no switch step."""
    dense = "\n".join(train.describe(train.DemoConfig(mode="dense"), 0, 1_000_000))
    assert "Lighthouse is off" in dense and "1.00M parameters" in dense
    assert not any(word in dense for word in ("levels", "pooling", "topk", "S =", "switch", "RoPE"))
    sparse = "\n".join(train.describe(train.DemoConfig(mode="lighthouse"), None, 1))
    assert "no switch to dense" in sparse and "dense from step" not in sparse
    assert "S = 768 of the 1024 positions: 0.56x the attention FLOPs of dense" in sparse  # 256 + 4 * 128
    wsd = "\n".join(train.describe(train.DemoConfig(lr_decay_style="wsd"), 160, 1))
    assert "linear to 10% over the last 40 steps" in wsd and "linear" not in "\n".join(
        train.describe(train.DemoConfig(), 160, 1))


def test_dense_checkpoint_loads_into_the_dense_model(runs):
    """``model_dense.pt`` is a plain state dict that the dense GPT of the same settings loads strictly."""
    path, metrics = runs["two-stage"]
    state = torch.load(path / "model_dense.pt", weights_only=False)
    settings = dict(metrics["config"])
    settings.update(mode="dense", dense_layers=tuple(settings["dense_layers"]))
    dense = train.build_model(train.DemoConfig(**settings), torch.device("cpu"))
    dense.load_state_dict(state, strict=True)
    trained = {k: v for k, v in torch.load(path / "checkpoint.pt", weights_only=False)["model"].items()
               if isinstance(v, torch.Tensor)}
    loaded = dense.state_dict()
    assert trained and all(torch.equal(loaded[k], v) for k, v in trained.items())


def test_interrupted_run_resumes_to_the_same_result(runs, tmp_path, monkeypatch, capsys, caplog):
    """Interrupted in step 3 (after the checkpoint of step 3; evaluation does not call the loss), ``--resume`` finishes
    the run with the losses of the uninterrupted one: batches depend on the step only, model and optimizer come
    from the checkpoint. Resumed to more steps before its switch (step 5 of 6), the run keeps that switch step."""
    real_loss = train._loss
    calls = []

    def interrupted(*args):
        calls.append(1)
        if len(calls) == 4:  # 3 training steps, then step 3
            raise KeyboardInterrupt
        return real_loss(*args)

    out = tmp_path / "run"
    monkeypatch.setattr(train, "_loss", interrupted)
    capsys.readouterr()
    assert _main("--mode", "two-stage", "--out", str(out)) == cli.EXIT_INTERRUPTED == 130
    err = capsys.readouterr().err
    assert err.startswith("interrupted at step 3") and len(err.splitlines()) == 1, err
    assert "the checkpoint of step 3 is kept: rerun the same command with --resume" in err
    monkeypatch.setattr(train, "_loss", real_loss)
    shutil.copytree(out, tmp_path / "longer")
    with caplog.at_level(logging.INFO, logger="megatron_lighthouse.demo.train"):
        assert _main("--mode", "two-stage", "--out", str(out), "--resume", "--log-every", "5") == 0
    assert any("resumed from" in m and "at step 3" in m for m in caplog.messages)
    assert [m.split("[")[0] for m in caplog.messages if "tokens/s" in m] == ["step    4/6 ", "step    5/6 "]
    resumed = json.loads((out / "metrics.json").read_text())
    uninterrupted = runs["two-stage"][1]
    assert [t["step"] for t in resumed["train"]] == list(range(6))
    assert [t["loss"] for t in resumed["train"]] == pytest.approx([t["loss"] for t in uninterrupted["train"]],
                                                                  rel=1e-5)
    assert resumed["final_val_loss"] == pytest.approx(uninterrupted["final_val_loss"], rel=1e-5)

    # Resumed with --steps 9 before the switch: still dense from step 5 (9 steps of a new run would switch at 7).
    assert _main("--out", str(tmp_path / "longer"), "--resume", "--steps", "9") == 0
    longer = json.loads((tmp_path / "longer" / "metrics.json").read_text())
    assert [t["stage"] for t in longer["train"]] == ["lighthouse"] * 5 + ["dense"] * 4
    assert longer["switch_step"] == 5

    # Resuming with settings that would change the model, data or schedule is refused, naming them.
    assert _main("--mode", "two-stage", "--out", str(out), "--resume", "--hidden", "64", "--heads", "2") == 2
    err = capsys.readouterr().err
    assert "--resume:" in err and "--hidden 32 -> 64" in err and "use another --out" in err


def test_resume_after_the_switch_never_goes_back_to_lighthouse(runs, tmp_path):
    """Switched at step 5 of 6, then resumed to 9 steps: steps 6-8 train dense, from the checkpoint's switch step,
    and so does a checkpoint older than that record (its switch step comes from its own saved --steps)."""
    for name in ("stored", "old"):
        out = _copy_run(runs, "two-stage", tmp_path / name)
        if name == "old":
            ckpt = torch.load(out / "checkpoint.pt", weights_only=False)
            del ckpt["state"]["switch_step"]
            torch.save(ckpt, out / "checkpoint.pt")
        assert _main("--out", str(out), "--resume", "--steps", "9") == 0
        metrics = json.loads((out / "metrics.json").read_text())
        assert [t["stage"] for t in metrics["train"]] == ["lighthouse"] * 5 + ["dense"] * 4, name
        assert metrics["switch_step"] == 5
        assert [t["loss"] for t in metrics["train"][:6]] == [t["loss"] for t in runs["two-stage"][1]["train"]]


def test_resume_from_a_checkpoint_older_than_a_setting(runs, tmp_path, capsys):
    """A checkpoint written before ``lr_decay_style`` existed ran with ``cosine``: it resumes with that, and resuming
    it with another style is refused as a change. (``rope`` is not compared on CPU: the model has no RoPE there.)"""
    out = _copy_run(runs, "two-stage", tmp_path / "run")
    ckpt = torch.load(out / "checkpoint.pt", weights_only=False)
    del ckpt["config"]["lr_decay_style"], ckpt["config"]["rope"]
    torch.save(ckpt, out / "checkpoint.pt")
    assert _main("--out", str(out), "--resume", "--steps", "7", "--lr-decay-style", "constant") == 2
    assert "--lr-decay-style cosine -> constant" in capsys.readouterr().err
    assert _main("--out", str(out), "--resume", "--steps", "7") == 0


def test_resume_on_another_device_is_refused(runs, tmp_path, capsys):
    """The model differs by device (learned positions and fp32 on CPU, RoPE and bf16 on CUDA)."""
    out = _copy_run(runs, "two-stage", tmp_path / "run")
    ckpt = torch.load(out / train.CHECKPOINT, weights_only=False)
    ckpt["config"]["device"] = "cuda"
    torch.save(ckpt, out / train.CHECKPOINT)
    assert _main("--steps", "9", "--out", str(out), "--resume") == 2
    assert "--device cuda -> cpu" in capsys.readouterr().err


def test_default_warmup_follows_steps(caplog):
    """Without --warmup: min(20, steps // 10) steps, so a short run needs no --warmup; the default run (200 steps)
    warms up for 20, as before; a given --warmup is taken as it is. The settings lines show the warm-up used."""
    assert [train.DemoConfig(steps=s).warmup_steps for s in (200, 1000, 50, 5)] == [20, 20, 5, 0]
    assert train.DemoConfig(steps=5, warmup=3).warmup_steps == 3
    assert "(20 warm-up steps, then" in "\n".join(train.describe(train.DemoConfig(), 160, 1))
    assert "(default: min(20, steps/10)" in cli.HELP["warmup"]  # shown by --help
    with caplog.at_level(logging.INFO, logger="megatron_lighthouse.demo.train"):
        assert _main_default_warmup("--steps", "5", "--no-save") == 0
    assert any("(0 warm-up steps, then" in m for m in caplog.messages), caplog.messages


def test_resume_keeps_the_warmup_the_run_started_with(runs, tmp_path, caplog, capsys):
    """A run of --warmup 2 resumed to 10 steps without --warmup keeps 2 (a new run of 10 steps would take 1)."""
    out = _copy_run(runs, "two-stage", tmp_path / "run")
    with caplog.at_level(logging.INFO, logger="megatron_lighthouse.demo.train"):
        assert _main_default_warmup("--out", str(out), "--resume", "--steps", "10") == 0
    assert any("(2 warm-up steps, then" in m for m in caplog.messages), caplog.messages
    assert json.loads((out / "metrics.json").read_text())["config"]["warmup"] == 2
    assert _main_default_warmup("--out", str(out), "--resume", "--steps", "12", "--warmup", "1") == 2
    assert "--warmup 2 -> 1" in capsys.readouterr().err


def _untouched(path: pathlib.Path):
    """``path``'s bytes and modification time, to compare after a refused run."""
    return path.read_bytes(), path.stat().st_mtime_ns


def _one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    return lines[0]


@pytest.fixture
def no_work(monkeypatch):
    """Refusals come before any work: reading the corpus or building the model fails the test."""
    def forbidden(*args, **kwargs):
        raise AssertionError("the demo started work before refusing its settings")

    monkeypatch.setattr(train, "load_corpus", forbidden)
    monkeypatch.setattr(train, "build_model", forbidden)


def test_out_holding_a_run_is_refused_without_resume_or_overwrite(runs, tmp_path, capsys, monkeypatch):
    """--out over a finished run: refused, its checkpoint untouched; with --overwrite a new run replaces it, and
    every file it writes goes through the atomic writer."""
    out = _copy_run(runs, "lighthouse", tmp_path / "run")
    before = _untouched(out / "checkpoint.pt")
    with monkeypatch.context() as patched:
        patched.setattr(train, "load_corpus", lambda *a: pytest.fail("work before the refusal"))
        assert _main("--mode", "lighthouse", "--out", str(out)) == 2
    line = _one_error_line(capsys)
    assert f"--out {out}" in line and "--resume" in line and "--overwrite" in line
    assert _untouched(out / "checkpoint.pt") == before

    written = []
    real_write = atomic.write_atomic
    monkeypatch.setattr(atomic, "write_atomic", lambda path, write: written.append(path.name) or real_write(path, write))
    assert _main("--mode", "lighthouse", "--out", str(out), "--overwrite", "--steps", "3") == 0
    assert set(written) == {"checkpoint.pt", "model_dense.pt", "metrics.json", "loss.png"}
    assert torch.load(out / "checkpoint.pt", weights_only=True)["state"]["step"] == 3


def test_resume_at_or_below_the_saved_step_is_refused(runs, tmp_path, capsys, no_work):
    out = _copy_run(runs, "two-stage", tmp_path / "run")
    before = _untouched(out / "checkpoint.pt")
    for steps in ("6", "4"):
        assert _main("--out", str(out), "--resume", "--steps", steps) == 2
        line = _one_error_line(capsys)
        assert f"--steps {steps}:" in line and "at step 6 already" in line and "pass --steps above 6" in line
    assert _untouched(out / "checkpoint.pt") == before


@pytest.mark.parametrize("where,key,value,problem", [
    ("state", "step", -3, "its step -3 is not a step of its run of 6 steps"),
    ("state", "step", 1.5, "its run state has no step"),
    ("state", "step", True, "its step True is not a step"),
    ("state", "step", 7, "its step 7 is not a step of its run of 6 steps"),
    ("state", "switch_step", -1, "its switch step -1 is not a step"),
    ("state", "switch_step", "x", "its switch step 'x' is not a step"),
    ("state", "train", 3, "its run state's train, evals, seconds or tokens are not what the demo writes"),
    ("state", "seconds", {"lighthouse": 1.0}, "its run state's train, evals, seconds or tokens"),
    ("config", "steps", "x", "its config has mode 'two-stage', steps 'x'"),
    ("config", "mode", "bogus", "its config has mode 'bogus'"),
    ("config", "warmup", -5, "warmup -5: not the values of a run"),
])
def test_checkpoint_with_values_no_run_writes_is_refused_at_load(runs, tmp_path, capsys, no_work, where, key, value,
                                                                 problem):
    """A negative step or switch step failed inside the training loop; other values deep inside the resume."""
    out = _copy_run(runs, "two-stage", tmp_path / "run")
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    ckpt[where][key] = value
    torch.save(ckpt, out / "checkpoint.pt")
    assert _main("--out", str(out), "--resume", "--steps", "9") == 2
    line = _one_error_line(capsys)
    assert "is not a demo checkpoint (its " in line and problem in line and "--overwrite" in line, line


def test_ctrl_c_before_the_first_step_is_one_line(tmp_path, monkeypatch, capsys):
    """Ctrl-C while the corpus is read or the model is built: one line, exit status 130, no traceback."""
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    for stage in ("load_corpus", "build_model", "_init_runtime"):
        with monkeypatch.context() as patched:
            patched.setattr(train, stage, interrupt)
            assert _main("--out", str(tmp_path / stage)) == 130
        assert capsys.readouterr().err == "interrupted before the first step: nothing was trained\n"
    with monkeypatch.context() as patched:
        patched.setattr(cli, "write_metrics", interrupt)
        assert _main("--out", str(tmp_path / "late")) == 130
    assert capsys.readouterr().err.startswith("interrupted after the last step, while writing the summary")


def test_ctrl_c_while_python_imports_torch_is_one_line(tmp_path):
    """Ctrl-C in the first moments of ``python -m megatron_lighthouse.demo``, while torch is imported (a traceback,
    or an abort inside torch's C++ start-up, before): held until the import is done, then one line and 130."""
    import signal
    import time

    root = pathlib.Path(megatron_lighthouse.__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), str(root / "kernels")]))
    check = subprocess.run([sys.executable, "-c", "import sys, megatron_lighthouse, megatron_lighthouse.demo; "
                                                  "sys.exit('torch' in sys.modules)"], env=env, timeout=60)
    assert check.returncode == 0, "importing the package imported torch"
    proc = subprocess.Popen([sys.executable, "-m", "megatron_lighthouse.demo", "--no-save"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.3)  # the interpreter is up, torch is being imported
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and err == "interrupted before the first step: nothing was trained\n", (err, out)


@pytest.mark.parametrize("kind", ["truncated", "empty", "dense model", "pickle", "text"])
def test_broken_or_foreign_checkpoint_is_one_clear_line(runs, tmp_path, capsys, no_work, kind):
    out = _copy_run(runs, "two-stage", tmp_path / "run")
    path = out / "checkpoint.pt"
    whole = path.read_bytes()
    content = {"truncated": whole[: len(whole) // 2], "empty": b"", "dense model": (out / "model_dense.pt").read_bytes(),
               "pickle": pickle.dumps({"config": 1}), "text": b"not a checkpoint\n"}[kind]
    path.write_bytes(content)
    assert _main("--out", str(out), "--resume", "--steps", "9") == 2
    line = _one_error_line(capsys)
    assert str(path) in line and "--overwrite" in line and "Traceback" not in line
    assert ("is empty" if kind == "empty" else "not") in line
    assert path.read_bytes() == content


def test_out_of_memory_names_the_flags_to_lower(tmp_path, monkeypatch):
    def out_of_memory(*args):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(train, "_loss", out_of_memory)
    with pytest.raises(SystemExit) as stop:
        _main("--out", str(tmp_path))
    message = str(stop.value)
    assert message.startswith("out of memory at step 0")
    assert "lower --batch-size, --seq-len, --layers or --hidden" in message and "no checkpoint yet" in message

    def cpu_allocator(*args):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:121] DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(train, "_loss", cpu_allocator)
    with pytest.raises(SystemExit, match="out of memory at step 0 .*lower --batch-size"):
        _main()


@pytest.mark.parametrize("args,message", [
    (["--seq-len", "200"], "--seq-len 200 does not fit the Lighthouse settings"),
    (["--seq-len", "200"], "use a sequence length >= 256"),
    (["--seq-len", "1001"], "nearest valid lengths: (1000, 1002)"),
    (["--dense-layers", "0,1"], "--dense-layers 0,1: keeps all 2 layers dense"),
    (["--dense-layers", "0,2"], "--dense-layers 0,2: layer 2 is not one of --layers 2"),
    (["--dense-layers", "0,x"], "--dense-layers 0,x: must be comma-separated integers"),
    (["--hidden", "33"], "--hidden 33: must be divisible by --heads 2"),
    (["--dense-fraction", "1.5"], "--dense-fraction 1.5: must be in (0, 1)"),
    (["--dense-fraction", "0.01"], "--dense-fraction 0.01: gives 0 dense steps of --steps 6"),
    (["--mode", "lighthouse", "--dense-fraction", "0.5"], "--dense-fraction 0.5: not used: only --mode two-stage"),
    (["--baseline", "--levels", "3"], "--levels 3: not used: --mode dense has no Lighthouse layers"),
    (["--baseline", "--mode", "lighthouse"], "--baseline is --mode dense: it cannot go with --mode lighthouse"),
    (["--rope", "tokens"], "--rope tokens: not used: only --device cuda uses RoPE"),
    (["--rope", "both"], "--rope both: must be one of entries, tokens"),
    (["--mode", "sparse"], "--mode sparse: must be one of two-stage, dense, lighthouse"),
    (["--lr-decay-style", "linear"], "--lr-decay-style linear: must be one of cosine, constant, wsd"),
    (["--lr-decay-fraction", "0.5"], "--lr-decay-fraction 0.5: not used: only --lr-decay-style wsd"),
    (["--lr-decay-style", "wsd", "--lr-decay-fraction", "0"], "--lr-decay-fraction 0.0: must be in (0, 1]"),
    (["--lr-decay-style", "wsd", "--steps", "4", "--lr-decay-fraction", "0.1"],
     "--lr-decay-fraction 0.1: gives 0 decay steps of --steps 4 after --warmup 2"),
    (["--lr-decay-style", "wsd", "--lr-decay-fraction", "0.9"],
     "--lr-decay-fraction 0.9: gives 5 decay steps of --steps 6 after --warmup 2; --lr-decay-style wsd needs 1 to 4"),
    (["--lr", "-1"], "--lr -1.0: must be a positive number"),
    (["--lr", "nan"], "--lr nan: must be a positive number"),
    (["--lr", "1e308"], "--lr 1e+308: must be a positive number, at most 1"),
    (["--lr", "fast"], "--lr fast: must be a number"),
    (["--warmup", "-1"], "--warmup -1: must be in [0, --steps 6)"),
    (["--warmup", "6"], "--warmup 6: must be in [0, --steps 6)"),
    (["--steps", "0"], "--steps 0: must be >= 1"),
    (["--steps", "2.5"], "--steps 2.5: must be an integer"),
    (["--batch-size", "0"], "--batch-size 0: must be >= 1"),
    (["--layers", "-2"], "--layers -2: must be >= 1"),
    (["--heads", "0"], "--heads 0: must be >= 1"),
    (["--ffn", "0"], "--ffn 0: must be >= 1"),
    (["--levels", "1"], "--levels 1: must be >= 2"),
    (["--pooling-factor", "3"], "--pooling-factor 3: must be a power of two"),
    (["--topk", "100"], "--topk 100: must be a positive multiple of 128"),
    (["--eval-every", "0"], "--eval-every 0: must be >= 1"),
    (["--eval-batches", "0"], "--eval-batches 0: must be >= 1"),
    (["--log-every", "0"], "--log-every 0: must be >= 1"),
    (["--seed", "-3"], "--seed -3: must be in [0, 4294967295]"),
    (["--corpus-bytes", "0"], "--corpus-bytes 0: must be >= 1"),
    (["--steps", str(2**64)], f"--steps {2**64}: must be at most 10000000 (the demo's range)"),
    (["--layers", str(2**40)], f"--layers {2**40}: must be at most 1024"),
    (["--batch-size", str(2**64)], f"--batch-size {2**64}: must be at most 16384"),
    (["--ffn", str(2**62)], f"--ffn {2**62}: must be at most 131072"),
    (["--eval-batches", str(2**62)], f"--eval-batches {2**62}: must be at most 16384"),
    (["--seq-len", str(2**64)], f"--seq-len {2**64}: must be at most 16777216"),
    (["--device", "foo"], "--device foo: must be one of cpu, cuda, cuda:N"),
    (["--device", "cuda:x"], "--device cuda:x: must be one of cpu, cuda, cuda:N"),
    (["--resume", "--overwrite"], "--resume continues the run in --out, --overwrite replaces it"),
    (["--resume", "--no-save"], "--resume needs --out"),
    (["--overwrite", "--no-save"], "--overwrite: not used: --no-save writes nothing"),
    (["--no-save", "--out", "x"], "--out x: --no-save keeps nothing"),
    (["--out", ""], "--out: empty; give a directory, or --no-save to keep nothing"),
    (["--corpus", ""], "--corpus: empty; give a text file or a directory"),
    (["--bogus"], "unrecognized arguments: --bogus (--help lists the flags)"),
    (["--steps"], "argument --steps: expected one argument"),
])
def test_bad_settings_are_one_line_before_any_work(args, message, capsys, no_work):
    assert _main(*args) == 2
    line = _one_error_line(capsys)
    assert message in line, line


@pytest.mark.parametrize("out,reason", [("/proc/nope", "No such file or directory"), ("afile/sub", "Not a directory"),
                                        ("/proc", "")])
def test_out_that_cannot_be_created_or_written_is_one_line_before_any_work(out, reason, tmp_path, capsys, no_work):
    (tmp_path / "afile").write_text("a file")
    assert _main("--out", out) == 2
    line = _one_error_line(capsys)
    assert line.startswith(f"error: --out {out}: cannot create it or write in it (") and reason in line, line
    assert [p.name for p in tmp_path.iterdir()] == ["afile"]


def test_corpus_errors_name_the_flag(tmp_path, capsys):
    assert _main("--corpus", "/nonexistent/corpus") == 2
    assert _one_error_line(capsys) == "error: --corpus /nonexistent/corpus: no such file or directory"
    (tmp_path / "small.txt").write_text("x" * 300)
    assert _main("--corpus", str(tmp_path / "small.txt")) == 2
    assert (f"--corpus {tmp_path / 'small.txt'}: holds 270 train / 30 validation bytes in all, too few for --seq-len "
            "256") in _one_error_line(capsys)
    assert _main("--corpus", str(tmp_path / "small.txt"), "--corpus-bytes", "200") == 2
    assert "--corpus-bytes 200: 270 train / 30 validation bytes read, too few for --seq-len 256" in _one_error_line(
        capsys)
    (tmp_path / "empty.txt").write_bytes(b"")
    assert _main("--corpus", str(tmp_path / "empty.txt")) == 2
    assert _one_error_line(capsys) == f"error: --corpus {tmp_path / 'empty.txt'}: empty (0 bytes); give a text file or " \
                                      "a directory of them"
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.py").write_bytes(b"")
    assert _main("--corpus", str(tmp_path / "texts")) == 2
    assert "empty (0 bytes in its .py/.txt/.rst files)" in _one_error_line(capsys)


@pytest.mark.parametrize("visible,device,message", [
    (0, "cuda", "--device cuda: no CUDA device is visible"),
    (0, "cuda:0", "--device cuda:0: no CUDA device is visible"),
    (2, "cuda:2", "--device cuda:2: 2 CUDA device(s) visible, cuda:0 to cuda:1"),
    (2, "cuda:1", None),
])
def test_device_must_be_a_visible_gpu(monkeypatch, visible, device, message):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    cfg = train.DemoConfig(device=device)
    if message is None:
        cfg.validate()
    else:
        with pytest.raises(train.SettingsError, match=re.escape(message)):
            cfg.validate()


def test_every_flag_has_help_with_its_choices_and_default(monkeypatch, capsys):
    parser = cli.build_parser()
    flags = [a for a in parser._actions if a.option_strings]
    assert {a.dest for a in flags} >= {f.name for f in train.dataclasses.fields(train.DemoConfig)}
    for action in flags:
        assert action.help and action.help.strip(), action.option_strings
        if action.nargs is None:  # takes a value: says its default
            assert "(default: " in action.help, action.option_strings
    monkeypatch.setenv("COLUMNS", "1000")  # one flag a line: no choice is wrapped
    with pytest.raises(SystemExit) as done:
        cli.main(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    choices = {"mode": train.MODES, "rope": train.ROPE_PLACEMENTS, "lr_decay_style": train.LR_DECAY_STYLES,
               "device": train.DEVICE_CHOICES}
    flat = " ".join(text.split())
    for action in flags:
        assert " ".join(action.help.replace("%%", "%").split()) in flat, action.option_strings
        values = choices.get(action.dest, ())
        assert all(value in action.help for value in values) and ("one of: " in action.help) == bool(values)
    assert "(default: two-stage)" in text and "(default: 0,-1)" in text and "(default: 200)" in text


def test_default_run_keeps_everything_in_demo_out_and_resumes_from_it(tmp_path, caplog, monkeypatch):
    """The README's command (no flags) writes metrics, plot and checkpoints to ./demo_out; ``--resume`` alone
    continues from there, here to more steps; ``--no-save`` keeps nothing."""
    assert _main("--steps", "3") == 0
    out = tmp_path / "demo_out"
    assert {p.name for p in out.iterdir()} == {"metrics.json", "loss.png", "checkpoint.pt", "model_dense.pt"}
    with caplog.at_level(logging.INFO, logger="megatron_lighthouse.demo.train"):
        assert _main("--steps", "6", "--resume") == 0
    assert any("resumed from" in m and "at step 3" in m for m in caplog.messages)
    assert [t["step"] for t in json.loads((out / "metrics.json").read_text())["train"]] == list(range(6))
    (tmp_path / "bare").mkdir()
    monkeypatch.chdir(tmp_path / "bare")
    assert _main("--steps", "2", "--dense-fraction", "0.5", "--warmup", "1", "--no-save") == 0
    assert not any((tmp_path / "bare").iterdir())


@pytest.mark.parametrize("writer", ["torch", "metrics", "plot"])
def test_a_failed_write_leaves_the_previous_file_whole(tmp_path, monkeypatch, writer):
    """Each writer of the demo's files (``save_torch``: the checkpoint and the dense model; metrics; plot) fails after
    writing part of the new file: the old file is whole and no temporary file is left."""
    import matplotlib.figure

    path = tmp_path / {"torch": "checkpoint.pt", "metrics": "metrics.json", "plot": "loss.png"}[writer]
    path.write_bytes(b"the previous file")

    def partial_then_fail(obj, f, *args, **kwargs):
        f.write(b"part of the new file")
        raise OSError("No space left on device")

    def disk_full(fd):
        raise OSError("No space left on device")

    if writer == "torch":
        monkeypatch.setattr(torch, "save", partial_then_fail)
    elif writer == "plot":
        monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda self, f, **kw: partial_then_fail(self, f))
    else:  # json.dumps cannot fail half-way through the file: the disk fills up as it is flushed instead
        monkeypatch.setattr(os, "fsync", disk_full)
    metrics = dict(train=[dict(step=0, loss=1.0)], evals=[dict(step=1, val_loss=1.0)], switch_step=None,
                   config=dict(mode="lighthouse"))
    write = {"torch": lambda: train.save_torch(path, {"model": {}}),
             "metrics": lambda: cli.write_metrics(metrics, path), "plot": lambda: cli.plot(metrics, path)}[writer]
    with pytest.raises(OSError, match="No space left"):
        write()
    assert path.read_bytes() == b"the previous file"
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_written_files_get_the_usual_permissions(tmp_path):
    """Not a temporary file's private 0600: what ``open`` would give, 0666 less the umask."""
    umask = os.umask(0o022)
    os.umask(umask)
    path = atomic.write_atomic(tmp_path / "metrics.json", lambda f: f.write(b"{}"))
    assert path.read_bytes() == b"{}" and path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_the_cli_shows_no_library_warnings(tmp_path):
    """Run as a user runs it (``python -m megatron_lighthouse.demo``, a fresh process): no TransformerEngine / Apex
    notes or Megatron deprecation warnings, no other warning either; the settings lines are there."""
    root = pathlib.Path(megatron_lighthouse.__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(root), str(root / "kernels"), *filter(None, [os.environ.get("PYTHONPATH")])]))
    proc = subprocess.run([sys.executable, "-m", "megatron_lighthouse.demo", *TINY, *TINY_LIGHTHOUSE, "--steps", "2",
                           "--dense-fraction", "0.5", "--warmup", "1", "--no-save"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    both = proc.stdout + proc.stderr
    for noise in ("Transformer Engine", "Apex", "Falling back", "deprecated", "Warning", "warnings.warn",
                  "No CUDA runtime"):
        assert noise not in both, both
    assert proc.stderr == "", proc.stderr
    assert "Lighthouse: levels 2, pooling factor 2, topk 128" in proc.stdout and "final validation loss" in proc.stdout


def test_lr_decay_styles():
    """cosine (the default) decays over the run; constant (the published recipe) holds --lr after the warm-up; wsd
    holds it, then decays linearly to 10% over the last --lr-decay-fraction of the steps."""
    def lrs(**kw):
        cfg = train.DemoConfig(steps=10, warmup=2, lr=1.0, **kw)
        cfg.validate()
        return [train._lr_at(cfg, step) for step in range(10)]

    cosine = lrs()
    assert cosine[:2] == [0.5, 1.0] and all(a > b for a, b in zip(cosine[2:], cosine[3:]))
    assert cosine[9] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 7 / 8)))
    assert lrs(lr_decay_style="constant") == [0.5] + [1.0] * 9
    wsd = lrs(lr_decay_style="wsd", lr_decay_fraction=0.4)
    assert wsd[:6] == [0.5] + [1.0] * 5
    assert wsd[6:] == pytest.approx([1 - 0.9 * i / 4 for i in (1, 2, 3, 4)])  # 10% at the last step


def test_progress_eta_from_the_mean_step_time():
    state = dict(step=5, train=[None] * 5, seconds={"lighthouse": 8.0, "dense": 2.0})
    assert train._progress(state, 200, width=10) == "step    5/200 [----------]   2% eta 0:06:30"
