"""benchmarks/bench_quality.py at a tiny size on CPU: variants x seeds, the table, the JSON and the plot."""

from __future__ import annotations

import json
import subprocess

import pytest

from benchmark_utils import ROOT, load_benchmark, run_python

TINY = ["--layers", "2", "--hidden", "32", "--heads", "2", "--ffn", "64", "--seq-len", "256", "--levels", "2",
        "--pooling-factor", "2", "--topk", "128", "--dense-layers", "0", "--batch-size", "2", "--eval-every", "2",
        "--eval-batches", "1", "--log-every", "2", "--corpus-bytes", "300000", "--warmup", "1", "--steps", "4"]


def _bench():
    return load_benchmark("bench_quality")


def _run(*argv: str) -> subprocess.CompletedProcess:
    return run_python(str(ROOT / "benchmarks" / "bench_quality.py"), *argv)


def test_variants_seeds_table_json_plot(tmp_path):
    out = tmp_path / "q"
    proc = _run("--out-dir", str(out), "--seeds", "0", "1", "--variant", "dense=--mode dense",
                "--variant", "rewarm=--mode two-stage --dense-fraction 0.5 --dense-rewarm 1", "--", *TINY)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    printed = proc.stdout
    report = json.loads((out / "quality.json").read_text())
    assert [(r["variant"], r["seed"]) for r in report["runs"]] == [("dense", 0), ("dense", 1), ("rewarm", 0),
                                                                   ("rewarm", 1)]
    dense, rewarm = report["summary"]
    for row, name in ((dense, "dense"), (rewarm, "rewarm")):
        losses = [r["final_val_loss"] for r in report["runs"] if r["variant"] == name]
        # each run's final loss is the one its own metrics.json reports
        assert losses == [json.loads((out / f"{name}_s{s}" / "metrics.json").read_text())["final_val_loss"]
                          for s in (0, 1)]
        assert row["mean"] == pytest.approx(sum(losses) / 2)
    for run in report["runs"]:  # the training curve: the mean of the run's own step losses per eval interval
        train = json.loads((out / f"{run['variant']}_s{run['seed']}" / "metrics.json").read_text())["train"]
        assert [c["step"] for c in run["train_curve"]] == [2, 4]
        assert run["train_curve"][1]["loss"] == pytest.approx((train[2]["loss"] + train[3]["loss"]) / 2)
        assert row["spread"] == pytest.approx(abs(losses[0] - losses[1]))
    assert rewarm["vs_baseline_pct"] == pytest.approx(100 * (rewarm["mean"] / dense["mean"] - 1))
    assert {r["mode"] for r in report["runs"]} == {"dense", "two-stage"}
    assert all(r["switch_step"] == 2 for r in report["runs"] if r["variant"] == "rewarm")
    assert report["shared_flags"] == TINY and report["device"] == "cpu"
    assert "final val loss (dense) by seed" in printed and f"{rewarm['vs_baseline_pct']:+.2f}%" in printed
    assert "bar (two-stage within 1% of dense or below): rewarm" in printed
    assert (out / "quality.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "rewarm_s1" / "checkpoint.pt").exists()

    # --merge of one report per seed (as from one process per seed) gives the joint run's summary
    parts = []
    for seed in (0, 1):
        part = dict(report, seeds=[seed], runs=[r for r in report["runs"] if r["seed"] == seed])
        parts.append(tmp_path / f"part{seed}.json")
        parts[-1].write_text(json.dumps(part))
    merged_dir = tmp_path / "merged"
    proc = _run("--out-dir", str(merged_dir), "--merge", *map(str, parts))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    merged = json.loads((merged_dir / "quality.json").read_text())
    assert merged["summary"] == report["summary"] and merged["seeds"] == [0, 1]
    assert sorted((r["variant"], r["seed"]) for r in merged["runs"]) == sorted(
        (r["variant"], r["seed"]) for r in report["runs"])
    assert [m["path"] for m in merged["merged"]] == list(map(str, parts))
    assert f"{rewarm['vs_baseline_pct']:+.2f}%" in proc.stdout
    assert (merged_dir / "quality.png").read_bytes()[:4] == b"\x89PNG"

    # --processes 2: the same runs, one process per seed, merged: the same losses as in one process
    side = tmp_path / "side"
    proc = _run("--out-dir", str(side), "--seeds", "0", "1", "--processes", "2", "--variant", "dense=--mode dense",
                "--variant", "rewarm=--mode two-stage --dense-fraction 0.5 --dense-rewarm 1", "--", *TINY)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    both = json.loads((side / "quality.json").read_text())
    assert both["processes"] == 2 and [m["path"] for m in both["merged"]] == [
        str(side / "part0" / "quality.json"), str(side / "part1" / "quality.json")]
    assert [(row["variant"], row["seeds"], row["losses"]) for row in both["summary"]] == [
        (row["variant"], row["seeds"], row["losses"]) for row in report["summary"]]
    assert "process 1: seeds 1, log" in proc.stdout and "run 2/2: rewarm seed 1" in (side / "part1.log").read_text()


def _report(path, shared, runs):
    path.write_text(json.dumps(dict(date="2026-12-01", command="x", device="cpu", torch="t", shared_flags=shared,
                                    runs=[dict(variant=v, seed=s, flags=f) for v, s, f in runs])))
    return str(path)


@pytest.mark.parametrize("second,message", [
    ((["--steps", "5"], [("dense", 1, ["--mode", "dense"])]), "other shared flags"),
    ((["--steps", "4"], [("dense", 0, ["--mode", "dense"])]), "run dense seed 0 is already"),
    ((["--steps", "4"], [("dense", 1, ["--mode", "lighthouse"])]), "variant dense has flags"),
])
def test_merge_refuses_reports_that_do_not_belong_together(tmp_path, second, message):
    first = _report(tmp_path / "a.json", ["--steps", "4"], [("dense", 0, ["--mode", "dense"])])
    other = _report(tmp_path / "b.json", *second)
    with pytest.raises(SystemExit, match=message):
        _bench().merge_reports([first, other])


@pytest.mark.parametrize("argv,message", [
    (["--seeds", "0", "1", "--processes", "3"], "--processes 3: must be between 1 and the number of --seeds"),
    (["--processes", "0"], "--processes 0"),
    (["--merge", "a.json", "--processes", "2"], "not with --merge"),
])
def test_bad_processes(argv, message):
    with pytest.raises(SystemExit, match=message):
        _bench().parse_args(["--out-dir", "x", *argv])


def test_processes_report_a_failing_process_and_keep_the_others(tmp_path):
    out = tmp_path / "q"
    proc = _run("--out-dir", str(out), "--seeds", "0", "1", "--processes", "2", "--variant", "dense=--mode dense",
                "--variant", "bad=--mode two-stage --seq-len 200", "--", *TINY)
    assert proc.returncode == 2
    assert "part0 failed (exit status 2)" in proc.stderr and "--seq-len 200 does not fit" in proc.stderr
    report = json.loads((out / "quality.json").read_text())
    assert sorted((r["variant"], r["seed"]) for r in report["runs"]) == [("dense", 0), ("dense", 1)]


def test_merge_takes_no_run_flags():
    with pytest.raises(SystemExit, match="--merge: takes the runs"):
        _bench().parse_args(["--out-dir", "x", "--merge", "a.json", "--", "--steps", "3"])


def test_report_is_written_after_every_run(tmp_path):
    """A run that fails (or a job cut off) keeps the report of the runs finished before it."""
    out = tmp_path / "q"
    proc = _run("--out-dir", str(out), "--variant", "dense=--mode dense",
                "--variant", "bad=--mode two-stage --seq-len 200", "--", *TINY)
    assert proc.returncode == 2 and "--seq-len 200 does not fit" in proc.stderr
    report = json.loads((out / "quality.json").read_text())
    assert [(r["variant"], r["seed"]) for r in report["runs"]] == [("dense", 0)]
    assert report["summary"][0]["losses"] == [report["runs"][0]["final_val_loss"]]


@pytest.mark.parametrize("argv,message", [
    (["--out-dir", "x", "--variant", "bad"], "must be NAME=DEMO FLAGS"),
    (["--out-dir", "x", "--variant", "a=--mode dense", "--variant", "a=--mode lighthouse"], "names must differ"),
    (["--out-dir", "x", "--", "--seed", "3"], "--seed: set by this script"),
])
def test_bad_arguments(argv, message):
    with pytest.raises(SystemExit, match=message):
        _bench().parse_args(argv)


def test_bad_demo_setting_fails_clearly(tmp_path):
    proc = _run("--out-dir", str(tmp_path), "--", *TINY, "--seq-len", "200")
    assert proc.returncode == 2 and "--seq-len 200 does not fit" in proc.stderr


@pytest.mark.parametrize("baseline_mode,bar_lines", [("dense", 1), ("two-stage", 0)])
def test_bar_line_only_against_dense_from_scratch(capsys, baseline_mode, bar_lines):
    bench = _bench()
    records = [dict(variant="a", mode=baseline_mode, seed=0, final_val_loss=2.0, train_seconds=1.0, tokens_per_s=1.0),
               dict(variant="b", mode="two-stage", seed=0, final_val_loss=2.01, train_seconds=1.0, tokens_per_s=1.0)]
    bench.print_table(bench.summarize(records, ["a", "b"]), records)
    printed = capsys.readouterr().out
    assert printed.count("bar (two-stage within 1%") == bar_lines
    assert "+0.50%" in printed


def test_change_vs_baseline_is_paired_by_seed(capsys):
    """A variant run on fewer seeds is compared with the baseline's mean over those seeds, not over all of them;
    one with a seed the baseline lacks gets no comparison (and no bar line)."""
    bench = _bench()
    run = dict(train_seconds=1.0, tokens_per_s=1.0)
    records = [dict(run, variant="dense", mode="dense", seed=s, final_val_loss=x) for s, x in ((1, 3.0), (0, 2.0),
                                                                                                (2, 4.0))]
    records += [dict(run, variant="two", mode="two-stage", seed=s, final_val_loss=x) for s, x in ((1, 3.3), (0, 2.2))]
    records += [dict(run, variant="other", mode="two-stage", seed=7, final_val_loss=1.0)]
    dense, two, other = bench.summarize(records, ["dense", "two", "other"])
    assert dense["seeds"] == [0, 1, 2] and dense["losses"] == [2.0, 3.0, 4.0]
    assert two["seeds"] == [0, 1] and two["vs_baseline_pct"] == pytest.approx(10.0)  # 2.75 vs 2.5, not vs 3.0
    assert other["vs_baseline_pct"] is None and other["per_seed_pct"] is None and other["per_seed_stderr"] is None
    assert two["per_seed_pct"] == pytest.approx([10.0, 10.0]) and two["per_seed_stderr"] == pytest.approx(0.0)
    bench.print_table([dense, two, other], records)
    printed = capsys.readouterr().out
    assert "+10.00%" in printed and "n/a" in printed and "0,1,2" in printed
    assert "two +10.00%: not met (per seed +10.00% ± 0.00 standard error, 2 seeds)" in printed
    assert "other" not in printed.split("bar (")[-1]


def test_loss_by_position_is_averaged_over_seeds_and_paired_with_the_baseline(capsys):
    """Each variant's final slices are the mean over its seeds; the difference is against the baseline's mean over
    the same seeds. A run without slices (an older report) leaves its variant without them and the table out."""
    bench = _bench()
    run = dict(train_seconds=1.0, tokens_per_s=1.0)

    def record(variant, seed, slices):
        return dict(run, variant=variant, mode="dense" if variant == "dense" else "two-stage", seed=seed,
                    final_val_loss=sum(slices) / 2, evals=[dict(step=9, val_loss=sum(slices) / 2,
                                                                val_loss_by_position=slices)])

    records = [record("dense", 0, [2.0, 1.0]), record("dense", 1, [3.0, 2.0]), record("dense", 2, [9.0, 9.0]),
               record("two", 0, [2.5, 1.0]), record("two", 1, [3.1, 2.0])]
    dense, two = bench.summarize(records, ["dense", "two"])
    assert dense["by_position"] == pytest.approx([14 / 3, 4.0])
    assert two["by_position"] == pytest.approx([2.8, 1.5])
    assert two["by_position_vs_baseline"] == pytest.approx([0.3, 0.0])  # against seeds 0 and 1 only
    bench.print_table([dense, two], records)
    printed = capsys.readouterr().out
    assert "by position, 2 equal slices" in printed and "  +0.3000  +0.0000" in printed
    records[3]["evals"][-1].pop("val_loss_by_position")
    dense, two = bench.summarize(records, ["dense", "two"])
    assert two["by_position"] is None and two["by_position_vs_baseline"] is None
    bench.print_table([dense, two], records)
    assert "by position" not in capsys.readouterr().out


def test_per_seed_change_and_its_standard_error():
    """Seeds +1%, +3%, -1% against their own baseline run: mean +1%, standard error stdev / sqrt(3)."""
    bench = _bench()
    run = dict(train_seconds=1.0, tokens_per_s=1.0)
    records = [dict(run, variant="dense", mode="dense", seed=s, final_val_loss=2.0 + s) for s in range(3)]
    records += [dict(run, variant="two", mode="two-stage", seed=s, final_val_loss=(2.0 + s) * f)
                for s, f in enumerate((1.01, 1.03, 0.99))]
    dense, two = bench.summarize(records, ["dense", "two"])
    assert two["per_seed_pct"] == pytest.approx([1.0, 3.0, -1.0])
    assert two["per_seed_stderr"] == pytest.approx(2.0 / 3 ** 0.5)
    assert dense["per_seed_pct"] == pytest.approx([0.0] * 3) and dense["per_seed_stderr"] == pytest.approx(0.0)
    single = bench.summarize(records[:1] + records[3:4], ["dense", "two"])[1]
    assert single["per_seed_pct"] == pytest.approx([1.0]) and single["per_seed_stderr"] is None


def test_train_curve_is_the_mean_loss_between_evaluations():
    bench = _bench()
    train = [dict(step=i, loss=float(i)) for i in range(10)]
    curve = bench.train_curve(train, [dict(step=4, val_loss=0.0), dict(step=10, val_loss=0.0)])
    assert curve == [dict(step=4, loss=1.5), dict(step=10, loss=6.5)]  # steps 0-3, then 4-9
    # only steps that were logged count; an interval without any is left out
    assert bench.train_curve(train[:3], [dict(step=2), dict(step=4), dict(step=6)]) == [dict(step=2, loss=0.5),
                                                                                      dict(step=4, loss=2.0)]
