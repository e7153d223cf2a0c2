"""Context-parallel Lighthouse attention: equality under the real backend, then strong scaling of one layer.

Run once per CP size ``W`` with one process per GPU (``W = 1`` and ``W = --max-cp``). Every run computes the same
thing: the sequence cut into ``2 * max_cp`` chunks, each selected alone with ``topk / (2 * max_cp)``, one causal
attention over the chunk subsequences (``W = 1``: ``lighthouse_attention(..., chunks=2*max_cp)`` on one device;
``W = max_cp``: ``lighthouse_attention(..., cp_group=...)`` on the load-balanced shards). So the work is identical
and ``t1 / (W * tW)`` is the strong-scaling efficiency.

The attention on the subsequence (``--inner``):

* ``own`` (default): this package's :func:`cp_causal_attention` (one all-gather of K/V); torch and this package
  only, no megatron-core.
* ``te``: Megatron-Core's ``LighthouseCoreAttention`` built from this package's TransformerEngine layer spec, with
  ``TEDotProductAttention`` inside running TE's own context parallelism of ``--cp-comm-type`` (``p2p``, the
  default, ``all_gather``, ``a2a``; ``a2a+p2p`` with a p2p level of one rank). The dense method is the same module
  switched to dense (TE's ring on the whole sequence). Needs megatron-core and TransformerEngine, refused before
  any work without them; bf16 always (TE has no fp32 backend under CP). The backend TE ran is recorded per method.

1. Check (``W > 1``): indices, output and q/k/v gradients of the CP run against the single-process chunked run,
   for Lighthouse and for dense CP attention. ``own``: equal to the single-process run in the benchmark dtype and
   no less accurate than it against float32. ``te``: each rank's output and gradients within
   :data:`TE_BF16_REL_L2` of its shard of the float32 single-process result on the same bf16 inputs.
2. Timing: one Lighthouse attention layer forward+backward (default 1M tokens, B=1, H=8, D=128, k=2048, p=4, L=3)
   and dense causal attention on the same tokens (``W = 1``: SDPA, or TE without CP; ``W > 1``: the CP attention).
3. Ring step (``W > 1``), per method: one exchange of what the communication type sends, timed alone (``p2p``:
   this rank's K and V to the next rank and the previous rank's in, what one ring step sends; ``all_gather`` and
   ``own``: the all-gather of every rank's K and V; ``a2a``, ``a2a+p2p``: the all-to-all of q, k, v before the
   attention, not the one of the output after it), against SDPA's causal forward on this rank's ``S/W`` entries
   (the attention of one ring step: ``(S/W)**2 / 2`` pairs per head). Their ratio says whether the ring can hide
   its sends behind the attention; both are timed without the other running, so the overlap itself is not.

Prints a table; writes ``<out-dir>/<name>.json`` (:func:`result_name`: ``cp_<device>_w<W>``, with ``--inner te``
``cp_<device>_te_w1`` and ``cp_<device>_te_<comm>_w<W>``). The ``W > 1`` run reads the ``W = 1`` JSON of the same
``--out-dir`` and ``--inner`` for the efficiency.

GPU (benchmarks/run_cp_gpu.sh runs both; uses the installed package, or PYTHONPATH=$PWD:$PWD/kernels as there):
    python3 -m torch.distributed.run --standalone --nproc-per-node 1 benchmarks/bench_cp.py --max-cp 2
    python3 -m torch.distributed.run --standalone --nproc-per-node 2 benchmarks/bench_cp.py --max-cp 2
    ... --inner te --cp-comm-type all_gather       (TransformerEngine's CP inside the Megatron-Core module)
CPU logic check (gloo, tiny sizes):
    python -m torch.distributed.run --standalone --nproc-per-node 2 benchmarks/bench_cp.py --device cpu --tiny
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch.nn.attention import SDPBackend

from megatron_lighthouse import LighthouseConfig, cp_causal_attention, lighthouse_attention, select_indices
from megatron_lighthouse.attention import resolve_backend
from megatron_lighthouse.context_parallel import _all_gather
from megatron_lighthouse.cp_layout import cp_chunk_ids, split_for_cp
from megatron_lighthouse.dense import sdpa_causal
from megatron_lighthouse.lower_right_attention import kernel_family
from te_selection import te_backend  # benchmarks/, beside this script

#: The integer flags and their defaults: ``--max-cp`` is the largest CP size compared (every run uses ``2 * max_cp``
#: chunks); ``--check-seq-len`` and ``--check-dense-seq-len`` are the tokens of the Lighthouse and dense checks.
_INTS = dict(max_cp=2, seq_len=1 << 20, batch=1, heads=8, head_dim=128, topk=2048, pooling_factor=4, levels=3,
             iters=5, warmup=2, dense_iters=2, dense_warmup=1, check_seq_len=1 << 16, check_dense_seq_len=1 << 14)
#: ``--tiny``: smallest settings valid for ``2 * max_cp`` chunks (each chunk: budget 128, 1024 tokens).
_TINY = dict(heads=2, head_dim=16, pooling_factor=2, levels=3, iters=2, warmup=1, dense_iters=1, dense_warmup=1)
#: ``--inner`` values: this package's all-gather CP attention, or TransformerEngine's inside the Megatron module.
INNERS = ("own", "te")
#: ``--inner te``: largest relative L2 error of each rank's bf16 output and q/k/v gradients against its shard of
#: the float32 single-process result on the same bf16 inputs (also the dense check's). The selection is the same in
#: both (its scores run in fp32 on the same values); what differs is bf16 rounding of the pooled entries, of each
#: ring step's output and of the scattered result and gradients, each up to 2**-9 relative (about 1.1e-3 relative
#: L2 on random data). Measured over tests/fake_te.py's TE schedules (tests/test_te_cp_lighthouse.py, which uses
#: this bound): the single-process bf16 run 2.5e-3 to 5.8e-3, the CP runs 2.4e-3 to 4.2e-3 (out, dq, dk, dv; W=2
#: and 4; all comm types). 8e-3 leaves a factor 2 over the CP runs; a wrong chunk layout, budget or schedule is off
#: by more than 1e-1.
TE_BF16_REL_L2 = 8e-3


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """The command line; a bad or unavailable setting is one ``argparse`` error line (exit code 2) before any
    work: ``--cp-comm-type`` without ``--inner te`` or not one TE accepts, ``a2a`` with heads that the CP size does
    not divide, ``--inner te`` without megatron-core or TransformerEngine."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cuda runs bf16, cpu fp32 (bf16 with --inner te)")
    p.add_argument("--tiny", action="store_true", help="tiny sizes for a logic check (CPU)")
    for name, default in _INTS.items():
        p.add_argument("--" + name.replace("_", "-"), type=int, default=default)
    p.add_argument("--backend", default="auto", help="lighthouse_attention backend")
    p.add_argument("--inner", choices=INNERS, default="own",
                   help="the CP attention on the subsequence: own (this package's all-gather) or te "
                        "(LighthouseCoreAttention with TEDotProductAttention inside)")
    p.add_argument("--cp-comm-type", default=None,
                   help="with --inner te: TransformerEngine's CP communication (p2p, the default; all_gather; a2a; "
                        "a2a+p2p)")
    p.add_argument("--out-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = p.parse_args(argv)
    if args.tiny:
        n = 2048 * args.max_cp
        vars(args).update(_TINY, seq_len=n, check_seq_len=n, check_dense_seq_len=n, topk=256 * args.max_cp)
    if args.inner == "te":
        for module, what in (("megatron.core", "megatron-core"), ("transformer_engine", "TransformerEngine")):
            if _missing(module):
                p.error(f"--inner te: {what} is not importable here ({module}); install it (pip install -e "
                        f"'.[te]' for TransformerEngine), or run the default --inner own")
        from megatron_lighthouse.causal_core_attention import check_cp_comm_type

        args.cp_comm_type = args.cp_comm_type or "p2p"
        try:
            check_cp_comm_type(args.cp_comm_type, args.max_cp, "--cp-comm-type")
        except ValueError as err:
            p.error(str(err))
        if args.cp_comm_type.startswith("a2a") and args.heads % args.max_cp:
            p.error(f"--cp-comm-type {args.cp_comm_type} with --heads {args.heads}: TE's all-to-all splits the heads "
                    f"over the CP ranks, so --max-cp {args.max_cp} must divide them")
    elif args.cp_comm_type is not None:
        p.error(f"--cp-comm-type {args.cp_comm_type}: only with --inner te (--inner own is one all-gather)")
    args.dtype = "bf16" if args.device == "cuda" or args.inner == "te" else "fp32"
    return args


def _missing(module: str) -> bool:
    """``module`` cannot be found (or its parent package fails to import)."""
    try:
        return importlib.util.find_spec(module) is None
    except ImportError:
        return True


def result_name(device: str, inner: str, cp_comm_type: Optional[str], world: int) -> str:
    """The JSON's name (no extension): ``cp_<device>_w<W>`` (``own``), ``cp_<device>_te_w1`` and
    ``cp_<device>_te_<comm>_w<W>`` (the ``W = 1`` run has no CP communication)."""
    if inner == "own":
        return f"cp_{device}_w{world}"
    return f"cp_{device}_te_w1" if world == 1 else f"cp_{device}_te_{cp_comm_type}_w{world}"


# ---------------------------------------------------------------------------------------------------- helpers
def _rel_l2(got: torch.Tensor, want: torch.Tensor, group) -> Tuple[float, float]:
    """Relative L2 errors over the group: ``(whole sequence, worst rank)``; the whole-sequence one from every rank's
    squared norms summed, the worst rank's from each rank's shard alone."""
    sums = torch.stack([(got.double() - want.double()).square().sum(), want.double().square().sum()]).cpu()
    mine = (sums[0].sqrt() / sums[1].sqrt()).reshape(1)
    device = _collective_device(group, got.device)
    total, worst = sums.to(device), mine.to(device)
    dist.all_reduce(total, group=group)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX, group=group)
    return (total[0].sqrt() / total[1].sqrt()).item(), worst.item()


def _collective_device(group, device: torch.device) -> torch.device:
    """Where ``group``'s collectives take tensors: the CPU under gloo, else ``device``."""
    return torch.device("cpu") if dist.get_backend(group) == "gloo" else device


def _inputs(args: argparse.Namespace, n: int, seed: int) -> List[torch.Tensor]:
    """q, k, v, dout ``[B, n, H, D]`` float32 on CPU, identical on every rank."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(args.batch, n, args.heads, args.head_dim, generator=gen) for _ in range(4)]


def _fwd_bwd(fn: Callable, q, k, v, dout) -> List[torch.Tensor]:
    """``[out, dq, dk, dv]`` of ``fn(q, k, v)`` with upstream gradient ``dout``."""
    q, k, v = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
    out = fn(q, k, v)
    out.backward(dout)
    return [out.detach(), q.grad, k.grad, v.grad]


def _lighthouse(args: argparse.Namespace, **kwargs) -> Callable:
    """``lighthouse_attention`` on ``[B, N, H, D]`` with the benchmark's settings and ``kwargs``."""
    settings = dict(levels=args.levels, pooling_factor=args.pooling_factor, topk=args.topk, backend=args.backend)
    return lambda q, k, v: lighthouse_attention(q, k, v, **settings, **kwargs)


def _dense(group: Optional[dist.ProcessGroup], scale: float) -> Callable:
    """Dense causal attention on ``[B, H, S, D]``: SDPA on one device, :func:`cp_causal_attention` over ``group``."""
    return lambda q, k, v: sdpa_causal(q, k, v, scale) if group is None else cp_causal_attention(q, k, v, scale, group)


def own_layers(args: argparse.Namespace, group) -> Dict[str, Callable]:
    """``--inner own``: ``lighthouse`` (``[B, N, H, D]``) and ``dense`` (``[B, H, N, D]``) on this rank's tokens;
    ``W = 1`` (``group`` of one): the chunked single-device run and SDPA."""
    single = dist.get_world_size(group) == 1
    return dict(lighthouse=_lighthouse(args, chunks=2 * args.max_cp) if single else _lighthouse(args, cp_group=group),
                dense=_dense(None if single else group, args.head_dim**-0.5))


# ---------------------------------------------------------------------------------------------------- TE inner
def te_core_attentions(args: argparse.Namespace, world: int, device: torch.device, dtype: torch.dtype):
    """``(lighthouse, dense)``: two ``LighthouseCoreAttention`` modules built from this package's TE layer spec
    (Megatron's model-parallel state initialised with context-parallel size ``world``), ``TEDotProductAttention``
    inside with ``--cp-comm-type``; the second switched to dense (TE's attention on the whole sequence)."""
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.spec_utils import build_module

    from megatron_lighthouse.schedule import set_lighthouse_enabled
    from megatron_lighthouse.spec import get_gpt_layer_with_lighthouse_spec
    from megatron_lighthouse.transformer_config import LighthouseTransformerConfig

    lighthouse = LighthouseConfig(levels=args.levels, pooling_factor=args.pooling_factor, topk=args.topk,
                                  dense_layers=(), rope="tokens")  # q/k as they come: no rotary table here
    cfg = LighthouseTransformerConfig(
        num_layers=1, hidden_size=args.heads * args.head_dim, num_attention_heads=args.heads,
        kv_channels=args.head_dim, attention_dropout=0.0, hidden_dropout=0.0, bf16=dtype == torch.bfloat16,
        params_dtype=dtype, use_cpu_initialization=device.type == "cpu", lighthouse=lighthouse,
        context_parallel_size=world)
    spec = get_gpt_layer_with_lighthouse_spec(cfg, use_transformer_engine=True)
    modules = [build_module(spec.submodules.self_attention.submodules.core_attention, config=cfg, layer_number=1,
                            attn_mask_type=AttnMaskType.causal, attention_type="self", softmax_scale=None,
                            cp_comm_type=args.cp_comm_type, pg_collection=None).to(device) for _ in range(2)]
    set_lighthouse_enabled(modules[1], False)
    return modules


def _sbhd(module, seq_dim: int) -> Callable:
    """``module`` (Megatron's core-attention contract, ``[S, B, H, D]`` -> ``[S, B, H*D]``) on q/k/v with the
    sequence at ``seq_dim`` (1: ``[B, S, H, D]``, 2: ``[B, H, S, D]``), the output in the same layout."""
    from megatron.core.transformer.enums import AttnMaskType

    def attend(q, k, v):
        to_sbhd = (lambda x: x.transpose(0, 1)) if seq_dim == 1 else (lambda x: x.permute(2, 0, 1, 3))
        s, b, h, d = to_sbhd(q).shape
        out = module(*(to_sbhd(x) for x in (q, k, v)), None, attn_mask_type=AttnMaskType.causal).view(s, b, h, d)
        return out.transpose(0, 1) if seq_dim == 1 else out.permute(1, 2, 0, 3)

    return attend


def te_layers(args: argparse.Namespace, modules) -> Dict[str, Callable]:
    """``--inner te``: ``lighthouse`` (``[B, N, H, D]``) and ``dense`` (``[B, H, N, D]``) through the modules of
    :func:`te_core_attentions`. ``W = 1``: the chunked single-device run (``chunks=2*max_cp``) with the module's
    TE attention as its dense kernel, so that its work is the CP run's."""
    lighthouse, dense = modules
    if lighthouse.cp_group is None:
        one = _lighthouse(args, chunks=2 * args.max_cp, attention=lighthouse._subsequence_attention)
    else:
        one = _sbhd(lighthouse, 1)
    return dict(lighthouse=one, dense=_sbhd(dense, 2))


# ---------------------------------------------------------------------------------------------------- check
def _check_case(name: str, single: Callable, cp: Callable, full: List[torch.Tensor], seq_dim: int, group,
                device: torch.device, dtype: torch.dtype, inner: str) -> List[Dict]:
    """Errors of ``cp`` on this rank's shard of ``full`` (q, k, v, dout) against ``single`` on the whole sequence,
    in ``dtype`` and in float32 (from the same rounded inputs: same selection, only the arithmetic differs)."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    rounded = [x.to(device, dtype) for x in full]

    def shard(xs):
        return [split_for_cp(x, rank, world, seq_dim) for x in xs]

    same, exact = shard(_fwd_bwd(single, *rounded)), shard(_fwd_bwd(single, *(x.float() for x in rounded)))
    rows = []
    for field, g, s, e in zip(("out", "dq", "dk", "dv"), _fwd_bwd(cp, *shard(rounded)), same, exact):
        (vs_same, _), (vs_fp32, worst_rank_vs_fp32) = _rel_l2(g, s, group), _rel_l2(g, e, group)
        single_vs_fp32, _ = _rel_l2(s, e, group)
        if inner == "te":  # each rank's shard within the bf16 bound of the float32 result
            ok = worst_rank_vs_fp32 <= TE_BF16_REL_L2
        elif dtype != torch.float32:  # equal to the single-process run to the dtype's rounding, no less accurate
            ok = vs_same < 2e-2 and vs_fp32 <= 2 * single_vs_fp32 + 1e-3
        else:
            ok = vs_same < 1e-5
        rows.append(dict(case=name, field=field, cp_vs_single=vs_same, cp_vs_fp32=vs_fp32,
                         worst_rank_vs_fp32=worst_rank_vs_fp32, single_vs_fp32=single_vs_fp32, passed=bool(ok)))
    return rows


def run_check(args: argparse.Namespace, group, device: torch.device, dtype: torch.dtype,
              layers: Dict[str, Callable]) -> Dict:
    """Indices, output and gradients of the CP run (``layers``' ``lighthouse``) against the single-process chunked
    run; dense CP attention (``layers``' ``dense``) against SDPA."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    n, pyramid = args.check_seq_len, dict(levels=args.levels, pooling_factor=args.pooling_factor)
    full = _inputs(args, n, seed=1)
    want = select_indices(*(x.to(device, dtype) for x in full[:2]), **pyramid, topk=args.topk, chunks=2 * world)
    got = select_indices(*(split_for_cp(x, rank, world).to(device, dtype) for x in full[:2]), **pyramid,
                         topk=args.topk // world, chunks=2)
    indices_equal = all(torch.equal(got[:, i], want[:, c]) for i, c in enumerate(cp_chunk_ids(rank, world)))
    rows = _check_case(f"lighthouse N={n}", _lighthouse(args, chunks=2 * world), layers["lighthouse"], full, 1, group,
                       device, dtype, args.inner)
    n, scale = args.check_dense_seq_len, args.head_dim**-0.5
    full = [x.transpose(1, 2) for x in _inputs(args, n, seed=2)]  # [B, H, n, D]
    rows += _check_case(f"dense N={n}", _dense(None, scale), layers["dense"], full, 2, group, device, dtype,
                        args.inner)

    flag = torch.tensor([int(indices_equal)], device=_collective_device(group, device))
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
    indices_equal = bool(flag.item())
    return dict(indices_equal=indices_equal, rows=rows, passed=indices_equal and all(r["passed"] for r in rows))


# ---------------------------------------------------------------------------------------------------- timing
def time_step(step: Callable[[], None], warmup: int, iters: int, device: torch.device, group) -> Dict:
    """Seconds per call of ``step`` (the slowest rank of ``group`` each iteration); peak memory (largest rank)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None  # the current device: this rank's
    elapsed = []
    for _ in range(warmup + iters):
        dist.barrier(group=group)
        sync()
        start = time.perf_counter()
        step()
        sync()
        elapsed.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    stats = torch.tensor([*elapsed[warmup:], peak / 2**30], dtype=torch.float64,
                         device=_collective_device(group, device))
    dist.all_reduce(stats, op=dist.ReduceOp.MAX, group=group)
    *times, peak_gib = stats.tolist()
    return dict(median_s=statistics.median(times), min_s=min(times), times_s=times, peak_gib=peak_gib)


def _method_shapes(args: argparse.Namespace, world: int) -> Dict[str, Tuple[tuple, int, int, int]]:
    """Per method: this rank's q/k/v shape (the sequence at dim 1 for Lighthouse, 2 for dense), warm-up and timed
    iterations."""
    b, n, h, d = args.batch, args.seq_len // world, args.heads, args.head_dim
    return dict(lighthouse=((b, n, h, d), args.warmup, args.iters), dense=((b, h, n, d), args.dense_warmup,
                                                                          args.dense_iters))


def run_timing(args: argparse.Namespace, group, device: torch.device, dtype: torch.dtype,
               layers: Dict[str, Callable]) -> Dict:
    """Each method of ``layers`` forward+backward on this rank's tokens; a method that runs out of memory is
    reported as such. ``--inner te``: the TE backend each method ran."""
    gen = torch.Generator(device=device).manual_seed(100 + dist.get_rank())

    def timed(layer: Callable, shape: tuple, warmup: int, iters: int) -> Dict:
        q, k, v, dout = (torch.randn(*shape, generator=gen, device=device, dtype=dtype) for _ in range(4))
        q, k, v = (x.requires_grad_(True) for x in (q, k, v))

        def step():
            for x in (q, k, v):
                x.grad = None
            layer(q, k, v).backward(dout)

        try:
            result = time_step(step, warmup, iters, device, group)
        except torch.cuda.OutOfMemoryError as err:
            return dict(error=f"out of memory: {err}".splitlines()[0])
        return dict(result, te_backend=te_backend()) if args.inner == "te" else result

    # one method's tensors are freed before the next one's are made
    shapes = _method_shapes(args, dist.get_world_size(group))
    return {method: timed(layer, *shapes[method]) for method, layer in layers.items()}


def _exchange(args: argparse.Namespace, group) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]:
    """One exchange of the CP communication type on ``[B, H, S, D]`` q/k/v (see the module docstring)."""
    comm = args.cp_comm_type or "all_gather"  # --inner own: cp_causal_attention's all-gather
    world, rank = dist.get_world_size(group), dist.get_rank(group)

    def exchange(q, k, v):
        if comm == "p2p":
            kv = torch.stack((k, v))
            recv = torch.empty_like(kv)
            ops = [dist.P2POp(dist.isend, kv, dist.get_global_rank(group, (rank + 1) % world), group),
                   dist.P2POp(dist.irecv, recv, dist.get_global_rank(group, (rank - 1) % world), group)]
            for request in dist.batch_isend_irecv(ops):
                request.wait()
        elif comm == "all_gather":
            _all_gather(torch.stack((k, v)), group)  # cp_causal_attention's own all-gather
        else:  # a2a, a2a+p2p: q, k, v scattered by heads, gathered by sequence
            qkv = torch.stack((q, k, v)).reshape(-1)
            dist.all_to_all_single(torch.empty_like(qkv), qkv, group=group)

    return exchange


def run_ring_step(args: argparse.Namespace, cfg: LighthouseConfig, group, device: torch.device,
                  dtype: torch.dtype) -> Dict:
    """Per method (``W > 1``): one exchange of the CP communication alone and SDPA's causal forward on this rank's
    ``S/W`` entries (one ring step's attention), their times (slowest rank) and ratio."""
    world = dist.get_world_size(group)
    entries = dict(lighthouse=cfg.subsequence_length(args.seq_len, 2 * args.max_cp) // world,
                   dense=args.seq_len // world)
    gen = torch.Generator(device=device).manual_seed(200)
    exchange, scale, out = _exchange(args, group), args.head_dim**-0.5, {}
    for method, n in entries.items():
        warmup, iters = _method_shapes(args, world)[method][1:]
        q, k, v = (torch.randn(args.batch, args.heads, n, args.head_dim, generator=gen, device=device, dtype=dtype)
                   for _ in range(3))
        try:
            send = time_step(lambda: exchange(q, k, v), warmup, iters, device, group)
            attend = time_step(lambda: sdpa_causal(q, k, v, scale), warmup, iters, device, group)
        except torch.cuda.OutOfMemoryError as err:
            out[method] = dict(error=f"out of memory: {err}".splitlines()[0])
            continue
        finally:
            del q, k, v
        out[method] = dict(entries=n, exchange_s=send["median_s"], attention_s=attend["median_s"],
                           ratio=send["median_s"] / attend["median_s"])
    return out


def kernel_choices(args: argparse.Namespace, cfg: LighthouseConfig, device: torch.device,
                   dtype: torch.dtype) -> Dict[str, str]:
    """SDPA's kernel for square causal attention on one CP chunk (the block the CP attention runs), per method."""
    chunks = 2 * args.max_cp
    lengths = dict(lighthouse=cfg.subsequence_length(args.seq_len, chunks) // chunks, dense=args.seq_len // chunks)
    out = {}
    for method, n in lengths.items():
        x = torch.empty(args.batch, args.heads, n, args.head_dim, device=device, dtype=dtype, requires_grad=True)
        choice = torch._fused_sdp_choice(x, x, x, is_causal=True, scale=args.head_dim**-0.5)
        out[method] = f"{SDPBackend(choice).name} (cp blocks: {kernel_family(x, x, x, args.head_dim**-0.5)})"
    return out


# ---------------------------------------------------------------------------------------------------- report
def load_baseline(record: Dict, out_dir: str) -> Tuple[Optional[Dict], Dict[str, float]]:
    """The ``W = 1`` run of the same settings in ``out_dir`` and ``t1 / (W * tW)`` per method against it;
    ``(None, {})`` at ``W = 1`` or before the ``W = 1`` run wrote its JSON."""
    settings = record["settings"]
    path = os.path.join(out_dir, result_name(settings["device"], settings["inner"], None, 1) + ".json")
    if record["world"] == 1 or not os.path.exists(path):
        return None, {}
    with open(path) as f:
        base = json.load(f)
    if base["settings"] != settings:
        raise SystemExit(f"baseline {path} has other settings: {base['settings']}")
    t1 = {method: res["median_s"] for method, res in base["results"].items() if "median_s" in res}
    efficiency = {method: t1[method] / (record["world"] * res["median_s"])
                  for method, res in record["results"].items() if "median_s" in res and method in t1}
    return dict(path=path, date=base["date"], device_name=base["device_name"], results=base["results"]), efficiency


def print_report(record: Dict) -> None:
    """The check, timing and ring-step tables of ``record``."""
    s = record["settings"]
    inner = "own all-gather" if s["inner"] == "own" else f"TransformerEngine, cp_comm_type {record['cp_comm_type']}"
    if "check" in record:
        chk = record["check"]
        print(f"\nequality check (W={record['world']}, {s['dtype']}, {inner}): indices equal: "
              f"{chk['indices_equal']}; passed: {chk['passed']}"
              + (f" (each rank within {TE_BF16_REL_L2:g} of fp32)" if s["inner"] == "te" else ""))
        print(f"{'case':<22}{'field':<7}{'cp vs single':>14}{'cp vs fp32':>12}{'worst rank':>12}{'single vs fp32':>16}"
              "  ok")
        for r in chk["rows"]:
            print(f"{r['case']:<22}{r['field']:<7}{r['cp_vs_single']:>14.2e}{r['cp_vs_fp32']:>12.2e}"
                  f"{r['worst_rank_vs_fp32']:>12.2e}{r['single_vs_fp32']:>16.2e}  {'yes' if r['passed'] else 'NO'}")
    print(f"\nlighthouse backend: {record['lighthouse_backend']}; SDPA kernel for one causal chunk: "
          + "; ".join(f"{m}: {k}" for m, k in record["kernels"].items()))
    print(f"\nfwd+bwd of one attention layer ({inner}): {s['seq_len']} tokens, B={s['batch']} H={s['heads']} "
          f"D={s['head_dim']} k={s['topk']} p={s['pooling_factor']} L={s['levels']} chunks={2 * s['max_cp']}, "
          f"{s['dtype']}, {record['device_name']}")
    print(f"{'method':<12}{'W':>3}{'median ms':>12}{'min ms':>10}{'peak GiB':>10}{'t1/(W*tW)':>11}"
          + ("  TE backend" if s["inner"] == "te" else ""))
    for method, res in record["results"].items():
        if "error" in res:
            print(f"{method:<12}{record['world']:>3}  {res['error']}")
            continue
        eff = record["efficiency"].get(method)
        print(f"{method:<12}{record['world']:>3}{res['median_s'] * 1e3:>12.1f}{res['min_s'] * 1e3:>10.1f}"
              f"{res['peak_gib']:>10.2f}{'' if eff is None else f'{eff:.1%}':>11}"
              + (f"  {res['te_backend']}" if "te_backend" in res else ""))
    dense, light = record["results"]["dense"], record["results"]["lighthouse"]
    if "median_s" in dense and "median_s" in light:
        print(f"lighthouse speedup over dense at W={record['world']}: {dense['median_s'] / light['median_s']:.1f}x")
    if "ring_step" in record:
        print(f"\nring step ({record['cp_comm_type'] or 'all_gather'} exchange alone vs SDPA causal forward on "
              f"this rank's S/W entries)")
        print(f"{'method':<12}{'S/W':>10}{'exchange ms':>13}{'attention ms':>14}{'ratio':>8}")
        for method, res in record["ring_step"].items():
            if "error" in res:
                print(f"{method:<12}  {res['error']}")
            else:
                print(f"{method:<12}{res['entries']:>10}{res['exchange_s'] * 1e3:>13.3f}{res['attention_s'] * 1e3:>14.3f}"
                      f"{res['ratio']:>8.2f}")


def measure(args: argparse.Namespace, group, device: torch.device) -> Dict:
    """Everything of one run on the ranks of ``group`` (their CP group; with ``--inner te`` Megatron's
    model-parallel state is initialised with that context-parallel size): the record :func:`main` prints and
    writes, without the baseline."""
    world = dist.get_world_size(group)
    if world not in (1, args.max_cp):
        raise SystemExit(f"CP size {world}: run with 1 or --max-cp={args.max_cp} processes (same chunked work)")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    cfg = LighthouseConfig(levels=args.levels, pooling_factor=args.pooling_factor, topk=args.topk)
    cfg.validate(args.seq_len, 2 * args.max_cp)
    record = dict(
        date=datetime.date.today().isoformat(), command=" ".join([os.path.basename(sys.executable), *sys.argv]),
        world=world, device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        torch=torch.__version__, cp_comm_type=args.cp_comm_type,
        settings=dict(seq_len=args.seq_len, batch=args.batch, heads=args.heads, head_dim=args.head_dim,
                      topk=args.topk, pooling_factor=args.pooling_factor, levels=args.levels, max_cp=args.max_cp,
                      dtype=args.dtype, backend=args.backend, device=args.device, inner=args.inner),
    )
    if args.inner == "te":
        import transformer_engine

        record["transformer_engine"] = getattr(transformer_engine, "__version__", "unknown")
        layers = te_layers(args, te_core_attentions(args, world, device, dtype))
    else:
        layers = own_layers(args, group)
    record["lighthouse_backend"] = resolve_backend(args.backend, torch.empty(0, device=device))
    record["kernels"] = kernel_choices(args, cfg, device, dtype)
    if world > 1:
        record["check"] = run_check(args, group, device, dtype, layers)
    record["results"] = run_timing(args, group, device, dtype, layers)
    if world > 1:
        record["ring_step"] = run_ring_step(args, cfg, group, device, dtype)
    return record


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device (use --device cpu --tiny for a logic check)")
    if "RANK" not in os.environ:  # plain `python bench_cp.py`: a group of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29511")
    if args.device == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    if args.inner == "te":
        from megatron.core import parallel_state
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        world = dist.get_world_size()
        parallel_state.initialize_model_parallel(context_parallel_size=world,
                                                 hierarchical_context_parallel_sizes=[world, 1])
        if device.type == "cuda":
            model_parallel_cuda_manual_seed(0)  # the RNG tracker TE modules are built with (no dropout here)
    record = measure(args, dist.group.WORLD, device)
    record["baseline"], record["efficiency"] = load_baseline(record, args.out_dir)
    if dist.get_rank() == 0:
        print_report(record)
        os.makedirs(args.out_dir, exist_ok=True)
        path = os.path.join(args.out_dir, result_name(args.device, args.inner, args.cp_comm_type, record["world"])
                            + ".json")
        with open(path, "w") as f:
            json.dump(record, f, indent=1)
        print(f"wrote {path}")
    dist.barrier()  # tear down together
    dist.destroy_process_group()
    return 0 if record.get("check", {}).get("passed", True) else 1


if __name__ == "__main__":
    code = main()
    # Leave without C++ static destructors: under torchrun, torch's teardown of a gloo rank occasionally aborts the
    # finished process at interpreter exit ("terminate called without an active exception", seen in CI runs on
    # 2026-11-23 and 2026-12-01, after the report was written), which torchrun reports as a failed rank.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
