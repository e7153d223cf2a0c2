"""LighthouseSchedule (the paper's two stages) and the run-time switch of a model's Lighthouse layers."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from megatron_lighthouse.schedule import LighthouseSchedule, lighthouse_enabled, set_lighthouse_enabled

L, D = True, False


def test_two_stages():
    schedule = LighthouseSchedule(dense_from_iteration=3)
    assert [schedule.enabled_at(i) for i in range(5)] == [L, L, L, D, D]
    assert all(LighthouseSchedule().enabled_at(i) for i in (0, 10**9))
    assert [LighthouseSchedule(dense_from_iteration=0).enabled_at(i) for i in range(2)] == [D, D]


@pytest.mark.parametrize("value", [-1, 2.5, "3", True])
def test_bad_switch_iteration_is_refused(value):
    with pytest.raises(ValueError, match=r"LighthouseSchedule.dense_from_iteration=.*: must be None or an int >= 0"):
        LighthouseSchedule(dense_from_iteration=value)


def test_schedule_is_immutable():
    with pytest.raises(dataclasses.FrozenInstanceError):
        LighthouseSchedule(3).dense_from_iteration = 4


def test_schedule_imports_no_megatron_core():
    """The schedule is importable on a login node: it needs torch only (the core attention on first use)."""
    import subprocess
    import sys

    code = ("import sys, megatron_lighthouse.schedule, megatron_lighthouse.megatron_lm, megatron_lighthouse.demo.train; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] == 'megatron'); print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("iteration", [-1, -5, None, "3", 2.5, True])
def test_bad_iteration_is_refused(iteration):
    """-1 ran Lighthouse, None / "3" gave a bare TypeError."""
    schedule = LighthouseSchedule(dense_from_iteration=3)
    with pytest.raises(ValueError, match=r"^iteration=.*: must be an int >= 0 \(0-based training iteration\)$"):
        schedule.enabled_at(iteration)
    with pytest.raises(ValueError, match=r"^iteration=.*: must be an int >= 0"):
        schedule.apply([], iteration)


@pytest.mark.parametrize("enabled", ["False", 0, 1, None])
def test_enabled_must_be_a_bool(enabled):
    """bool("False") is True: a string switched the Lighthouse layers on."""
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match=r"^enabled=.*: must be True or False$"):
        set_lighthouse_enabled(model, enabled)
    with pytest.raises(ValueError, match=r"^enabled=.*: must be True or False$"):
        with lighthouse_enabled([], enabled):
            pass


@pytest.mark.parametrize("model", [None, "model", 3, {"decoder": torch.nn.Linear(2, 2)}, ["chunk"],
                                   [torch.nn.Linear(2, 2), None]])
def test_a_model_that_is_no_module_is_refused(model):
    """None or a string gave a TypeError or AttributeError from inside; a dict was walked by its keys."""
    match = r"^model: a \w+; must be a torch.nn.Module \(possibly wrapped\) or a list of them"
    with pytest.raises(ValueError, match=match):
        LighthouseSchedule(dense_from_iteration=3).apply(model, 0)
    with pytest.raises(ValueError, match=match):
        set_lighthouse_enabled(model, True)
    with pytest.raises(ValueError, match=match):
        with lighthouse_enabled(model, False):
            pass
    assert set_lighthouse_enabled((torch.nn.Linear(2, 2),), True) == 0
