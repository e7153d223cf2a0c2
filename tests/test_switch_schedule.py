"""LighthouseSchedule (the paper's two stages) and the run-time switch of a model's Lighthouse layers."""

from __future__ import annotations

import dataclasses

import pytest

from megatron_lighthouse.schedule import LighthouseSchedule

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
