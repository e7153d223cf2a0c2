"""Lighthouse under context parallelism with TransformerEngine's CP algorithms as the inner attention.

``LighthouseCoreAttention`` built from the TE layer spec hands its per-rank subsequence to Megatron's
``TEDotProductAttention`` over the fake TE (tests/fake_te.py), which gets Megatron's CP group, global ranks,
stream and ``cp_comm_type`` and runs TE's own schedule for it (p2p ring, all-gather, a2a; written from TE's
source, independent of this package). On 2 and 4 gloo ranks, each rank's output and q/k/v gradients must equal
its shard of the single-process ``lighthouse_attention(..., chunks=2W)`` (each of the 2W chunks selected alone
with ``topk / 2W``, one causal attention over the chunk subsequences in order). All runs share one pool of 4
spawned ranks (``test_te_fake.POOL``): CP=2 runs there as two CP groups of 2 (data parallel 2), so the second
group's ring addresses global ranks 2 and 3.

* bf16: what TE runs under CP; compared with the fp32 result on the same bf16 inputs (:data:`BF16_REL_L2`,
  shared with benchmarks/bench_cp.py).
* fp32: TE has no fp32 backend under CP, so the fake refuses it unless the test lets it
  (``allow_fp32_context_parallel``): the check of the CP math at fp32 precision, not of a TE configuration.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from benchmark_utils import load_benchmark
from spawn import run_on_ranks
from test_te_fake import POOL, own_process_groups

#: bf16 tolerance (relative L2 against the fp32 single-process result on the same bf16 inputs): the one
#: benchmarks/bench_cp.py --inner te holds the GPU run to, with its reasoning and the values measured here.
BF16_REL_L2 = load_benchmark("bench_cp").TE_BF16_REL_L2
#: fp32: the CP result equals the single-process one up to the order of floating-point sums.
FP32_REL_L2 = 2e-6
#: ``(context-parallel size, dtype name) -> [out, dq, dk, dv]``: the single-process reference of this process's
#: ranks, computed once per process (a pure function of the settings and the seed).
_REFERENCES: dict = {}


def _rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _settings(world: int):
    """Smallest valid shapes for 2W chunks: levels 2, pooling 2, budget 128 per chunk (``topk = 256 W``),
    256 tokens per chunk (one tile of 128 level-1 entries): ``(LighthouseConfig, global sequence length)``."""
    from megatron_lighthouse import LighthouseConfig

    return LighthouseConfig(levels=2, pooling_factor=2, topk=256 * world, dense_layers=()), 512 * world


def _reference(lighthouse, seq: int, world: int, inputs, cp_group) -> list:
    """The single-process result on the full sequence (``inputs``: q, k, v, dout ``[S, B, ...]``), computed
    by the first rank of ``cp_group`` and broadcast over it: ``[out [S, B, 64], dq, dk, dv]``."""
    import torch.distributed as dist

    from megatron_lighthouse import lighthouse_attention

    b = inputs[0].shape[1]
    shapes = [(seq, b, 64)] + [tuple(x.shape) for x in inputs[:3]]
    results = [torch.empty(shape, dtype=inputs[0].dtype) for shape in shapes]
    if dist.get_rank(cp_group) == 0:
        want = [x.transpose(0, 1).detach().requires_grad_(i < 3) for i, x in enumerate(inputs)]
        result = lighthouse_attention(*want[:3], levels=2, pooling_factor=2, topk=lighthouse.topk,
                                      chunks=2 * world, backend="torch")
        result.backward(want[3])
        for buffer, x in zip(results, [result.reshape(b, seq, 64)] + [w.grad for w in want[:3]]):
            buffer.copy_(x.detach().transpose(0, 1))
    for buffer in results:
        dist.broadcast(buffer, src=dist.get_global_rank(cp_group, 0), group=cp_group)
    return results


@contextlib.contextmanager
def fake_te_context_parallel(world: int, allow_fp32: bool = False):
    """Megatron's model-parallel state with context-parallel size ``world`` (hierarchical ``[world, 1]``, for
    ``a2a+p2p``) over the calling rank's pool, for ``TEDotProductAttention`` over the fake TE (installed here); yields
    the stand-in CP stream Megatron hands TE (it makes one ``torch.cuda.Stream`` per process; the CPU has none).
    ``allow_fp32``: the fake runs fp32 under CP (the CP math at fp32 precision; TE itself refuses it). Everything is
    undone on exit."""
    import fake_te

    fake = fake_te.install()
    from megatron.core import parallel_state
    from megatron.core.extensions.transformer_engine import TEDotProductAttention

    parallel_state.initialize_model_parallel(context_parallel_size=world,
                                             hierarchical_context_parallel_sizes=[world, 1])
    stream = object()
    previous_stream, TEDotProductAttention.cp_stream = TEDotProductAttention.cp_stream, stream
    fake.allow_fp32_context_parallel = allow_fp32
    try:
        yield stream
    finally:
        fake.allow_fp32_context_parallel = False
        TEDotProductAttention.cp_stream = previous_stream
        parallel_state.destroy_model_parallel()


def _check_lighthouse_over_te_cp(rank, pool_world, world, cp_comm_type, dtype_name):
    with own_process_groups():
        _lighthouse_over_te_cp(rank, pool_world, world, cp_comm_type, dtype_name)


def _lighthouse_over_te_cp(rank, pool_world, world, cp_comm_type, dtype_name):
    """One rank of ``pool_world``, in a CP group of ``world``: build the core attention from the TE spec, check
    the arguments TE got, run forward and backward on this rank's shard of ``[S, 2, 4, 16]`` q /
    ``[S, 2, 2, 16]`` k, v (``dtype_name``), compare with the single-process reference."""
    import torch.distributed as dist

    import fake_te

    fake = fake_te.install()
    fake.calls.clear()
    from megatron.core import parallel_state
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.spec_utils import build_module

    from megatron_lighthouse import split_for_cp
    from megatron_lighthouse.spec import get_gpt_layer_with_lighthouse_spec
    from megatron_lighthouse.transformer_config import LighthouseTransformerConfig

    dtype = getattr(torch, dtype_name)
    lighthouse, seq = _settings(world)
    with fake_te_context_parallel(world, allow_fp32=dtype == torch.float32) as stream:
        cfg = LighthouseTransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                                          ffn_hidden_size=128, use_cpu_initialization=True, attention_dropout=0.0,
                                          hidden_dropout=0.0, lighthouse=lighthouse, context_parallel_size=world)
        spec = get_gpt_layer_with_lighthouse_spec(cfg, use_transformer_engine=True)
        core = build_module(spec.submodules.self_attention.submodules.core_attention, config=cfg, layer_number=2,
                            attn_mask_type=AttnMaskType.causal, attention_type="self", cp_comm_type=cp_comm_type,
                            softmax_scale=None, pg_collection=None)
        assert isinstance(core.inner, fake), type(core.inner)

        # what Megatron hands TE's constructor
        (kind, init), = fake.calls
        cp_group = parallel_state.get_context_parallel_group()
        assert kind == "init" and init["cp_stream"] is stream, init
        first = rank - rank % world  # CP groups are consecutive global ranks (tensor/pipeline parallel size 1)
        assert init["cp_global_ranks"] == dist.get_process_group_ranks(cp_group) == list(range(first, first + world))
        assert init["cp_comm_type"] == (cp_comm_type or "p2p"), init["cp_comm_type"]
        if cp_comm_type == "a2a+p2p":
            assert init["cp_group"] == parallel_state.get_hierarchical_context_parallel_groups(), init["cp_group"]
        else:
            assert init["cp_group"] is cp_group, init["cp_group"]
        assert init["num_gqa_groups"] == init["num_attention_heads"] == 4, init  # kv heads expanded before selection
        assert init["kv_channels"] == 16 and init["attn_mask_type"] == "causal", init

        cp_rank = parallel_state.get_context_parallel_rank()
        gen = torch.Generator().manual_seed(5)
        full = [torch.randn(seq, 2, heads, 16, generator=gen).to(dtype) for heads in (4, 2, 2, 4)]  # q, k, v, dout
        local = [split_for_cp(x, cp_rank, world, seq_dim=0).requires_grad_(i < 3) for i, x in enumerate(full)]
        out = core(*local[:3], None, attn_mask_type=AttnMaskType.causal)
        assert out.dtype == dtype and out.shape == (seq // world, 2, 64), (out.dtype, out.shape)
        out.backward(local[3].reshape(out.shape))

        # what TE's forward got: this rank's subsequence (two chunk subsequences), sbhd, one kv head per q head
        (kind, fwd), = fake.calls[1:]
        sub = lighthouse.subsequence_length(seq, 2 * world) // world
        assert kind == "forward" and fwd["query"] == fwd["key"] == fwd["value"] == (sub, 2, 4, 16), fwd
        assert fwd["attention_mask"] is None and fwd["attn_mask_type"] == "causal" and fwd["dtype"] == dtype, fwd
        lengths = [None] * world
        dist.all_gather_object(lengths, fwd["query"][0], group=cp_group)
        assert lengths == [sub] * world, lengths

        key = (world, dtype_name)
        if key not in _REFERENCES:
            _REFERENCES[key] = _reference(lighthouse, seq, world, [x.float() for x in full], cp_group)
        tol = FP32_REL_L2 if dtype == torch.float32 else BF16_REL_L2
        for name, got, want in zip(("out", "dq", "dk", "dv"), [out] + [x.grad for x in local[:3]], _REFERENCES[key]):
            err = _rel_l2(got, split_for_cp(want, cp_rank, world, seq_dim=0).reshape(got.shape))
            assert err <= tol, (f"{cp_comm_type} W={world} {dtype_name} rank {rank} (CP rank {cp_rank}): {name} "
                                f"rel-L2 {err:.2e} > {tol} against the fp32 single-process result")


@pytest.mark.parametrize("cp_comm_type,dtype_name", [
    (comm, dtype) for comm in ("p2p", "all_gather", "a2a") for dtype in ("bfloat16", "float32")
] + [(None, "bfloat16"), ("a2a+p2p", "bfloat16")])
def test_cp2_lighthouse_over_te_equals_chunked_reference(cp_comm_type, dtype_name):
    """W=2, every ``cp_comm_type`` Megatron passes (``None``: Megatron's default, p2p; ``"a2a+p2p"`` with a
    p2p level of one rank, which TE runs as a2a: their schedules are p2p's and a2a's, so bf16 only)."""
    run_on_ranks(_check_lighthouse_over_te_cp, POOL["world"], 2, cp_comm_type, dtype_name, pool=POOL["pool"],
                 timeout_s=120)


@pytest.mark.parametrize("dtype_name", ["bfloat16", "float32"])
@pytest.mark.parametrize("cp_comm_type", ["p2p", "all_gather", "a2a"])
def test_cp4_lighthouse_over_te_equals_chunked_reference(cp_comm_type, dtype_name):
    run_on_ranks(_check_lighthouse_over_te_cp, POOL["world"], 4, cp_comm_type, dtype_name, pool=POOL["pool"],
                 timeout_s=120)
