"""The main job runs end to end at a tiny size, in this process: both stages, the dense baseline, Lighthouse
throughout, its outputs, an interrupted run resumed from its checkpoint, and clear errors."""

from __future__ import annotations

import json
import logging
import math
import re

import pytest
import torch

from megatron_lighthouse.demo import __main__ as cli
from megatron_lighthouse.demo import train

TINY = ["--layers", "2", "--hidden", "32", "--heads", "2", "--ffn", "64", "--seq-len", "256", "--levels", "2",
        "--pooling-factor", "2", "--topk", "128", "--dense-layers", "0", "--batch-size", "2", "--eval-every", "3",
        "--eval-batches", "1", "--log-every", "3", "--corpus-bytes", "300000", "--warmup", "2", "--steps", "6"]
STAGES = {"two-stage": ["lighthouse", "dense"], "dense": ["dense"], "lighthouse": ["lighthouse"]}


def _main(*args: str) -> int:
    return cli.main([*TINY, *args])


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


def test_same_start_then_lighthouse_changes_the_training(runs):
    """Same seed, data and initialization: the first dense-stage loss equals across modes only for dense runs."""
    losses = {mode: [t["loss"] for t in metrics["train"]] for mode, (_, metrics) in runs.items()}
    assert losses["two-stage"][:5] == pytest.approx(losses["lighthouse"][:5], rel=1e-5)
    assert losses["two-stage"][1] != pytest.approx(losses["dense"][1], rel=1e-6)


def test_summary_table_is_printed(tmp_path, capsys):
    assert _main("--steps", "3", "--out", str(tmp_path)) == 0
    out = capsys.readouterr().out
    assert "final val loss (dense)" in out and "tokens/s" in out
    assert out.count("lighthouse") >= 1 and "final validation loss:" in out


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
    from the checkpoint."""
    real_loss = train._loss
    calls = []

    def interrupted(*args):
        calls.append(1)
        if len(calls) == 4:  # 3 training steps, then step 3
            raise KeyboardInterrupt
        return real_loss(*args)

    monkeypatch.setattr(train, "_loss", interrupted)
    with pytest.raises(SystemExit) as stop:
        _main("--mode", "two-stage", "--out", str(tmp_path))
    assert "interrupted at step 3" in str(stop.value)
    assert "the checkpoint of step 3 is kept: rerun the same command with --resume" in str(stop.value)
    monkeypatch.setattr(train, "_loss", real_loss)
    with caplog.at_level(logging.INFO, logger="megatron_lighthouse.demo.train"):
        assert _main("--mode", "two-stage", "--out", str(tmp_path), "--resume") == 0
    assert any("resumed from" in m and "at step 3" in m for m in caplog.messages)
    resumed = json.loads((tmp_path / "metrics.json").read_text())
    uninterrupted = runs["two-stage"][1]
    assert [t["step"] for t in resumed["train"]] == list(range(6))
    assert [t["loss"] for t in resumed["train"]] == pytest.approx([t["loss"] for t in uninterrupted["train"]],
                                                                  rel=1e-5)
    assert resumed["final_val_loss"] == pytest.approx(uninterrupted["final_val_loss"], rel=1e-5)

    # Resuming with settings that would change the model, data or schedule is refused, naming them.
    assert _main("--mode", "two-stage", "--out", str(tmp_path), "--resume", "--hidden", "64", "--heads", "2") == 2
    err = capsys.readouterr().err
    assert "--resume:" in err and "--hidden 32 -> 64" in err and "use another --out" in err


def test_resume_from_a_checkpoint_older_than_a_setting(tmp_path, capsys):
    """A checkpoint written before ``rope`` existed ran with ``tokens``: it resumes with that, and resuming it with
    ``--rope entries`` (the default now) is refused as a change."""
    assert _main("--steps", "3", "--out", str(tmp_path)) == 0
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    del ckpt["config"]["rope"]
    torch.save(ckpt, tmp_path / "checkpoint.pt")
    assert _main("--out", str(tmp_path), "--resume") == 2
    assert "--rope tokens -> entries" in capsys.readouterr().err
    assert _main("--out", str(tmp_path), "--resume", "--rope", "tokens") == 0


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
    (["--corpus", "/nonexistent/corpus"], "--corpus /nonexistent/corpus: no such file or directory"),
    (["--dense-layers", "0,1"], "keeps all 2 layers dense"),
    (["--hidden", "33"], "--hidden 33: must be divisible by --heads 2"),
    (["--dense-fraction", "1.5"], "--dense-fraction 1.5: must be in [0, 1)"),
    (["--rope", "both"], "--rope 'both': must be one of ('entries', 'tokens')"),
    (["--lr-decay-style", "linear"], "--lr-decay-style 'linear': must be one of ('cosine', 'constant', 'wsd')"),
    (["--lr-decay-fraction", "0"], "--lr-decay-fraction 0.0: must be in (0, 1]"),
    (["--lr-decay-style", "wsd", "--steps", "4", "--lr-decay-fraction", "0.1"],
     "--lr-decay-fraction 0.1: must be in (0, 1], and with --lr-decay-style wsd give at least one decay step of "
     "--steps 4"),
])
def test_bad_settings_fail_clearly(args, message, capsys):
    assert _main(*args) == 2
    assert message in capsys.readouterr().err


def test_resume_needs_out(capsys):
    with pytest.raises(SystemExit):
        _main("--resume", "--no-save")
    assert "--resume needs --out" in capsys.readouterr().err


def test_default_run_keeps_everything_in_demo_out_and_resumes_from_it(tmp_path, caplog):
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
    assert _main("--steps", "1", "--no-save", "--out", str(tmp_path / "bare")) == 0
    assert not any((tmp_path / "bare").iterdir())


def test_resume_on_another_device_is_refused(tmp_path, capsys):
    """The model differs by device (learned positions and fp32 on CPU, RoPE and bf16 on CUDA)."""
    assert _main("--steps", "3", "--out", str(tmp_path)) == 0
    ckpt = torch.load(tmp_path / train.CHECKPOINT, weights_only=False)
    ckpt["config"]["device"] = "cuda"
    torch.save(ckpt, tmp_path / train.CHECKPOINT)
    assert _main("--steps", "6", "--out", str(tmp_path), "--resume") == 2
    assert "--device cuda -> cpu" in capsys.readouterr().err


def test_progress_lines_show_a_bar_tokens_per_second_and_loss(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="megatron_lighthouse.demo.train"):
        assert _main("--steps", "3", "--out", str(tmp_path)) == 0
    lines = [m for m in caplog.messages if m.startswith("step") and "tokens/s" in m]
    assert re.match(r"step    1/3 \[#{6}-{14}\]  33% eta \d:\d\d:\d\d  lighthouse  loss \d+\.\d{4} +\d+ tokens/s$",
                    lines[0]), lines[0]
    assert re.match(r"step    3/3 \[#{20}\] 100% eta 0:00:00  dense ", lines[-1]), lines[-1]


def test_lr_decay_styles():
    """cosine (the default) decays over the run; constant (the published recipe) holds --lr after the warm-up; wsd
    holds it, then decays linearly to 10% over the last --lr-decay-fraction of the steps."""
    def lrs(**kw):
        cfg = train.DemoConfig(steps=10, warmup=2, lr=2.0, **kw)
        cfg.validate()
        return [train._lr_at(cfg, step) for step in range(10)]

    cosine = lrs()
    assert cosine[:2] == [1.0, 2.0] and all(a > b for a, b in zip(cosine[2:], cosine[3:]))
    assert cosine[9] == pytest.approx(2.0 * (0.1 + 0.45 * (1 + math.cos(math.pi * 7 / 8))))
    assert lrs(lr_decay_style="constant") == [1.0] + [2.0] * 9
    wsd = lrs(lr_decay_style="wsd", lr_decay_fraction=0.4)
    assert wsd[:6] == [1.0] + [2.0] * 5
    assert wsd[6:] == pytest.approx([2.0 * (1 - 0.9 * i / 4) for i in (1, 2, 3, 4)])  # 10% at the last step


def test_progress_eta_from_the_mean_step_time():
    state = dict(step=5, train=[None] * 5, seconds={"lighthouse": 8.0, "dense": 2.0})
    assert train._progress(state, 200, width=10) == "step    5/200 [----------]   2% eta 0:06:30"
