"""LighthouseSchedule: which iterations run Lighthouse, with the switch and with interleaved dense steps."""

from __future__ import annotations

import dataclasses

import pytest

from megatron_lighthouse.schedule import LighthouseSchedule

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


def test_layer_interval_switches_layers_lowest_first_the_last_at_dense_from_iteration():
    schedule = LighthouseSchedule(dense_from_iteration=10, layer_interval=3)
    assert [schedule.switch_iteration(j, 3) for j in range(3)] == [4, 7, 10]
    assert [[schedule.enabled_at(i, j, 3) for i in range(3, 11)] for j in range(3)] == [
        [L, D, D, D, D, D, D, D], [L, L, L, L, D, D, D, D], [L, L, L, L, L, L, L, D]]
    assert [schedule.in_lighthouse_stage(i) for i in (4, 9, 10)] == [True, True, False]  # until the last layer
    assert LighthouseSchedule(dense_from_iteration=10).switch_iteration(0, 3) == 10  # 0: all at once
    assert LighthouseSchedule(layer_interval=0).switch_iteration(1, 2) is None
    interleaved = LighthouseSchedule(dense_from_iteration=6, dense_every=2, layer_interval=2)
    assert [interleaved.enabled_at(i, 0, 2) for i in range(6)] == [L, D, L, D, D, D]


def test_layer_interval_must_leave_the_first_layer_a_lighthouse_stage():
    schedule = LighthouseSchedule(dense_from_iteration=6, layer_interval=3)
    schedule.check_layers(3)  # the first layer switches at iteration 0: allowed
    with pytest.raises(ValueError, match=r"layer_interval=3 with 4 Lighthouse layers and dense_from_iteration=6: "
                                         r"the first layer would switch at iteration -3"):
        schedule.check_layers(4)


@pytest.mark.parametrize("kwargs,message", [
    (dict(dense_from_iteration=5, layer_interval=-1), r"layer_interval=-1: must be an int >= 0"),
    (dict(dense_from_iteration=5, layer_interval=True), r"layer_interval=True: must be an int >= 0"),
    (dict(layer_interval=2), r"layer_interval=2: needs dense_from_iteration"),
])
def test_bad_layer_interval_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LighthouseSchedule(**kwargs)


def test_blend_ramps_each_layers_dense_weight_over_the_iterations_before_its_switch():
    schedule = LighthouseSchedule(dense_from_iteration=10, layer_interval=3, blend_iterations=3)
    weights = [[schedule.dense_weight_at(i, j, 2) for i in range(3, 11)] for j in range(2)]
    assert weights == [[0.0, 0.25, 0.5, 0.75, 0.0, 0.0, 0.0, 0.0],  # layer 0 switches at 7, blends over 4..6
                       [0.0, 0.0, 0.0, 0.0, 0.25, 0.5, 0.75, 0.0]]  # layer 1 switches at 10, blends over 7..9
    assert [schedule.enabled_at(i, 0, 2) for i in (6, 7)] == [L, D]  # a blending layer still runs Lighthouse
    assert [schedule.blend_start(j, 2) for j in range(2)] == [4, 7] and LighthouseSchedule().blend_start() is None
    assert LighthouseSchedule(dense_from_iteration=4).dense_weight_at(3) == 0.0  # no blend by default
    assert LighthouseSchedule().dense_weight_at(10**9) == 0.0


def test_blend_must_start_at_iteration_zero_or_later():
    LighthouseSchedule(dense_from_iteration=5, layer_interval=2, blend_iterations=3).check_layers(2)  # starts at 0
    with pytest.raises(ValueError, match=r"layer_interval=2, blend_iterations=4 with 2 Lighthouse layers and "
                                         r"dense_from_iteration=5: the first layer would switch at iteration 3 and "
                                         r"start its blend at -1; needs .* = 6"):
        LighthouseSchedule(dense_from_iteration=5, layer_interval=2, blend_iterations=4).check_layers(2)


@pytest.mark.parametrize("kwargs,message", [
    (dict(dense_from_iteration=5, blend_iterations=-1), r"blend_iterations=-1: must be an int >= 0"),
    (dict(dense_from_iteration=5, blend_iterations=2.0), r"blend_iterations=2.0: must be an int >= 0"),
    (dict(blend_iterations=2), r"blend_iterations=2: needs dense_from_iteration"),
])
def test_bad_blend_iterations_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LighthouseSchedule(**kwargs)


def test_the_schedule_needs_no_megatron_core_and_the_switch_module_re_exports_it():
    import subprocess
    import sys

    code = ("import sys; from megatron_lighthouse.schedule import LighthouseSchedule; "
            "import megatron_lighthouse.demo.train, megatron_lighthouse.megatron_lm; "
            "assert not any(m.split('.')[0] == 'megatron' for m in sys.modules), 'megatron-core imported'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    switch = pytest.importorskip("megatron_lighthouse.switch")
    assert switch.LighthouseSchedule is LighthouseSchedule


def test_lighthouse_from_iteration_runs_a_dense_prefix_outside_the_lighthouse_stage():
    schedule = LighthouseSchedule(dense_from_iteration=5, lighthouse_from_iteration=2)
    assert [schedule.enabled_at(i) for i in range(6)] == [D, D, L, L, L, D]
    assert [schedule.in_lighthouse_stage(i) for i in range(6)] == [False, False, True, True, True, False]
    throughout = LighthouseSchedule(lighthouse_from_iteration=3)
    assert [throughout.enabled_at(i) for i in range(5)] == [D, D, D, L, L]
    staggered = LighthouseSchedule(dense_from_iteration=8, layer_interval=3, lighthouse_from_iteration=2)
    assert [[staggered.enabled_at(i, j, 2) for i in range(9)] for j in range(2)] == [
        [D, D, L, L, L, D, D, D, D], [D, D, L, L, L, L, L, L, D]]
    staggered.check_layers(2)  # the first layer switches at 5, after the prefix
    LighthouseSchedule(dense_from_iteration=8, layer_interval=3, lighthouse_from_iteration=2).check_layers(3)
    with pytest.raises(ValueError, match=r"layer_interval=3, lighthouse_from_iteration=2 with 3 Lighthouse layers and "
                                         r"dense_from_iteration=7: the "
                                         r"first layer would switch at iteration 1; needs dense_from_iteration >= "
                                         r"lighthouse_from_iteration \+ \(layers - 1\) \* layer_interval = 8"):
        LighthouseSchedule(dense_from_iteration=7, layer_interval=3, lighthouse_from_iteration=2).check_layers(3)



def test_check_layers_names_the_settings_as_the_caller_calls_them():
    schedule = LighthouseSchedule(dense_from_iteration=6, layer_interval=2, blend_iterations=1,
                                  lighthouse_from_iteration=2)
    schedule.check_layers(2)  # the first layer blends from 3, after the prefix
    names = {"dense_from_iteration": "the switch step", "layer_interval": "--layer-interval",
             "blend_iterations": "--blend-steps"}
    with pytest.raises(ValueError) as err:
        schedule.check_layers(3, names=names)
    assert str(err.value) == (
        "--layer-interval 2, --blend-steps 1, lighthouse_from_iteration=2 with 3 Lighthouse layers and the switch "
        "step 6: the first layer would switch at iteration 2 and start its blend at 1; needs the switch step >= "
        "lighthouse_from_iteration + (layers - 1) * --layer-interval + --blend-steps = 7")


@pytest.mark.parametrize("kwargs,message", [
    (dict(layer_interval=-1, dense_from_iteration=5), "--layer-interval -1: must be an int >= 0 (0: every layer "
                                                      "switches at the switch step)"),
    (dict(blend_iterations=2), "--blend-steps 2: needs the switch step (the blend leads up to the switch)"),
    (dict(dense_from_iteration=4, lighthouse_from_iteration=4),
     "lighthouse_from_iteration=4: must be below the switch step 4, or no iteration would run Lighthouse"),
    (dict(dense_every=1), "dense_every=1: must be None or an int >= 2 (1 would make every iteration dense)"),
])
def test_the_constructor_names_the_settings_as_the_caller_calls_them(kwargs, message):
    names = {"dense_from_iteration": "the switch step", "layer_interval": "--layer-interval",
             "blend_iterations": "--blend-steps"}
    with pytest.raises(ValueError) as err:
        LighthouseSchedule(**kwargs, names=names)
    assert str(err.value) == message  # no "LighthouseSchedule." prefix: the caller's words only
    named = LighthouseSchedule(dense_from_iteration=5, layer_interval=2, names=names)
    assert named == LighthouseSchedule(dense_from_iteration=5, layer_interval=2)  # the names are not stored
    assert "names" not in {f.name for f in dataclasses.fields(named)}


@pytest.mark.parametrize("kwargs,message", [
    (dict(lighthouse_from_iteration=-1), r"lighthouse_from_iteration=-1: must be an int >= 0"),
    (dict(lighthouse_from_iteration=1.0), r"lighthouse_from_iteration=1.0: must be an int >= 0"),
    (dict(dense_from_iteration=4, lighthouse_from_iteration=4),
     r"lighthouse_from_iteration=4: must be below dense_from_iteration=4, or no iteration would run Lighthouse"),
])
def test_bad_lighthouse_from_iteration_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LighthouseSchedule(**kwargs)
