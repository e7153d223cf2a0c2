"""Cost model of Lighthouse attention under context parallelism: a prediction on paper, not a measurement.

Under CP of degree ``W`` each rank selects locally (no communication) and hands its ``S/W`` subsequence entries,
``S = LighthouseConfig.subsequence_length(N, chunks=2W)``, to TransformerEngine's ``p2p`` ring
(``AttnFuncWithCPAndKVP2P``, load-balanced causal layout). Per rank, B=1, bf16:

- forward: ``W`` attention steps; before each of the first ``W-1`` the rank posts the send of the K and V it holds
  to the next rank (``2 * S/W * kv_heads * head_dim * 2`` bytes) and the step's attention runs while it travels;
- backward: ``W`` steps, each overlapped with one send: K and V at the first, K, V and the accumulated dK, dV at
  the ``W-2`` middle ones (twice the bytes), dK and dV at the last;
- every step of either pass does the same work, ``(S/W)**2 / 2`` (query, key) pairs per head (the diagonal step
  is causal over both local chunks, the others are one chunk against two, unmasked).

A step costs ``max(compute, latency + bytes / bandwidth)``; communication hides while the ratio comm/compute stays
below 1. The ring is as slow as its slowest hop: NVLink while the CP group fits in one node, InfiniBand once it
spans nodes (``W > --gpus-per-node``). Alongside: the local steps (pool and score, selection, gather, scatter, on
``N/W`` tokens), the settings exchange (one all-gather of ``SETTINGS_ROW_BYTES`` per rank and call,
latency-bound), this package's own all-gather attention (``cp_causal_attention``: gather, attend, reduce-scatter,
nothing overlapped), and dense ring attention on the same ``N`` (``N/W`` tokens of K and V per step).

Calibration (one H200, ``--op-table``): the forward of dense causal cuDNN attention per (query, key) pair, head
and head-dim unit (median over the fixed pyramid's subsequence attentions), backward/forward from the dense
column, and the local steps' forward+backward per token at 1M. Other GPUs scale compute by the datasheet's dense
BF16 peak and the local steps by HBM bandwidth; links are datasheet leads. ``--calibration FILE`` replaces any
compute calibration input (e.g. by per-step times measured on the multi-GPU run), ``--nvlink-gbps``,
``--ib-gbps``, ``--tflops``, ``--nvlink-latency-us``, ``--ib-latency-us`` the leads (e.g. by measured bandwidths).
Pyramid: ``pooling_factor=4``, ``--levels`` (default ``LighthouseConfig.for_sequence(N)``), ``--topk``.

    PYTHONPATH=$PWD:$PWD/kernels python3 benchmarks/cp_cost_model.py --out-dir benchmarks/results
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import statistics
import sys
from typing import Dict, List, Optional, Sequence

from megatron_lighthouse.config import TILE_SELECT, LighthouseConfig
from megatron_lighthouse.context_parallel import SETTINGS_ROW_BYTES

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
BF16_BYTES = 2
#: The GPU of the one-GPU measurements the compute is calibrated on.
CALIBRATION_GPU = "H200"
#: The op table's Lighthouse point whose local steps (all but the attention) calibrate the local time per token.
LOCAL_CALIBRATION_N = 1 << 20


@dataclasses.dataclass(frozen=True)
class GPU:
    """Leads per GPU: NVLink and InfiniBand bandwidth per GPU in one direction (GB/s), dense BF16 peak (TFLOP/s),
    HBM bandwidth (TB/s) from datasheets; latency of one message on each link (us), typical of NCCL's small
    send/recv, not measured here."""

    nvlink_gbps: float
    ib_gbps: float
    tflops: float
    hbm_tbps: float
    nvlink_latency_us: float = 10.0
    ib_latency_us: float = 20.0


#: H100 / H200 SXM: NVLink 4, 900 GB/s both directions; B200 (HGX): NVLink 5, 1.8 TB/s; InfiniBand NDR, one
#: 400 Gb/s adapter per GPU; dense BF16 989 TFLOP/s (Hopper) and 2.25 PFLOP/s (B200); HBM 3.35 / 4.8 / 8 TB/s.
DATASHEET = {
    "H100": GPU(nvlink_gbps=450.0, ib_gbps=50.0, tflops=989.0, hbm_tbps=3.35),
    "H200": GPU(nvlink_gbps=450.0, ib_gbps=50.0, tflops=989.0, hbm_tbps=4.8),
    "B200": GPU(nvlink_gbps=900.0, ib_gbps=50.0, tflops=2250.0, hbm_tbps=8.0),
}
#: The command-line flags that replace a GPU's lead, ``--FLAG GPU=VALUE``, and the field each replaces.
OVERRIDES = {"--nvlink-gbps": "nvlink_gbps", "--ib-gbps": "ib_gbps", "--tflops": "tflops",
             "--nvlink-latency-us": "nvlink_latency_us", "--ib-latency-us": "ib_latency_us"}


@dataclasses.dataclass(frozen=True)
class Shape:
    """Attention heads, K/V heads (fewer with GQA), head dimension."""

    heads: int
    kv_heads: int
    head_dim: int

    @property
    def label(self) -> str:
        return f"{self.heads}x{self.head_dim}" + (f" GQA {self.kv_heads} kv" if self.kv_heads != self.heads else "")


@dataclasses.dataclass(frozen=True)
class Link:
    name: str
    gbps: float
    latency_us: float

    def seconds(self, nbytes: float) -> float:
        """Time of one message of ``nbytes``."""
        return self.latency_us * 1e-6 + nbytes / (self.gbps * 1e9)


@dataclasses.dataclass(frozen=True)
class Calibration:
    """Compute on the calibration GPU. ``attn_fwd_s``: seconds of causal attention forward per (query, key) pair,
    head and head-dim unit; ``bwd_over_fwd``: its backward time over its forward time; ``local_s_per_token``: the
    Lighthouse op's local steps (pool and score, selection, gather, scatter), forward+backward, per token."""

    attn_fwd_s: float
    bwd_over_fwd: float
    local_s_per_token: float
    sources: Dict[str, str]


def causal_pairs(n: float) -> float:
    """(query, key) pairs of causal attention over ``n`` positions; also those of one load-balanced ring step on
    ``n`` local positions."""
    return n * n / 2


def calibrate(op_table: Dict, path: str) -> Calibration:
    """The calibration inputs from ``bench_op.py``'s JSON (one GPU): medians over its points."""
    cfg = op_table["config"]
    unit = cfg["H"] * cfg["D"]
    fixed = [r for r in op_table["series"]["fixed"] if "dense_sub_ms" in r]
    dense = [r for r in op_table["series"]["dense"] if "fwd_bwd_ms" in r]
    if not fixed or not dense:
        raise SystemExit(f"--op-table {path}: needs the fixed series' dense_sub_ms and the dense series")
    fwd = statistics.median(r["dense_sub_ms"] * 1e-3 / (causal_pairs(r["S"]) * unit) for r in fixed)
    fwd_bwd = statistics.median(r["fwd_bwd_ms"] * 1e-3 / (causal_pairs(r["N"]) * unit) for r in dense)
    beta = fwd_bwd / fwd - 1
    point = next((r for r in fixed if r["N"] == LOCAL_CALIBRATION_N), None)
    if point is None:
        raise SystemExit(f"--op-table {path}: no fixed-pyramid point at N={LOCAL_CALIBRATION_N}")
    local = (point["fwd_bwd_ms"] - (1 + beta) * point["dense_sub_ms"]) * 1e-3 / point["N"]
    if local <= 0 or beta <= 0:
        raise SystemExit(f"--op-table {path}: inconsistent (backward/forward {beta:.2f}, local {local:.3g} s/token)")
    where = f"{os.path.basename(path)} ({op_table['gpu']}, {op_table['date']}, H={cfg['H']} D={cfg['D']} bf16)"
    return Calibration(
        attn_fwd_s=fwd, bwd_over_fwd=beta, local_s_per_token=local, sources=dict(
            attn_fwd_s=f"{where}: median over the fixed pyramid's {len(fixed)} points (S {fixed[0]['S']}-"
                       f"{fixed[-1]['S']}) of the forward of causal cuDNN attention on the subsequence",
            bwd_over_fwd=f"{where}: median of dense causal cuDNN forward+backward over {len(dense)} points "
                         f"(N {dense[0]['N']}-{dense[-1]['N']}) per pair, over attn_fwd_s, minus 1",
            local_s_per_token=f"{where}: the fixed pyramid's forward+backward at N={LOCAL_CALIBRATION_N} minus "
                              f"(1 + bwd_over_fwd) times its measured subsequence attention forward, per token"))


def load_calibration(op_table_path: str, override_path: Optional[str]) -> Calibration:
    """:func:`calibrate` on the op table; any field in the ``--calibration`` JSON replaces it (``"source"``: where
    those values come from)."""
    with open(op_table_path) as f:
        cal = calibrate(json.load(f), op_table_path)
    if override_path is None:
        return cal
    with open(override_path) as f:
        override = json.load(f)
    fields = {"attn_fwd_s", "bwd_over_fwd", "local_s_per_token"}
    values = {k: v for k, v in override.items() if k != "source"}
    if not values or set(values) - fields:
        raise SystemExit(f"--calibration {override_path}: give some of {sorted(fields)} (and a \"source\"), got "
                         f"{sorted(values)}")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in values.values()):
        raise SystemExit(f"--calibration {override_path}: values must be positive numbers, got {values}")
    source = f"{os.path.basename(override_path)}: {override.get('source', 'no source given')}"
    return dataclasses.replace(cal, **values, sources={**cal.sources, **{k: source for k in values}})


def least_valid_topk(topk: int, world: int) -> int:
    """The smallest budget ``>= topk`` valid at CP ``world``: each of the ``2W`` chunks needs a multiple of 128."""
    step = 2 * world * TILE_SELECT
    return -(-topk // step) * step


def kv_bytes(entries: int, shape: Shape) -> int:
    """Bytes of K and V (or dK and dV) over ``entries`` positions, B=1, bf16."""
    return 2 * entries * shape.kv_heads * shape.head_dim * BF16_BYTES


def ring(world: int, step_bytes: int, fwd_s: float, bwd_s: float, link: Link) -> Dict:
    """TE's p2p ring on one rank: every step's send overlapped with that step's attention (``fwd_s`` / ``bwd_s``).
    Forward: ``W-1`` sends of K, V. Backward: K, V; then K, V, dK, dV ``W-2`` times; then dK, dV."""
    fwd_sends = [step_bytes] * (world - 1)
    bwd_sends = [step_bytes] + [2 * step_bytes] * (world - 2) + [step_bytes]
    fwd = sum(max(fwd_s, link.seconds(b)) for b in fwd_sends) + fwd_s
    bwd = sum(max(bwd_s, link.seconds(b)) for b in bwd_sends)
    return dict(fwd_step_bytes=step_bytes, bwd_step_bytes=max(bwd_sends), fwd_comm_s=link.seconds(step_bytes),
                fwd_compute_s=fwd_s, bwd_comm_s=link.seconds(max(bwd_sends)), bwd_compute_s=bwd_s,
                fwd_ratio=link.seconds(step_bytes) / fwd_s, bwd_ratio=link.seconds(max(bwd_sends)) / bwd_s,
                fwd_s=fwd, bwd_s=bwd, exposed_s=fwd + bwd - world * (fwd_s + bwd_s))


def all_gather_attention(world: int, step_bytes: int, fwd_s: float, bwd_s: float, link: Link) -> float:
    """Forward+backward seconds of this package's ``cp_causal_attention``: one all-gather of K, V (each rank
    receives ``W-1`` shards), the rank's whole attention, then one reduce-scatter of dK, dV; nothing overlapped."""
    return 2 * link.seconds((world - 1) * step_bytes) + world * (fwd_s + bwd_s)


def attention_step_s(cal: Calibration, entries: int, shape: Shape, speed: float):
    """Forward and backward seconds of one ring step on ``entries`` local positions (``speed``: the GPU's compute
    over the calibration GPU's)."""
    fwd = cal.attn_fwd_s * causal_pairs(entries) * shape.heads * shape.head_dim / speed
    return fwd, cal.bwd_over_fwd * fwd


def hierarchical(world: int, entries: int, shape: Shape, cal: Calibration, speed: float, node: Link, across: Link,
                 gpus_per_node: int) -> Optional[Dict]:
    """TE's ``a2a+p2p`` with the all-to-all over the ``a = gpus_per_node`` GPUs of a node and the ring over the
    ``W/a`` nodes: the all-to-all (heads for positions; q, k, v and out forward, dout, dq, dk, dv backward,
    ``(a-1)/a`` of each, not overlapped) gives each GPU ``a * S/W`` positions of ``heads/a`` heads, so a ring step
    carries the flat ring's bytes for ``a`` times its attention. ``None`` where it does not apply (one node, or
    heads, K/V heads or ``W`` not divisible by ``a``)."""
    a = gpus_per_node
    if world <= a or world % a or shape.heads % a or shape.kv_heads % a:
        return None
    inner = Shape(shape.heads // a, shape.kv_heads // a, shape.head_dim)
    r = ring(world // a, kv_bytes(a * entries, inner), *attention_step_s(cal, a * entries, inner, speed), across)
    a2a_s = 2 * sum(node.seconds(entries * h * shape.head_dim * BF16_BYTES * (a - 1) / a)
                    for h in (shape.heads, shape.kv_heads, shape.kv_heads, shape.heads))
    return dict(a2a_size=a, ring=r, a2a_s=a2a_s, attention_s=a2a_s + r["fwd_s"] + r["bwd_s"])


def nvlink(gpu: GPU) -> Link:
    return Link("NVLink", gpu.nvlink_gbps, gpu.nvlink_latency_us)


def infiniband(gpu: GPU) -> Link:
    return Link("InfiniBand", gpu.ib_gbps, gpu.ib_latency_us)


def link_for(world: int, gpu: GPU, gpus_per_node: int) -> Link:
    """The ring's slowest hop: NVLink inside a node, InfiniBand once the group spans nodes."""
    return nvlink(gpu) if world <= gpus_per_node else infiniband(gpu)


def settings_exchange_s(world: int, link: Link) -> float:
    """:func:`check_cp_call`'s all-gather: ``SETTINGS_ROW_BYTES`` per rank, one collective, latency-bound."""
    return link.seconds(world * SETTINGS_ROW_BYTES)


def compute_speed(gpu: GPU) -> float:
    """The GPU's attention speed over the calibration GPU's: the ratio of their dense BF16 peaks."""
    return gpu.tflops / DATASHEET[CALIBRATION_GPU].tflops


def local_steps_s(cal: Calibration, tokens: int, gpu: GPU) -> float:
    """The local steps on ``tokens`` positions (memory-bound: scaled by HBM bandwidth)."""
    return cal.local_s_per_token * tokens * DATASHEET[CALIBRATION_GPU].hbm_tbps / gpu.hbm_tbps


def pyramid(seq_len: int, world: int, topk: int, levels: Optional[int]) -> LighthouseConfig:
    """The settings at CP ``world``: ``levels`` (default: ``for_sequence(N)``, the growing pyramid) and the least
    valid budget ``>= topk``; ``ValueError`` when ``seq_len`` does not fit them in ``2W`` chunks."""
    levels = LighthouseConfig.for_sequence(seq_len).levels if levels is None else levels
    cfg = LighthouseConfig(levels=levels, topk=least_valid_topk(topk, world))
    cfg.validate(seq_len, 2 * world)
    return cfg


def predict(seq_len: int, world: int, shape: Shape, gpu_name: str, gpu: GPU, cal: Calibration, topk: int,
            levels: Optional[int], gpus_per_node: int) -> Dict:
    """One row: Lighthouse under TE's ring, its settings exchange and local steps, this package's all-gather
    attention, and dense ring attention on the same tokens, per rank, on ``gpu`` at CP ``world``."""
    cfg = pyramid(seq_len, world, topk, levels)
    s = cfg.subsequence_length(seq_len, 2 * world)
    link, speed, entries = link_for(world, gpu, gpus_per_node), compute_speed(gpu), s // world
    steps = attention_step_s(cal, entries, shape, speed)
    light = ring(world, kv_bytes(entries, shape), *steps, link)
    dense = ring(world, kv_bytes(seq_len // world, shape), *attention_step_s(cal, seq_len // world, shape, speed),
                 link)
    hier = hierarchical(world, entries, shape, cal, speed, nvlink(gpu), infiniband(gpu), gpus_per_node)
    local_s, settings_s = local_steps_s(cal, seq_len // world, gpu), settings_exchange_s(world, link)
    around = local_s + settings_s
    return dict(
        seq_len=seq_len, shape=dataclasses.asdict(shape), gpu=gpu_name, cp=world, link=link.name, topk=cfg.topk,
        levels=cfg.levels, subsequence=s, entries_per_rank=entries, lighthouse=light, dense=dense, a2a_p2p=hier,
        local_s=local_s, settings_exchange_s=settings_s, settings_exchange_bytes=world * SETTINGS_ROW_BYTES,
        hides=light["fwd_ratio"] < 1 and light["bwd_ratio"] < 1, layer_p2p_s=around + light["fwd_s"] + light["bwd_s"],
        layer_all_gather_s=around + all_gather_attention(world, kv_bytes(entries, shape), *steps, link),
        layer_a2a_p2p_s=None if hier is None else around + hier["attention_s"],
        dense_layer_p2p_s=dense["fwd_s"] + dense["bwd_s"])


def check_against(run: Dict, cal: Calibration) -> List[Dict]:
    """The model against a ``bench_cp.py`` JSON (this package's all-gather attention, fixed settings): predicted
    and measured forward+backward of its Lighthouse and dense layers. Empty for a GPU the model does not know."""
    st, world = run["settings"], run["world"]
    gpu_name = next((name for name in DATASHEET if name in run["device_name"]), None)
    if gpu_name is None:
        return []
    gpu, shape = DATASHEET[gpu_name], Shape(st["heads"], st["heads"], st["head_dim"])
    cfg = LighthouseConfig(levels=st["levels"], pooling_factor=st["pooling_factor"], topk=st["topk"])
    n, speed = st["seq_len"], compute_speed(gpu)
    link = link_for(world, gpu, gpus_per_node=8)

    def attention(total: int) -> float:  # forward+backward over ``total`` positions spread over ``world`` ranks
        steps = attention_step_s(cal, total // world, shape, speed)
        return sum(steps) if world == 1 else all_gather_attention(world, kv_bytes(total // world, shape), *steps,
                                                                  link)

    around = local_steps_s(cal, n // world, gpu) + (settings_exchange_s(world, link) if world > 1 else 0.0)
    predicted = dict(lighthouse=around + attention(cfg.subsequence_length(n, 2 * st["max_cp"])), dense=attention(n))
    return [dict(run=f"{run['date']} {run['device_name']} W={world}", method=m, predicted_s=predicted[m],
                 measured_s=run["results"][m]["median_s"])
            for m in predicted if "median_s" in run["results"].get(m, {})]


# ---------------------------------------------------------------------------------------------------- command line
def _positive(kind: type, name: str):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name}: {text!r} is not a {kind.__name__}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{name}: {text!r} must be positive")
        return value
    return parse


def _shape(text: str) -> Shape:
    try:
        heads, kv_heads, head_dim = (int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shapes: {text!r} is not HEADS,KV_HEADS,HEAD_DIM") from None
    if min(heads, kv_heads, head_dim) < 1 or heads % kv_heads:
        raise argparse.ArgumentTypeError(f"--shapes: {text!r}: positive ints, HEADS a multiple of KV_HEADS")
    return Shape(heads, kv_heads, head_dim)


def _override(flag: str):
    def parse(text: str):
        name, _, value = text.partition("=")
        if name not in DATASHEET:
            raise argparse.ArgumentTypeError(f"{flag}: {text!r}: GPU must be one of {sorted(DATASHEET)} (NAME=VALUE)")
        return name, _positive(float, flag)(value)
    return parse


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The command line; a bad value, or a length the settings do not fit at some CP, is one argparse error."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq-lens", nargs="+", type=_positive(int, "--seq-lens"), default=[1 << 20, 1 << 22])
    p.add_argument("--cp", nargs="+", type=_positive(int, "--cp"), default=[2, 4, 8, 16, 32],
                   help="CP sizes W (>= 2)")
    p.add_argument("--shapes", nargs="+", type=_shape, default=[Shape(8, 8, 128), Shape(32, 8, 128)],
                   help="HEADS,KV_HEADS,HEAD_DIM (default: 8,8,128 and the GQA 32,8,128)")
    p.add_argument("--gpus", nargs="+", choices=sorted(DATASHEET), default=["H100", "H200", "B200"])
    p.add_argument("--topk", type=_positive(int, "--topk"), default=2048,
                   help="global budget; at CP W the model uses the least multiple of 256*W that is >= it")
    p.add_argument("--levels", type=_positive(int, "--levels"), default=None,
                   help="pyramid levels (default: LighthouseConfig.for_sequence(N), the growing pyramid)")
    p.add_argument("--gpus-per-node", type=_positive(int, "--gpus-per-node"), default=8,
                   help="GPUs of one node in one CP group (8/TP with Megatron's default rank order)")
    for flag in OVERRIDES:
        p.add_argument(flag, nargs="+", type=_override(flag), default=[], metavar="GPU=VALUE",
                       help="replace the lead (e.g. by a measured value)")
    p.add_argument("--op-table", default=os.path.join(RESULTS, "op_NVIDIA_H200.json"))
    p.add_argument("--calibration", default=None, help="JSON replacing compute calibration inputs")
    p.add_argument("--cp-runs", nargs="*", default=[os.path.join(RESULTS, f"cp_cuda_w{w}.json") for w in (1, 2)],
                   help="bench_cp.py JSONs to check the model against (missing files are skipped)")
    p.add_argument("--out-dir", default=RESULTS)
    args = p.parse_args(argv)
    if min(args.cp) < 2:
        p.error(f"--cp {min(args.cp)}: CP sizes must be >= 2 (no ring at 1)")
    try:
        LighthouseConfig(topk=args.topk, levels=args.levels or 3)
    except ValueError as err:
        p.error(str(err))
    for n in args.seq_lens:
        for world in args.cp:
            try:
                pyramid(n, world, args.topk, args.levels)
            except ValueError as err:
                p.error(f"--seq-lens {n} at --cp {world}: {err}")
    gpus = {name: DATASHEET[name] for name in args.gpus}
    for flag, field in OVERRIDES.items():
        for name, value in getattr(args, flag[2:].replace("-", "_")):
            if name not in gpus:
                p.error(f"{flag} {name}={value:g}: {name} is not in --gpus")
            gpus[name] = dataclasses.replace(gpus[name], **{field: value})
    args.gpu_specs = gpus
    return args


def _fmt_ms(s: float) -> str:
    return f"{s * 1e3:,.2f}"


def print_report(record: Dict) -> None:
    cal = record["calibration"]
    print(f"calibration on {CALIBRATION_GPU}: attention forward {cal['attn_fwd_s']:.3e} s per (pair, head, dim) "
          f"({4 / cal['attn_fwd_s'] / 1e12:.0f} TFLOP/s at 4 FLOPs per pair and dim), backward/forward "
          f"{cal['bwd_over_fwd']:.2f}, local steps {cal['local_s_per_token'] * 1e9:.2f} ns per token")
    for key, text in cal["sources"].items():
        print(f"  {key}: {text}")
    print("GPUs (datasheet leads unless replaced): " + "; ".join(
        f"{n} NVLink {g['nvlink_gbps']:g} GB/s {g['nvlink_latency_us']:g} us, InfiniBand {g['ib_gbps']:g} GB/s "
        f"{g['ib_latency_us']:g} us, {g['tflops']:g} TFLOP/s, HBM {g['hbm_tbps']:g} TB/s"
        for n, g in record["gpus"].items()))
    head = (f"{'gpu':<5}{'CP':>3} {'link':<11}{'k':>5}{'L':>2}{'S/W':>7}{'KV MiB':>8}{'comm us':>9}{'attn us':>9}"
            f"{'fwd c/a':>8}{'bwd c/a':>8}{'hides':>6}{'local ms':>9}{'sync us':>8}{'p2p ms':>8}{'exposed':>8}"
            f"{'a-g ms':>8}{'h c/a':>7}{'h ms':>7} | {'dense KV MiB':>12}{'fwd c/a':>8}{'p2p ms':>11}")
    print("per rank: 'comm us'/'attn us' one forward ring step's send and attention, 'c/a' their ratio (bwd: a "
          "middle step, K, V, dK, dV), 'hides' both < 1; 'local ms' the local steps on N/W tokens, 'sync us' the "
          "settings exchange; attention layer fwd+bwd ms with TE's p2p ring ('exposed': its ring time not hidden), "
          "this package's all-gather ('a-g'), TE's a2a+p2p across nodes ('h', with its ring's fwd 'c/a')")
    groups: Dict[tuple, List[Dict]] = {}
    for row in record["rows"]:
        groups.setdefault((row["seq_len"], Shape(**row["shape"]).label), []).append(row)
    for (n, label), rows in groups.items():
        print(f"\nN = {n:,} tokens, {label}, B=1, bf16; per rank, per ring step (forward) and per layer fwd+bwd")
        print(head)
        for r in rows:
            lh, de, hi = r["lighthouse"], r["dense"], r["a2a_p2p"]
            print(f"{r['gpu']:<5}{r['cp']:>3} {r['link']:<11}{r['topk']:>5}{r['levels']:>2}{r['entries_per_rank']:>7}"
                  f"{lh['fwd_step_bytes'] / 2**20:>8.2f}{lh['fwd_comm_s'] * 1e6:>9.1f}{lh['fwd_compute_s'] * 1e6:>9.1f}"
                  f"{lh['fwd_ratio']:>8.2f}{lh['bwd_ratio']:>8.2f}{'yes' if r['hides'] else 'no':>6}"
                  f"{_fmt_ms(r['local_s']):>9}{r['settings_exchange_s'] * 1e6:>8.0f}{_fmt_ms(r['layer_p2p_s']):>8}"
                  f"{_fmt_ms(lh['exposed_s']):>8}{_fmt_ms(r['layer_all_gather_s']):>8}"
                  + (f"{'':>7}{'':>7}" if hi is None else
                     f"{hi['ring']['fwd_ratio']:>7.2f}{_fmt_ms(r['layer_a2a_p2p_s']):>7}") + " | "
                  f"{de['fwd_step_bytes'] / 2**20:>12.1f}{de['fwd_ratio']:>8.2f}{_fmt_ms(r['dense_layer_p2p_s']):>11}")
    print("\nwhere the ring stops hiding (comm/compute >= 1 in either pass):")
    for line in record["crossovers"]:
        print("  " + line)
    if record["checks"]:
        print("\nthe model against measured CP runs (this package's all-gather attention):")
        for c in record["checks"]:
            print(f"  {c['run']} {c['method']:<10} predicted {_fmt_ms(c['predicted_s'])} ms, measured "
                  f"{_fmt_ms(c['measured_s'])} ms ({c['predicted_s'] / c['measured_s'] - 1:+.1%})")


def crossovers(rows: List[Dict]) -> List[str]:
    """Per length, shape and GPU: the CP sizes at which the Lighthouse ring hides and those at which it does not."""
    groups: Dict[tuple, List[Dict]] = {}
    for r in rows:
        groups.setdefault((r["seq_len"], Shape(**r["shape"]).label, r["gpu"]), []).append(r)
    def hier_hides(r: Dict) -> bool:
        return r["a2a_p2p"] is not None and max(r["a2a_p2p"]["ring"]["fwd_ratio"], r["a2a_p2p"]["ring"]["bwd_ratio"]) < 1

    return [f"N={n:,} {label} {gpu}: p2p hides at CP {[r['cp'] for r in rs if r['hides']] or 'none'}, not at "
            f"{[r['cp'] for r in rs if not r['hides']] or 'none'}; a2a+p2p hides at "
            f"{[r['cp'] for r in rs if hier_hides(r)] or 'none'}" for (n, label, gpu), rs in groups.items()]


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    cal = load_calibration(args.op_table, args.calibration)
    rows = [predict(n, w, shape, name, gpu, cal, args.topk, args.levels, args.gpus_per_node)
            for n in args.seq_lens for shape in args.shapes for name, gpu in args.gpu_specs.items()
            for w in sorted(set(args.cp))]
    checks = []
    for path in args.cp_runs:
        if os.path.exists(path):
            with open(path) as f:
                checks += check_against(json.load(f), cal)
    record = dict(
        date=datetime.date.today().isoformat(), command=" ".join(["cp_cost_model.py", *sys.argv[1:]]),
        note="a prediction on paper from one-GPU calibration and datasheet leads, not a measurement",
        calibration=dataclasses.asdict(cal), gpus={n: dataclasses.asdict(g) for n, g in args.gpu_specs.items()},
        settings_row_bytes=SETTINGS_ROW_BYTES, gpus_per_node=args.gpus_per_node,
        rows=rows, crossovers=crossovers(rows), checks=checks)
    print_report(record)
    os.makedirs(args.out_dir, exist_ok=True)
    path = os.path.join(args.out_dir, "cp_cost_model.json")
    with open(path, "w") as f:
        json.dump(record, f, indent=1)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
