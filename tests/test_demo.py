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
    for e in metrics["evals"]:  # 8 equal slices of the 256 positions: their mean is the loss
        assert len(e["val_loss_by_position"]) == train.POSITION_BUCKETS == 8
        assert sum(e["val_loss_by_position"]) / 8 == pytest.approx(e["val_loss"], rel=1e-5)
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


def test_dense_every_runs_dense_steps_inside_the_lighthouse_stage(runs, tmp_path):
    """``--dense-every 2``: steps 1 and 3 of the Lighthouse stage (steps 0-4) run densely, the stage itself and
    its bookkeeping stay; step 0 is the plain two-stage run's, step 1 is not (it ran dense)."""
    assert _main("--mode", "two-stage", "--dense-every", "2", "--out", str(tmp_path)) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert [t["attention"] for t in metrics["train"]] == ["lighthouse", "dense"] * 3
    assert [t["stage"] for t in metrics["train"]] == ["lighthouse"] * 5 + ["dense"]
    assert [s["steps"] for s in metrics["stages"]] == [5, 1]
    plain = [t["loss"] for t in runs["two-stage"][1]["train"]]
    assert [t["attention"] for t in runs["two-stage"][1]["train"]] == ["lighthouse"] * 5 + ["dense"]
    assert metrics["train"][0]["loss"] == pytest.approx(plain[0], rel=1e-6)
    assert metrics["train"][1]["loss"] != pytest.approx(plain[1], rel=1e-6)


def test_layer_interval_switches_the_lighthouse_layers_one_at_a_time(tmp_path, caplog):
    """Three layers, two of them Lighthouse, the switch at step 5: ``--layer-interval 2`` moves the lower one to
    dense at step 3, the upper at 5. Steps 0-2 train as without it, step 3 does not; the stages stay the same."""
    three = ["--layers", "3", "--steps", "6"]
    assert _main(*three, "--mode", "two-stage", "--out", str(tmp_path / "plain")) == 0
    with caplog.at_level(logging.INFO, logger="megatron_lighthouse.demo.train"):
        assert _main(*three, "--mode", "two-stage", "--layer-interval", "2", "--out", str(tmp_path / "stagger")) == 0
    assert "step 3: Lighthouse layer 1 of 2 switched to dense (--layer-interval 2)" in caplog.messages
    assert "step 5: switching Lighthouse off, dense attention from here on" in caplog.messages
    plain, stagger = (json.loads((tmp_path / name / "metrics.json").read_text())["train"]
                      for name in ("plain", "stagger"))
    assert [t["stage"] for t in stagger] == [t["stage"] for t in plain] == ["lighthouse"] * 5 + ["dense"]
    assert [t["attention"] for t in stagger] == ["lighthouse"] * 5 + ["dense"]  # one layer still runs it
    assert [t["loss"] for t in stagger[:3]] == pytest.approx([t["loss"] for t in plain[:3]], rel=1e-6)
    assert stagger[3]["loss"] != pytest.approx(plain[3]["loss"], rel=1e-6)


def test_dense_prefix_steps_train_densely_before_the_lighthouse_stage(runs, tmp_path, caplog):
    """``--dense-prefix-steps 2``: steps 0-1 run dense and count as dense (they train as the dense run's), steps
    2-4 run Lighthouse (step 2 trains unlike the dense run's), the switch stays at step 5."""
    with caplog.at_level(logging.INFO, logger="megatron_lighthouse.demo.train"):
        assert _main("--mode", "two-stage", "--dense-prefix-steps", "2", "--out", str(tmp_path)) == 0
    assert "step 2: dense prefix done (--dense-prefix-steps), Lighthouse on" in caplog.messages
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert [t["attention"] for t in metrics["train"]] == ["dense"] * 2 + ["lighthouse"] * 3 + ["dense"]
    assert [t["stage"] for t in metrics["train"]] == ["dense"] * 2 + ["lighthouse"] * 3 + ["dense"]
    assert {s["stage"]: s["steps"] for s in metrics["stages"]} == {"lighthouse": 3, "dense": 3}
    dense = [t["loss"] for t in runs["dense"][1]["train"]]
    assert [t["loss"] for t in metrics["train"][:2]] == pytest.approx(dense[:2], rel=1e-5)
    assert metrics["train"][2]["loss"] != pytest.approx(dense[2], rel=1e-6)


def test_blend_steps_blend_each_lighthouse_layer_into_dense_before_its_switch(tmp_path, caplog):
    """Three layers, two of them Lighthouse, 1 step apart, the last switch at step 5: ``--blend-steps 2`` blends
    the lower one over steps 2-3 and the upper over 3-4. Steps 0-1 train as without it, step 2 does not."""
    three = ["--layers", "3", "--steps", "6", "--mode", "two-stage", "--layer-interval", "1"]
    assert _main(*three, "--out", str(tmp_path / "plain")) == 0
    with caplog.at_level(logging.INFO, logger="megatron_lighthouse.demo.train"):
        assert _main(*three, "--blend-steps", "2", "--out", str(tmp_path / "blend")) == 0
    assert "step 2: Lighthouse layer 1 of 2 blending into dense over 2 steps (--blend-steps)" in caplog.messages
    assert "step 3: Lighthouse layer 2 of 2 blending into dense over 2 steps (--blend-steps)" in caplog.messages
    plain, blend = (json.loads((tmp_path / name / "metrics.json").read_text())["train"] for name in ("plain", "blend"))
    assert [t["stage"] for t in blend] == [t["stage"] for t in plain] == ["lighthouse"] * 5 + ["dense"]
    assert [t["loss"] for t in blend[:2]] == pytest.approx([t["loss"] for t in plain[:2]], rel=1e-6)
    assert blend[2]["loss"] != pytest.approx(plain[2]["loss"], rel=1e-6)


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
    """A checkpoint written before ``dense_every`` and ``rope`` existed ran with 0 and ``tokens``: it resumes with
    those, and resuming it with ``--rope entries`` (the default now) is refused as a change."""
    assert _main("--steps", "3", "--out", str(tmp_path)) == 0
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    del ckpt["config"]["dense_every"], ckpt["config"]["rope"]
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


#: What the demo adds to a schedule error of a two-stage run with the test defaults (6 steps, --dense-fraction 0.2).
SWITCH_STEP = "; the switch step is --steps - round(--steps × --dense-fraction) = 5"


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
    (["--baseline", "--dense-rewarm", "5"], "--dense-rewarm 5: must be >= 0, and only with --mode two-stage"),
    (["--dense-every", "1"], "--dense-every 1: must be 0 (off) or >= 2, and not with --mode dense"),
    (["--baseline", "--dense-every", "4"], "--dense-every 4: must be 0 (off) or >= 2, and not with --mode dense"),
    (["--mode", "lighthouse", "--layer-interval", "2"],
     "--layer-interval 2: only with --mode two-stage"),
    (["--layer-interval", "-1"], "--layer-interval -1: must be an int >= 0 (0: every layer switches at the switch "
                                 "step)" + SWITCH_STEP),
    (["--layers", "3", "--layer-interval", "6"], "--layer-interval 6 with 2 Lighthouse layers and the switch step 5: "
                                                  "the first layer would switch at iteration -1; needs the switch "
                                                  "step >= (layers - 1) * --layer-interval = 6" + SWITCH_STEP),
    (["--mode", "dense", "--blend-steps", "2"], "--blend-steps 2: only with --mode two-stage"),
    (["--blend-steps", "-2"], "--blend-steps -2: must be an int >= 0 (0: no blend)" + SWITCH_STEP),
    (["--layers", "3", "--layer-interval", "2", "--blend-steps", "4"],
     "--layer-interval 2, --blend-steps 4 with 2 Lighthouse layers and the switch step 5: the first layer would "
     "switch at iteration 3 and start its blend at -1; needs the switch step >= (layers - 1) * --layer-interval + "
     "--blend-steps = 6"),
    (["--baseline", "--dense-prefix-steps", "2"], "--dense-prefix-steps 2: not with --mode dense"),
    (["--dense-prefix-steps", "5"], "--dense-prefix-steps 5: must be below the switch step 5, or no iteration would "
                                    "run Lighthouse" + SWITCH_STEP),
    (["--mode", "lighthouse", "--dense-prefix-steps", "-1"],
     "--dense-prefix-steps -1: must be an int >= 0 (0: Lighthouse from the first iteration)\n"),
    (["--layers", "3", "--layer-interval", "2", "--dense-prefix-steps", "4"],
     "--layer-interval 2, --dense-prefix-steps 4 with 2 Lighthouse layers and the switch step 5: the first layer "
     "would switch at iteration 3; needs the switch step >= --dense-prefix-steps + (layers - 1) * --layer-interval "
     "= 6"),
    (["--layers", "3", "--layer-interval", "1", "--blend-steps", "2", "--dense-prefix-steps", "3"],
     "--layer-interval 1, --blend-steps 2, --dense-prefix-steps 3 with 2 Lighthouse layers and the switch step 5: "
     "the first layer would switch at iteration 4 and start its blend at 2; needs the switch step >= "
     "--dense-prefix-steps + (layers - 1) * --layer-interval + --blend-steps = 6" + SWITCH_STEP),
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


def test_dense_stage_schedule_of_its_own():
    """--dense-rewarm: the Lighthouse stage decays over its own steps, the dense stage warms up again to --lr."""
    cfg = train.DemoConfig(steps=10, dense_fraction=0.4, warmup=2, lr=1.0, dense_rewarm=2)
    lrs = [train._lr_at(cfg, step) for step in range(10)]
    assert cfg.switch_step == 6
    assert lrs[:2] == [0.5, 1.0] and lrs[5] == pytest.approx(0.1 + 0.45 * (1 - 2**-0.5))
    assert lrs[6:8] == [0.5, 1.0] and lrs[9] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 2)))
    one = [train._lr_at(train.DemoConfig(steps=10, dense_fraction=0.4, warmup=2, lr=1.0), s) for s in range(10)]
    assert all(a > b for a, b in zip(one[2:], one[3:]))  # without it: one warm-up, one cosine, no restart


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
    # --dense-rewarm: each stage its own schedule of that style
    rewarm = lrs(lr_decay_style="wsd", lr_decay_fraction=0.5, dense_fraction=0.4, dense_rewarm=1)
    assert rewarm[:6] == pytest.approx([1.0, 2.0, 2.0, 2.0 * 0.7, 2.0 * 0.4, 2.0 * 0.1])
    assert rewarm[6:] == pytest.approx([2.0, 2.0, 2.0 * 0.55, 2.0 * 0.1])


def test_progress_eta_from_the_mean_step_time():
    state = dict(step=5, train=[None] * 5, seconds={"lighthouse": 8.0, "dense": 2.0})
    assert train._progress(state, 200, width=10) == "step    5/200 [----------]   2% eta 0:06:30"


def test_position_buckets_average_equal_slices_the_last_taking_the_remainder():
    losses = torch.arange(10, dtype=torch.float32)
    assert train.position_buckets(losses, 2) == [2.0, 7.0]
    assert train.position_buckets(losses, 3) == pytest.approx([1.5, 5.0, 8.0])  # slices of 4, 3, 3
