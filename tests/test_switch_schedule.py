"""LighthouseSchedule: which iterations run Lighthouse, with the switch and with interleaved dense steps."""

from __future__ import annotations

import pytest

from megatron_lighthouse.switch import LighthouseSchedule

L, D = True, False


def test_two_stages():
    schedule = LighthouseSchedule(dense_from_iteration=3)
    assert [schedule.enabled_at(i) for i in range(5)] == [L, L, L, D, D]
    assert [schedule.in_lighthouse_stage(i) for i in range(5)] == [True, True, True, False, False]
    assert all(LighthouseSchedule().enabled_at(i) for i in (0, 10**9))


def test_dense_every_interleaves_dense_iterations_before_the_switch_only():
    schedule = LighthouseSchedule(dense_from_iteration=10, dense_every=4)
    assert [schedule.enabled_at(i) for i in range(13)] == [L, L, L, D, L, L, L, D, L, L, D, D, D]
    assert [schedule.in_lighthouse_stage(i) for i in range(12)] == [True] * 10 + [False] * 2
    throughout = LighthouseSchedule(dense_every=3)
    assert [throughout.enabled_at(i) for i in range(7)] == [L, L, D, L, L, D, L]
    assert all(throughout.in_lighthouse_stage(i) for i in range(7))


@pytest.mark.parametrize("every", [0, 1, -2, 2.0, True])
def test_dense_every_below_two_or_not_an_int_is_refused(every):
    with pytest.raises(ValueError, match=r"LighthouseSchedule.dense_every=.*must be None or an int >= 2"):
        LighthouseSchedule(dense_every=every)
