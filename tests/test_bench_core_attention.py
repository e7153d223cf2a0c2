"""bench_core_attention.py on CPU (the timing needs a GPU): its rows and arguments, a tiny run of the local variants
through Megatron-Core modules, the table and the JSON."""

from __future__ import annotations

import json
import os

import pytest
import torch

pytest.importorskip("megatron.core")

from benchmark_utils import load_benchmark, run_python  # noqa: E402
from megatron_lighthouse.config import LighthouseConfig  # noqa: E402
from megatron_lighthouse.dense import DENSE_KERNEL_ENV  # noqa: E402

from megatron_utils import init_megatron  # noqa: E402

bench = load_benchmark("bench_core_attention")
TINY = bench.Case(tokens=256, heads=4, kv_heads=2, head_dim=16, pyramid="fixed",
                  lighthouse=LighthouseConfig(levels=2, pooling_factor=2, topk=128, dense_layers=(), rope="tokens"))


def test_default_grid_has_the_fixed_pyramid_everywhere_and_the_growing_one_from_256k():
    args = bench.parse_args([])
    assert args.variants == ["te", "sdpa", "auto", "op"] and args.heads == [(8, 8), (16, 2), (32, 8)]
    rows = {(c.tokens, c.heads, c.pyramid): c for c in args.cases}
    assert len(rows) == 4 * 3 + 2 * 3
    assert {c.lighthouse.levels for c in args.cases if c.pyramid == "fixed"} == {3}
    assert {(n, c.lighthouse.levels) for (n, _, p), c in rows.items() if p == "growing"} == {(524288, 4),
                                                                                          (1048576, 4)}
    assert rows[(1048576, 8, "fixed")].subsequence == 81920 and rows[(1048576, 8, "growing")].subsequence == 40960
    assert all(c.lighthouse.dense_layers == () and c.head_dim == 128 for c in args.cases)
    short = bench.parse_args(["--lengths", "131072", "--heads", "16/2", "--variants", "op,sdpa"])
    assert [(c.tokens, c.heads, c.kv_heads) for c in short.cases] == [(131072, 16, 2)]
    assert short.variants == ["sdpa", "op"]  # run in the report's order


@pytest.mark.parametrize("argv, message", [
    (["--heads", "16/3"], "--heads 16/3: '16/3': the query heads must be a positive multiple"),
    (["--heads", "8"], "--heads 8: '8' must be q/kv"),
    (["--variants", "te,flash"], "--variants te,flash: each must be one of te,sdpa,auto,op"),
    (["--lengths", "1000"], "--lengths 1000: sequence length 1000: must be divisible"),
    (["--lengths", "32k"], "--lengths 32k: must be comma-separated ints"),
])
def test_bad_arguments_are_one_error_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        bench.parse_args(argv)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_tiny_cpu_run_of_the_local_variants(monkeypatch, capsys, tmp_path):
    """The layer variants are Megatron-Core modules computing Lighthouse: equal to the op alone (fp32 here), each
    built under its own LIGHTHOUSE_DENSE_KERNEL with the user's setting restored; TE missing is a skipped row."""
    init_megatron()
    monkeypatch.setenv(DENSE_KERNEL_ENV, "flash")
    monkeypatch.setattr("megatron_lighthouse.spec.have_transformer_engine", lambda: False)
    rows = bench.run_case(TINY, bench.VARIANTS, torch.float32, torch.device("cpu"))
    assert os.environ[DENSE_KERNEL_ENV] == "flash"
    assert [r["variant"] for r in rows] == ["te", "sdpa", "auto", "op"]
    assert rows[0]["skipped"] == "TransformerEngine is not importable here" and "rel_l2" not in rows[0]
    for row in rows[1:]:
        assert row["fwd_bwd_ms"] > 0 and row["peak_gib"] is None and row["S"] == 384
        assert row["reference"] == "op" and row["equal"], row
        assert max(row["rel_l2"].values()) < 1e-5 and set(row["rel_l2"]) == {"out", "dq", "dk", "dv"}
    assert rows[1]["kernel"].startswith("SDPA's own choice: ") and rows[3]["kernel"] == "SDPA's own choice"
    assert rows[2]["kernel"] == "SDPA's own choice (no fused kernel applies)"
    choices = bench.sdpa_choices(TINY, torch.float32, torch.device("cpu"))
    assert set(choices) == {"bhsd, dropout 0.0", "bhsd, dropout 0.1", "sbhd_view, dropout 0.0",
                            "sbhd_view, dropout 0.1"}
    bench.ratios(rows)
    bench.print_table(rows)
    table = capsys.readouterr().out
    assert "| 256 | 4/2 | fixed L=2 | 384 | te | TransformerEngine is not importable here |" in table
    assert "equality (rel-L2 <= 0.01 against the reference): all within" in table
    path = bench.write_json({"rows": rows}, str(tmp_path), "NVIDIA H100 80GB HBM3")
    assert path.endswith("core_attention_NVIDIA_H100_80GB_HBM3.json")
    assert json.loads(open(path).read())["rows"][3]["rel_l2"] == rows[3]["rel_l2"]


#: A process with the fake TransformerEngine (installed before Megatron imports TE) running the TE variant.
_WITH_FAKE_TE = """
import json, sys, torch
sys.path[:0] = ["tests"]
import fake_te
fake_te.install()
from benchmark_utils import load_benchmark
from megatron_lighthouse.config import LighthouseConfig
from megatron_lighthouse.process_group import init_single_process_megatron
init_single_process_megatron("gloo")
bench = load_benchmark("bench_core_attention")
case = bench.Case(256, 4, 2, 16, "fixed", LighthouseConfig(levels=2, pooling_factor=2, topk=128, dense_layers=(),
                                                           rope="tokens"))
rows = bench.run_case(case, ["te", "sdpa", "op"], torch.float32, torch.device("cpu"))
bench.ratios(rows)
print("ROWS " + json.dumps(rows))
"""


def test_the_te_variant_is_the_reference_through_megatrons_te_core_attention():
    """Over the strict fake TE (fp32, CPU): the TE spec's LighthouseCoreAttention runs, is the reference of the
    others (which equal it), and the backend TE picked is reported as unknown where TE's state is missing."""
    proc = run_python("-c", _WITH_FAKE_TE)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(proc.stdout.split("ROWS ", 1)[1])
    te, sdpa, op = rows
    assert te["te_backend"] == "unknown (TransformerEngine's selection state not found)" and te["vs_te"] == 1.0
    assert all(row["reference"] == "te" and row["equal"] for row in rows)
    assert max(sdpa["rel_l2"].values()) < 1e-5 and max(op["rel_l2"].values()) < 1e-5


def test_ratios_and_the_table_against_te(capsys):
    base = dict(tokens=131072, heads=16, kv_heads=2, head_dim=128, pyramid="fixed", levels=3, S=24576)
    rows = [dict(base, variant="te", fwd_bwd_ms=20.0, peak_gib=3.0, te_backend="FusedAttention (cuDNN), sub-backend 1",
                 rel_l2=dict(out=0.0, dq=0.0, dk=0.0, dv=0.0), equal=True),
            dict(base, variant="auto", fwd_bwd_ms=21.0, peak_gib=3.1, kernel="cudnn",
                 rel_l2=dict(out=2e-3, dq=3e-3, dk=3e-3, dv=3e-3), equal=True),
            dict(base, variant="sdpa", fwd_bwd_ms=33.0, peak_gib=3.1, rel_l2=dict(out=2e-3, dq=3e-2, dk=3e-3, dv=3e-3),
                 equal=False),
            dict(base, tokens=1048576, variant="op", skipped="out of memory: CUDA out of memory.")]
    bench.ratios(rows)
    assert rows[1]["vs_te"] == pytest.approx(1.05) and rows[2]["vs_te"] == pytest.approx(1.65)
    assert "vs_te" not in rows[3]
    bench.print_table(rows)
    table = capsys.readouterr().out
    assert "| 131,072 | 16/2 | fixed L=3 | 24,576 | auto | 21.00 | 3.10 | 1.05x | 2.0e-03 | 3.0e-03 | 3.0e-03 | " \
           "3.0e-03 | cudnn |" in table
    assert "| 1,048,576 | 16/2 | fixed L=3 | 24,576 | op | out of memory: CUDA out of memory. |" in table
    assert "1 rows outside: 131072 16/2 sdpa" in table
