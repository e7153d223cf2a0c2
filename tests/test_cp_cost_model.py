"""benchmarks/cp_cost_model.py: the ring's bytes against hand computation, its schedule, calibration, the writer and
the command line (CPU, no distributed)."""

from __future__ import annotations

import json

import pytest
import torch

from benchmark_utils import ROOT, load_benchmark
from megatron_lighthouse import LighthouseConfig
from megatron_lighthouse import context_parallel

model = load_benchmark("cp_cost_model")
OP_TABLE = ROOT / "benchmarks" / "results" / "op_NVIDIA_H200.json"
MHA, GQA = model.Shape(8, 8, 128), model.Shape(32, 8, 128)


@pytest.fixture(scope="module")
def cal():
    return model.load_calibration(str(OP_TABLE), None)


def _row(cal, world, shape=MHA, gpu="H100", n=1 << 20, **kw):
    kw = {"topk": 2048, "levels": None, "gpus_per_node": 8, **kw}
    return model.predict(n, world, shape, gpu, model.DATASHEET[gpu], cal, **kw)


def test_bytes_per_ring_step_by_hand(cal):
    # 1M tokens, growing pyramid L=4, p=4, k=2048: S = 2**20 / 4**3 + 3 * 4 * 2048 = 16384 + 24576 = 40960.
    row = _row(cal, 8)
    assert (row["levels"], row["topk"], row["subsequence"], row["entries_per_rank"]) == (4, 2048, 40960, 5120)
    kv = 2 * 5120 * 8 * 128 * 2  # K and V, 5120 entries, 8 K/V heads of 128, bf16
    assert kv == 20_971_520
    assert row["lighthouse"]["fwd_step_bytes"] == kv and row["lighthouse"]["bwd_step_bytes"] == 2 * kv  # + dK, dV
    assert row["dense"]["fwd_step_bytes"] == 2 * (2**20 // 8) * 8 * 128 * 2  # N/W tokens: 512 MiB
    assert _row(cal, 8, GQA)["lighthouse"]["fwd_step_bytes"] == kv  # GQA: 8 K/V heads travel, not 32
    assert row["link"] == "NVLink" and _row(cal, 16)["link"] == "InfiniBand"
    # CP 16: each of the 32 chunks needs a budget multiple of 128, so k = 4096 and S = 16384 + 12 * 4096.
    assert (_row(cal, 16)["topk"], _row(cal, 16)["subsequence"]) == (4096, 65536)
    assert row["settings_exchange_bytes"] == 8 * (10 * 8 + 1024)


def test_the_subsequence_is_the_configs(cal):
    for world in (2, 4, 8, 16, 32):
        row = _row(cal, world, n=1 << 22, levels=3)
        want = LighthouseConfig(levels=3, topk=row["topk"]).subsequence_length(1 << 22, 2 * world)
        assert row["subsequence"] == want and row["entries_per_rank"] * world == want


def test_more_cp_fewer_bytes_per_step(cal):
    for n in (1 << 20, 1 << 22):
        for shape in (MHA, GQA):
            rows = [_row(cal, w, shape, n=n) for w in (2, 4, 8, 16, 32)]
            for method in ("lighthouse", "dense"):
                sent = [r[method]["fwd_step_bytes"] for r in rows]
                assert sent == sorted(sent, reverse=True) and len(set(sent)) == len(sent)
            for r in rows:  # only the subsequence travels: S/N of the dense ring's bytes
                assert r["lighthouse"]["fwd_step_bytes"] * n == r["dense"]["fwd_step_bytes"] * r["subsequence"]
                assert r["subsequence"] < n / 8


def test_ratio_matches_the_closed_form(cal):
    # No latency: comm/compute = (4 (S/W) H_kv D / bw) / (a (S/W)^2 / 2 H D) = 8 W H_kv / (bw a S H).
    gpu = model.GPU(nvlink_gbps=450.0, ib_gbps=50.0, tflops=989.0, hbm_tbps=4.8, nvlink_latency_us=0.0)
    for shape in (MHA, GQA):
        row = model.predict(1 << 20, 8, shape, "H200", gpu, cal, 2048, None, 8)
        want = 8 * 8 * shape.kv_heads / (450e9 * cal.attn_fwd_s * row["subsequence"] * shape.heads)
        assert row["lighthouse"]["fwd_ratio"] == pytest.approx(want, rel=1e-12)
        assert row["lighthouse"]["bwd_ratio"] == pytest.approx(2 * want / cal.bwd_over_fwd, rel=1e-12)


def test_ring_schedule():
    link = model.Link("test", gbps=1.0, latency_us=0.0)  # 1 GB/s: 1e9 bytes take one second
    r = model.ring(3, 2_000_000_000, fwd_s=1.0, bwd_s=3.0, link=link)
    # forward: 2 sends of 2 s, each under a 1 s step, then the last step; backward: sends of 2, 4, 2 s under 3 s
    assert (r["fwd_s"], r["bwd_s"]) == (2 + 2 + 1, 3 + 4 + 3)
    assert r["exposed_s"] == pytest.approx(5 + 10 - 3 * 4)
    assert (r["fwd_ratio"], r["bwd_ratio"]) == (2.0, 4 / 3)
    two = model.ring(2, 1_000_000_000, fwd_s=2.0, bwd_s=2.0, link=link)
    assert (two["fwd_s"], two["bwd_s"], two["bwd_step_bytes"], two["exposed_s"]) == (4, 4, 1_000_000_000, 0)
    assert model.all_gather_attention(3, 1_000_000_000, 1.0, 3.0, link) == 2 * 2 + 3 * 4


def test_hides_inside_a_node_and_not_across(cal):
    for gpu in ("H100", "B200"):
        hides = {w: _row(cal, w, gpu=gpu)["hides"] for w in (2, 4, 8, 16, 32)}
        assert hides == {2: True, 4: True, 8: True, 16: False, 32: False}
        assert _row(cal, 16, gpu=gpu)["dense"]["fwd_ratio"] < 1  # the dense ring still hides there
    assert _row(cal, 16, gpus_per_node=16)["hides"]  # the same CP on one larger NVLink domain
    hier = _row(cal, 16)["a2a_p2p"]
    assert hier["a2a_size"] == 8 and hier["ring"]["fwd_step_bytes"] == _row(cal, 16)["lighthouse"]["fwd_step_bytes"]
    assert hier["ring"]["fwd_ratio"] == pytest.approx(_row(cal, 16)["lighthouse"]["fwd_ratio"] / 8, rel=0.05)
    assert _row(cal, 8)["a2a_p2p"] is None and _row(cal, 16, model.Shape(4, 4, 128))["a2a_p2p"] is None


def test_calibration_from_the_op_table(cal):
    table = json.loads(OP_TABLE.read_text())
    assert 5e-15 < cal.attn_fwd_s < 1e-14 and 2.0 < cal.bwd_over_fwd < 3.5 and 0 < cal.local_s_per_token < 5e-8
    dense_1m = next(r for r in table["series"]["dense"] if r["N"] == 1 << 20)["fwd_bwd_ms"] * 1e-3
    predicted = (1 + cal.bwd_over_fwd) * cal.attn_fwd_s * (1 << 40) / 2 * 8 * 128
    assert predicted == pytest.approx(dense_1m, rel=0.05)
    # a table where the attention takes exactly 1e-15 s per unit forward and 3e-15 fwd+bwd
    synthetic = dict(gpu="X", date="d", config=dict(H=2, D=4), series=dict(
        fixed=[dict(N=1 << 20, S=1000, dense_sub_ms=1e-12 * 500_000 * 8, fwd_bwd_ms=1e-12 * 500_000 * 8 * 3 + 1.0)],
        dense=[dict(N=2000, fwd_bwd_ms=3e-12 * 2_000_000 * 8)]))
    got = model.calibrate(synthetic, "synthetic.json")
    assert got.attn_fwd_s == pytest.approx(1e-15) and got.bwd_over_fwd == pytest.approx(2.0)
    assert got.local_s_per_token == pytest.approx(1e-3 / (1 << 20))
    with pytest.raises(SystemExit, match="no fixed-pyramid point"):
        model.calibrate({**synthetic, "series": {**synthetic["series"], "fixed": [
            {**synthetic["series"]["fixed"][0], "N": 4096}]}}, "t.json")


def test_calibration_file_replaces_inputs(cal, tmp_path):
    path = tmp_path / "measured.json"
    path.write_text(json.dumps({"attn_fwd_s": 2 * cal.attn_fwd_s, "source": "per-step times, 2 GPUs"}))
    got = model.load_calibration(str(OP_TABLE), str(path))
    assert got.attn_fwd_s == 2 * cal.attn_fwd_s and got.bwd_over_fwd == cal.bwd_over_fwd
    assert got.sources["attn_fwd_s"] == "measured.json: per-step times, 2 GPUs"
    assert _row(got, 8)["lighthouse"]["fwd_compute_s"] == pytest.approx(2 * _row(cal, 8)["lighthouse"]["fwd_compute_s"])
    for bad in ({"attn_fwd": 1.0}, {"bwd_over_fwd": -1.0}, {"source": "nothing"}):
        path.write_text(json.dumps(bad))
        with pytest.raises(SystemExit, match="--calibration"):
            model.load_calibration(str(OP_TABLE), str(path))


def test_the_check_against_the_measured_cp_runs(cal):
    results = ROOT / "benchmarks" / "results"
    checks = [c for w in (1, 2) for c in model.check_against(json.loads((results / f"cp_cuda_w{w}.json").read_text()),
                                                              cal)]
    assert [(c["run"].split()[-1], c["method"]) for c in checks] == [
        ("W=1", "lighthouse"), ("W=1", "dense"), ("W=2", "lighthouse"), ("W=2", "dense")]
    assert all(abs(c["predicted_s"] / c["measured_s"] - 1) < 0.15 for c in checks)
    assert model.check_against({"settings": {}, "world": 1, "device_name": "cpu"}, cal) == []


def test_settings_row_bytes_is_what_check_cp_call_gathers(monkeypatch):
    sent = []

    def gather(row, group):
        sent.append(row.numel())
        return row.unsqueeze(0)

    monkeypatch.setattr(context_parallel, "_collective_device", lambda group, like: torch.device("cpu"))
    monkeypatch.setattr(context_parallel, "_all_gather", gather)
    q = torch.zeros(1, 4096, 2, 16)
    context_parallel.check_cp_call(None, LighthouseConfig(), q, q, 0.25)
    assert sent == [context_parallel.SETTINGS_ROW_BYTES]


def test_main_prints_the_table_and_writes_json(tmp_path, capsys):
    assert model.main(["--seq-lens", "1048576", "--cp", "8", "16", "--shapes", "8,8,128", "--gpus", "H100", "B200",
                       "--ib-gbps", "B200=100", "--out-dir", str(tmp_path), "--cp-runs"]) == 0
    out = capsys.readouterr().out
    assert "N = 1,048,576 tokens, 8x128" in out and "p2p hides at CP [8], not at [16]" in out
    record = json.loads((tmp_path / "cp_cost_model.json").read_text())
    assert [(r["gpu"], r["cp"]) for r in record["rows"]] == [("H100", 8), ("H100", 16), ("B200", 8), ("B200", 16)]
    assert record["gpus"]["B200"]["ib_gbps"] == 100.0 and record["gpus"]["H100"]["ib_gbps"] == 50.0
    assert record["checks"] == [] and "not a measurement" in record["note"]
    assert set(record["calibration"]) == {"attn_fwd_s", "bwd_over_fwd", "local_s_per_token", "sources"}
    b200 = record["rows"][3]["lighthouse"]
    assert b200["fwd_comm_s"] == pytest.approx(20e-6 + b200["fwd_step_bytes"] / 100e9)


@pytest.mark.parametrize("argv, message", [
    (["--cp", "1", "8"], "CP sizes must be >= 2"),
    (["--cp", "0"], "must be positive"),
    (["--shapes", "8,3,128"], "HEADS a multiple of KV_HEADS"),
    (["--shapes", "8x128"], "is not HEADS,KV_HEADS,HEAD_DIM"),
    (["--ib-gbps", "A100=50"], "GPU must be one of"),
    (["--nvlink-gbps", "H100=-1"], "must be positive"),
    (["--tflops", "B200=2000", "--gpus", "H100"], "B200 is not in --gpus"),
    (["--topk", "2000"], "multiple of 128"),
    (["--seq-lens", "100000"], "--seq-lens 100000 at --cp 2"),
    (["--seq-lens", "1048576", "--levels", "9"], "at --cp"),
])
def test_bad_arguments_are_refused_naming_the_setting(argv, message, capsys):
    with pytest.raises(SystemExit) as err:
        model.parse_args(argv)
    assert err.value.code == 2 and message in capsys.readouterr().err
