"""GPU monitor across ranks: gloo on localhost with 2 and 4 spawned processes and fake NVML backends."""

from __future__ import annotations

import json
import os
import random
import socket
import statistics

import pytest
from spawn import run_on_ranks

from megatron_lighthouse.monitor import FakeGPU, FakeNVMLBackend, GPUMonitor, MonitorConfig
from megatron_lighthouse.monitor.aggregate import median_without

LOG_INTERVAL = 4
STEPS = 8

#: Per scenario, per rank: (FakeGPU, step time in s, or None for a rank without NVML).
SCENARIOS = {
    "slow_step": [(FakeGPU(gpu_util=90), 0.10), (FakeGPU(gpu_util=90), 0.20)],
    "four_ranks": [
        (FakeGPU(gpu_util=90, power_w=600, sm_clock_mhz=1500), 0.100),  # clocked 24% below the others
        (FakeGPU(gpu_util=88, power_w=590, throttle_mask=0x040), 0.110),  # 5% slower than median: fine
        (FakeGPU(gpu_util=30, power_w=250), 0.100),  # low utilization
        (FakeGPU(gpu_util=91, power_w=610), 0.150),  # slow steps
    ],
    "one_without_nvml": [(FakeGPU(gpu_util=80), 0.10), (None, 0.30)],
    "none_with_nvml": [(None, 0.10), (None, 0.30)],
}


def test_median_without_matches_brute_force():
    rng = random.Random(0)
    for n in (2, 3, 4, 5, 8, 33):
        values = sorted(rng.choice([0.1, 0.2, 0.3, rng.random()]) for _ in range(n))
        for i, value in enumerate(values):
            assert median_without(values, value) == pytest.approx(statistics.median(values[:i] + values[i + 1:]))


def _scenario(rank: int, out_dir: str, scenario: str) -> None:
    """One monitored run of ``STEPS`` steps on this rank; its records go to ``out_dir/rank<r>.json``."""
    os.makedirs(out_dir, exist_ok=True)
    gpus = [gpu or FakeGPU() for gpu, _ in SCENARIOS[scenario]]
    has_nvml = SCENARIOS[scenario][rank][0] is not None
    backend = FakeNVMLBackend(gpus, init_error=None if has_nvml else "driver not loaded")
    step_time = SCENARIOS[scenario][rank][1]
    config = MonitorConfig(
        interval_s=0.005, log_interval=LOG_INTERVAL, jsonl_path=os.path.join(out_dir, "run.jsonl"), wandb=False
    )
    records = []
    with GPUMonitor(config, backend=backend, device=rank) as monitor:
        for it in range(1, STEPS + 1):
            record = monitor.step(it, step_time=step_time)
            if record is not None:
                records.append(record)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(records, f)


def _scenarios(rank: int, world: int, out_dir: str, scenarios: tuple) -> None:
    for scenario in scenarios:  # the same order on every rank, so the collectives pair up
        _scenario(rank, os.path.join(out_dir, scenario), scenario)


def _results(out_dir, scenario: str):
    world = len(SCENARIOS[scenario])
    path = out_dir / scenario
    per_rank = [json.loads((path / f"rank{r}.json").read_text()) for r in range(world)]
    lines = (path / "run.jsonl").read_text().splitlines() if (path / "run.jsonl").exists() else []
    return per_rank, [json.loads(line) for line in lines]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """The three two-rank scenarios, run in one spawn of 2 processes."""
    out_dir = tmp_path_factory.mktemp("two_ranks")
    names = ("slow_step", "one_without_nvml", "none_with_nvml")
    run_on_ranks(_scenarios, 2, str(out_dir), names)
    return {"dir": out_dir, **{name: _results(out_dir, name) for name in names}}


def _check_common(per_rank, lines, world):
    # every rank got the same table; only rank 0 wrote, a header then one record per log interval
    for records in per_rank[1:]:
        assert [r["ranks"] for r in records] == [r["ranks"] for r in per_rank[0]]
        assert [r["stragglers"] for r in records] == [r["stragglers"] for r in per_rank[0]]
    assert [line["kind"] for line in lines] == ["run"] + ["interval"] * (STEPS // LOG_INTERVAL)
    assert [line["iteration"] for line in lines[1:]] == list(range(LOG_INTERVAL, STEPS + 1, LOG_INTERVAL))
    host = socket.gethostname()
    for line in lines[1:]:
        assert line["world_size"] == world
        assert [(e["rank"], e["host"], e["local_gpu"]) for e in line["ranks"]] == [(r, host, r) for r in range(world)]
        assert all(e["steps"] == LOG_INTERVAL for e in line["ranks"])
    return lines[1:]


def test_two_ranks_name_the_slow_one(two_ranks):
    per_rank, lines = two_ranks["slow_step"]
    for record in _check_common(per_rank, lines, 2):
        stats = record["stats"]
        assert stats["step_time_s"]["min"] == pytest.approx(0.10) and stats["step_time_s"]["max"] == pytest.approx(0.20)
        assert stats["step_time_s"]["mean"] == pytest.approx(0.15) and stats["step_time_s"]["max_rank"] == 1
        assert stats["gpu_util_pct"] == {"min": 90.0, "mean": 90.0, "max": 90.0, "min_rank": 0, "max_rank": 0}
        assert [(s["rank"], s["reason"], s["where"]) for s in record["stragglers"]] == [
            (1, "step_time", f"{socket.gethostname()}:gpu1")
        ]
        assert all(e["samples"] >= 1 and e["mem_total_mib"] == 80 * 1024 for e in record["ranks"])


def test_four_ranks_stats_and_stragglers(tmp_path):
    run_on_ranks(_scenarios, 4, str(tmp_path), ("four_ranks",))
    per_rank, lines = _results(tmp_path, "four_ranks")
    host = socket.gethostname()
    for record in _check_common(per_rank, lines, 4):
        util = record["stats"]["gpu_util_pct"]
        assert (util["min"], util["max"], util["min_rank"], util["max_rank"]) == (30.0, 91.0, 2, 3)
        assert util["mean"] == pytest.approx((90 + 88 + 30 + 91) / 4)
        assert record["stats"]["power_w"]["mean"] == pytest.approx((600 + 590 + 250 + 610) / 4)
        found = sorted((s["rank"], s["reason"], s["host"], s["local_gpu"]) for s in record["stragglers"])
        reasons = ["sm_clock", "throttle", "gpu_util", "step_time"]  # ranks 0..3, in that order
        assert found == [(rank, reason, host, rank) for rank, reason in enumerate(reasons)]
        assert record["ranks"][1]["throttle_reasons"] == ["hw_thermal"]


def test_rank_without_nvml_still_joins_and_is_named(two_ranks):
    per_rank, lines = two_ranks["one_without_nvml"]
    for record in _check_common(per_rank, lines, 2):
        without = record["ranks"][1]
        assert without["gpu_util_pct"] is None and without["samples"] == 0
        assert without["step_time_s"] == pytest.approx(0.30)
        assert record["stats"]["gpu_util_pct"]["max_rank"] == 0 == record["stats"]["gpu_util_pct"]["min_rank"]
        assert [(s["rank"], s["reason"]) for s in record["stragglers"]] == [(1, "step_time")]
    assert lines[0]["ranks"][1]["has_metrics"] is False and lines[0]["ranks"][0]["gpu_name"] == "Fake GPU 80GB"


def test_no_rank_with_nvml_means_no_output(two_ranks):
    per_rank, lines = two_ranks["none_with_nvml"]
    assert per_rank == [[], []]
    assert lines == [] and not os.path.exists(two_ranks["dir"] / "none_with_nvml" / "run.jsonl")
