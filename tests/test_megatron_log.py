"""benchmarks/megatron_log.py reads Megatron-LM's own training-log lines (and the Lighthouse hook's) into rows, a
table and JSON. The sample lines are formatted here the way Megatron-LM's ``training_log``, ``report_memory`` and
``evaluate_and_print_results`` format theirs."""

from __future__ import annotations

import argparse
import json
import logging
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import megatron_log  # noqa: E402


def iteration_line(iteration: int, total: int, ms: float, loss: float, grad_norm: float = 2.5, lr: float = 2e-3,
                   batch: int = 1) -> str:
    """A ``training_log`` line: timestamp, iteration/total, then ``key: value |`` fields in Megatron-LM's order."""
    return (f" [2026-08-23 10:00:{iteration:02d}.123456] iteration {iteration:8d}/{total:8d} |"
            f" consumed samples: {iteration * batch:12d} | elapsed time per iteration (ms): {ms:.1f} |"
            f" learning rate: {lr:.6E} | global batch size: {batch:5d} | lm loss: {loss:.6E} | loss scale: 1.0 |"
            f" grad norm: {grad_norm:.3f} | number of skipped iterations: {0:3d} | number of nan iterations: {0:3d} |")


def memory_line(label: str, allocated: float, peak: float, rank: int = 0) -> str:
    return (f"[Rank {rank}] ({label}) memory (MB) | allocated: {allocated:.2f} | max allocated: {peak:.2f}"
            f" | reserved: {peak + 512:.2f} | max reserved: {peak + 1024:.2f}")


def validation_lines(where: str, loss: float) -> list:
    text = f" validation loss at {where} | lm loss value: {loss:.6E} | lm loss PPL: {2.718281828 ** loss:.6E} | "
    return ["-" * (len(text) + 1), text, "-" * (len(text) + 1)]


def switch_line(caplog, iteration: int = 4, dense_from: int = 4) -> str:
    """The hook's own switch message, logged by ``maybe_switch_to_dense`` over stand-in Lighthouse layers."""
    import megatron_lighthouse.megatron_lm as megatron_lm

    class Layer:
        def __init__(self, number):
            self.enabled, self.layer_number = True, number

    layers = [Layer(n) for n in (3, 4, 5, 6)]
    args = argparse.Namespace(lighthouse_dense_from_iteration=dense_from)
    patch = pytest.MonkeyPatch()
    patch.setattr(megatron_lm, "lighthouse_modules", lambda model: layers)
    patch.setattr(megatron_lm, "set_lighthouse_enabled",
                  lambda modules, on: [setattr(m, "enabled", on) for m in modules])
    try:
        with caplog.at_level(logging.INFO, logger="megatron_lighthouse.megatron_lm"):
            assert megatron_lm.maybe_switch_to_dense(None, args, iteration)
    finally:
        patch.undo()
    # As Python's default logging format prints it on a Megatron-LM rank.
    return f"INFO:megatron_lighthouse.megatron_lm:{caplog.messages[-1]}"


def summary_line() -> str:
    from megatron_lighthouse.config import LighthouseConfig
    from megatron_lighthouse.megatron_lm import lighthouse_summary

    args = argparse.Namespace(seq_length=131072, num_layers=8, context_parallel_size=1,
                              lighthouse_dense_from_iteration=None)
    return lighthouse_summary(args, LighthouseConfig(), 8, 128)


@pytest.fixture()
def lighthouse_log(caplog) -> list:
    """Stage b of the GPU script: resumed at iteration 4, switched, two dense iterations, memory, validation."""
    return ["> PyTorch version ................ 2.11.0", summary_line(), switch_line(caplog),
            iteration_line(5, 6, 5321.4, 9.87), memory_line("after 5 iterations", 20480.5, 60211.25),
            "[default0]:" + iteration_line(6, 6, 3012.8, 9.12),
            memory_line("before save_checkpoint for iteration 6", 20480.5, 61000.0),
            *validation_lines("iteration 6 on validation set", 9.05), *validation_lines("iteration 6 on test set", 9.2)]


def test_parse_log_reads_megatrons_lines(lighthouse_log):
    log = megatron_log.parse_log(lighthouse_log)
    first, second = log["iterations"]
    assert (first["iteration"], first["train_iters"]) == (5, 6)
    assert first["elapsed_time_per_iteration_ms"] == 5321.4 and first["lm_loss"] == pytest.approx(9.87)
    assert first["grad_norm"] == 2.5 and first["learning_rate"] == 2e-3 and first["global_batch_size"] == 1
    assert first["consumed_samples"] == 5 and first["number_of_nan_iterations"] == 0
    assert second["iteration"] == 6 and second["elapsed_time_per_iteration_ms"] == 3012.8  # torchrun prefix skipped
    assert [m["label"] for m in log["memory"]] == ["after 5 iterations", "before save_checkpoint for iteration 6"]
    assert log["memory"][0] == {"rank": 0, "label": "after 5 iterations", "allocated": 20480.5,
                                "max_allocated": 60211.25, "reserved": 60723.25, "max_reserved": 61235.25}
    assert [v["at"] for v in log["validation"]] == ["iteration 6 on validation set", "iteration 6 on test set"]
    assert log["validation"][0]["lm_loss_value"] == pytest.approx(9.05)
    assert log["switch"] == {"iteration": 4, "dense_from_iteration": 4, "layers_switched": 4, "layers": [3, 4, 5, 6]}
    assert log["lighthouse"].startswith("Lighthouse: seq_length 131072 -> subsequence 24576")


def test_summary_skips_the_warm_up_iteration(lighthouse_log):
    log = megatron_log.parse_log(lighthouse_log + [iteration_line(7, 8, 3000.0, 9.0)])
    summary = megatron_log.summarize(log)
    assert summary["iterations"] == [5, 7]
    assert summary["ms_first_iteration"] == 5321.4
    assert summary["ms_per_iteration_median"] == pytest.approx((3012.8 + 3000.0) / 2)
    assert (summary["lm_loss_first"], summary["lm_loss_last"]) == (pytest.approx(9.87), pytest.approx(9.0))
    assert summary["max_allocated_mb"] == 61000.0 and summary["switched_at"] == 4
    assert summary["validation_lm_loss"] == pytest.approx(9.05)  # the validation set's, not the test set's


def test_a_log_without_megatron_lines():
    log = megatron_log.parse_log(["torchrun: error", "Traceback (most recent call last):", "ValueError: x"])
    assert log["iterations"] == [] and log["memory"] == [] and log["switch"] is None
    assert megatron_log.summarize(log) == {
        "iterations": None, "lm_loss_first": None, "lm_loss_last": None, "ms_per_iteration_median": None,
        "ms_first_iteration": None, "max_allocated_mb": None, "switched_at": None, "validation_lm_loss": None}


def test_fields_keep_every_key_value_pair():
    assert megatron_log.fields(" throughput per GPU (TFLOP/s/GPU): 123.4 | energy per GPU (J/iter/GPU): 5.0 |"
                               " loss scale: 1.0 | odd part |") == {
        "throughput_per_gpu_tflop_s_gpu": 123.4, "energy_per_gpu_j_iter_gpu": 5.0, "loss_scale": 1.0}
    assert megatron_log.stage_and_path("a_lighthouse=/x/y.log") == ("a_lighthouse", "/x/y.log")
    assert megatron_log.stage_and_path("/x/a=b/c_dense.log") == ("c_dense", "/x/a=b/c_dense.log")


def test_table_cells():
    cells = [megatron_log._cell(v) for v in (None, 9.87654, 1234.56, float("inf"), float("nan"), [5, 6], 4, "x")]
    assert cells == ["-", "9.877", "1234.6", "inf", "nan", "5-6", "4", "x"]


def test_cli_writes_table_and_json(tmp_path, capsys, lighthouse_log):
    a = tmp_path / "a_lighthouse.log"
    a.write_text("\n".join([summary_line(), iteration_line(1, 4, 9000.0, 10.4), iteration_line(2, 4, 1100.0, 10.1),
                            memory_line("after 1 iterations", 1000.0, 30000.0)]) + "\n")
    b = tmp_path / "b.log"
    b.write_text("\n".join(lighthouse_log) + "\n")
    status = tmp_path / "stages.tsv"
    status.write_text("stage\trc\tseconds\na_lighthouse\t0\t95\nb_resume_dense\t0\t80\nc_dense_scratch\t124\t150\n")
    out = tmp_path / "run.json"
    assert megatron_log.main([str(a), f"b_resume_dense={b}", "--status", str(status), "--json", str(out)]) == 0
    table = capsys.readouterr().out
    header, row_a, row_b, row_c = table.splitlines()[:4]
    assert header.split()[:4] == ["stage", "rc", "s", "iterations"]
    assert row_a.split()[:5] == ["a_lighthouse", "0", "95", "1-2", "1100.0"]
    assert row_b.split()[:4] == ["b_resume_dense", "0", "80", "5-6"] and row_b.split()[-1] == "4"
    assert row_c.split() == ["c_dense_scratch", "124", "150"] + ["-"] * 8  # timed out, no log given
    assert "b_resume_dense: 4 Lighthouse layers switched to dense at iteration 4" in table
    assert "b_resume_dense: continues a_lighthouse" not in table  # a ends at 2, b starts at 5
    assert "before save_checkpoint for iteration 6" in table
    record = json.loads(out.read_text())["stages"]
    assert list(record) == ["a_lighthouse", "b_resume_dense", "c_dense_scratch"]
    assert record["a_lighthouse"]["summary"]["ms_per_iteration_median"] == 1100.0
    assert record["b_resume_dense"]["status"] == {"rc": 0, "seconds": 80}
    assert record["b_resume_dense"]["iterations"][1]["lm_loss"] == pytest.approx(9.12)
    assert record["c_dense_scratch"]["iterations"] == [] and record["c_dense_scratch"]["status"]["rc"] == 124


def test_cli_refuses_a_missing_log(tmp_path, capsys):
    with pytest.raises(SystemExit):
        megatron_log.main([str(tmp_path / "nope.log")])
    assert "no such file" in capsys.readouterr().err


def test_a_resumed_stage_continues_the_one_before(tmp_path):
    logs = {"a_lighthouse": [iteration_line(i, 4, 1000.0, 10.0 - i / 10) for i in (1, 2, 3, 4)],
            "b_resume_dense": [iteration_line(i, 6, 3000.0, 9.5 - i / 10) for i in (5, 6)],
            "d_unpatched_dense": [iteration_line(i, 8, 3000.0, 9.0 - i / 10) for i in (7, 8)],
            "c_dense_scratch": [iteration_line(i, 6, 3000.0, 10.0 - i / 10) for i in range(1, 7)]}
    args = []
    for name, lines in logs.items():
        (tmp_path / f"{name}.log").write_text("\n".join(lines) + "\n")
        args.append(str(tmp_path / f"{name}.log"))
    stages = megatron_log.load_stages(args)
    assert stages["b_resume_dense"]["summary"]["continues"] == {
        "stage": "a_lighthouse", "lm_loss_before": pytest.approx(9.6), "lm_loss_after": pytest.approx(9.0)}
    assert stages["d_unpatched_dense"]["summary"]["continues"]["stage"] == "b_resume_dense"
    assert stages["a_lighthouse"]["summary"]["continues"] is None
    assert stages["c_dense_scratch"]["summary"]["continues"] is None  # from scratch
    assert "d_unpatched_dense: continues b_resume_dense at iteration 7, lm loss 8.9 -> 8.3" in \
        megatron_log.format_report(stages)


def test_compare_loss_reports_the_largest_differences_at_common_iterations(tmp_path, capsys):
    """--compare-loss A:B: stage B's lm loss against stage A's at the iterations both logged (FP8 against bf16)."""
    bf16 = tmp_path / "bf16.log"
    fp8 = tmp_path / "fp8.log"
    bf16.write_text("\n".join(iteration_line(i, 4, 100.0, loss) for i, loss in enumerate([10.0, 9.0, 8.0, 7.0], 1)))
    fp8.write_text("\n".join(iteration_line(i, 3, 90.0, loss) for i, loss in enumerate([10.0, 9.18, 7.9], 1)))
    out = tmp_path / "out.json"
    assert megatron_log.main([f"bf16={bf16}", f"fp8={fp8}", "--compare-loss", "bf16:fp8", "--json", str(out)]) == 0
    comparison = json.loads(out.read_text())["loss_comparisons"][0]
    assert comparison["stages"] == ["bf16", "fp8"] and comparison["iterations"] == 3
    assert comparison["max_abs_diff"] == pytest.approx(0.18)
    assert comparison["max_rel_diff"] == pytest.approx(0.02)
    assert comparison["mean_loss"] == pytest.approx([9.0, (10.0 + 9.18 + 7.9) / 3])
    assert comparison["diff_per_iteration"] == pytest.approx({"1": 0.0, "2": 0.18, "3": -0.1})
    table = capsys.readouterr().out.splitlines()
    assert table[-4].split()[:4] == ["loss", "of", "against", "iterations"]
    assert table[-3].split()[:4] == ["fp8", "bf16", "3", "0.18"]
    with pytest.raises(SystemExit):
        megatron_log.main([f"bf16={bf16}", "--compare-loss", "bf16:fp8"])
    assert "--compare-loss bf16:fp8: must be FIRST:SECOND, two of the stages ['bf16']" in capsys.readouterr().err
