"""Context parallelism on CPU (gloo, spawned ranks): every rank equals the single-process chunked result."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.distributed as dist

from conftest import GOLDENS, golden_names, rel_l2
from megatron_lighthouse import context_parallel, lighthouse_attention, select_indices
from megatron_lighthouse.cp_layout import cp_chunk_ids, gather_from_cp, split_for_cp
from spawn import run_on_ranks

#: Collectives a rank could issue; the CP path may only use the K/V gather, its gradient and the settings check.
_COLLECTIVES = (
    "all_gather_single", "all_gather_into_tensor", "all_gather", "all_gather_object", "all_reduce",
    "reduce_scatter_single", "reduce_scatter_tensor", "reduce_scatter", "all_to_all", "all_to_all_single",
    "broadcast", "broadcast_object_list", "reduce", "gather", "scatter", "send", "recv", "isend", "irecv",
    "batch_isend_irecv",
)


def _inputs(seed: int, b: int, n: int, h: int, h_kv: int, d: int):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, n, h, d, generator=gen)
    k = torch.randn(b, n, h_kv, d, generator=gen)
    v = torch.randn(b, n, h_kv, d, generator=gen)
    dout = torch.randn(b, n, h, d, generator=gen)
    return q, k, v, dout


def _forward_backward(q, k, v, dout, **kwargs):
    q, k, v = (x.clone().requires_grad_(True) for x in (q, k, v))
    out = lighthouse_attention(q, k, v, backend="torch", **kwargs)
    out.backward(dout)
    return out.detach(), q.grad, k.grad, v.grad


def _check_equals_chunked(rank, world, cp_size, shape, settings, seed):
    """CP groups of ``cp_size`` consecutive ranks; each group runs its own sequence and checks the chunked result."""
    groups = [dist.new_group(list(range(g, g + cp_size))) for g in range(0, world, cp_size)]
    group, cp_rank = groups[rank // cp_size], rank % cp_size
    full = _inputs(seed + rank // cp_size, *shape)
    want = _forward_backward(*full, chunks=2 * cp_size, **settings)
    local = [split_for_cp(x, cp_rank, cp_size) for x in full]
    got = _forward_backward(*local, cp_group=group, **settings)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(g, split_for_cp(w, cp_rank, cp_size), rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize(
    "world,cp_size,shape,settings",
    [
        (2, 2, (2, 1024, 2, 2, 8), dict(levels=2, pooling_factor=2, topk=512)),
        (2, 2, (1, 2048, 4, 2, 8), dict(levels=3, pooling_factor=2, topk=512, softmax_scale=0.2)),  # GQA
        (4, 4, (1, 2048, 2, 1, 8), dict(levels=2, pooling_factor=2, topk=1024)),
        (4, 2, (1, 1024, 2, 2, 8), dict(levels=2, pooling_factor=2, topk=512)),  # two CP groups of 2
    ],
    ids=["w2", "w2-gqa-l3", "w4", "w4-two-groups"],
)
def test_cp_equals_single_process_chunked(world, cp_size, shape, settings):
    run_on_ranks(_check_equals_chunked, world, cp_size, shape, settings, 0)


def _check_golden(rank, world, name):
    rec = GOLDENS[name]
    cfg = rec["config"]
    assert cfg["chunks"] == 2 * world
    settings = dict(levels=cfg["levels"], pooling_factor=cfg["pooling_factor"])
    q, k, v = (split_for_cp(rec[x], rank, world) for x in "qkv")
    indices = select_indices(q, k, topk=cfg["topk"] // world, chunks=2, **settings)
    for local, chunk in enumerate(cp_chunk_ids(rank, world)):
        assert torch.equal(indices[:, local], rec["indices"][chunk].long())
    dout = split_for_cp(rec["dout"].transpose(1, 2), rank, world)
    out, dq, dk, dv = _forward_backward(q, k, v, dout, topk=cfg["topk"], cp_group=dist.group.WORLD, **settings)
    shards = [torch.empty_like(out) for _ in range(world)]
    dist.all_gather(shards, out.contiguous())
    assert rel_l2(gather_from_cp(shards).transpose(1, 2), rec["out"]) < 1e-4
    for grad, ref in ((dq, "dq"), (dk, "dk"), (dv, "dv")):
        assert rel_l2(grad, split_for_cp(rec[ref], rank, world)) < 1e-4, ref


@pytest.mark.parametrize("name", golden_names(["cp2", "cp4"], max_tokens=1 << 16, chunks=(4, 8)))
def test_golden_through_distributed_path(name):
    """Chunked cases with ``chunks = 2W`` for W = 2, 4 run on W ranks (the shared set's are required to exist by
    tests/test_golden.py)."""
    run_on_ranks(_check_golden, GOLDENS[name]["config"]["chunks"] // 2, name)


def _check_communication(rank, world, force_reduce_scatter):
    """Only the inner attention communicates, plus each call's settings check; both gradient paths agree."""
    calls = []
    originals = {name: getattr(dist, name) for name in _COLLECTIVES if hasattr(dist, name)}
    portable = context_parallel.PORTABLE_REDUCE_SCATTER_BACKENDS
    for name, original in originals.items():
        setattr(dist, name, lambda *a, _n=name, _f=original, **kw: (calls.append(_n), _f(*a, **kw))[1])
    if force_reduce_scatter:
        context_parallel.PORTABLE_REDUCE_SCATTER_BACKENDS = ()
    try:
        settings = dict(levels=2, pooling_factor=2, topk=512)
        full = _inputs(3, 1, 1024, 2, 2, 8)
        local = [split_for_cp(x, rank, world) for x in full]
        got = _forward_backward(*local, cp_group=dist.group.WORLD, **settings)
        first = list(calls)
        calls.clear()
        again = _forward_backward(*local, cp_group=dist.group.WORLD, **settings)
        second = list(calls)
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)
        context_parallel.PORTABLE_REDUCE_SCATTER_BACKENDS = portable
    gather = "all_gather_single" if "all_gather_single" in originals else "all_gather_into_tensor"
    reduce_scatter = "reduce_scatter_single" if "reduce_scatter_single" in originals else "reduce_scatter_tensor"
    grad_sync = reduce_scatter if force_reduce_scatter else "all_reduce"
    assert first == [gather, gather, grad_sync], first  # settings check, K/V gather, K/V gradient
    assert second == first, second  # every call checks the settings: no rank can skip a collective another joins
    want = _forward_backward(*full, chunks=2 * world, **settings)
    for g, a, w in zip(got, again, want):
        torch.testing.assert_close(g, a, rtol=0, atol=0)
        torch.testing.assert_close(g, split_for_cp(w, rank, world), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("force_reduce_scatter", [False, True], ids=["all-reduce-grad", "reduce-scatter-grad"])
def test_only_attention_communicates(force_reduce_scatter):
    run_on_ranks(_check_communication, 2, force_reduce_scatter)


def _check_errors(rank, world):
    good = dict(levels=2, pooling_factor=2, topk=512)
    q, k, v, _ = _inputs(0, 1, 1024, 2, 2, 8)
    group = dist.group.WORLD

    def fails(match, q=q, k=k, v=v, **kwargs):
        with pytest.raises(ValueError, match=match):
            lighthouse_attention(q, k, v, backend="torch", **{**good, "cp_group": group, **kwargs})

    odd = q[:, :1023], k[:, :1023], v[:, :1023]
    fails(r"size 2 \(1023 tokens per rank\): .*split into 2\*W = 4 equal chunks", *odd)
    fails(r"size 2 .*topk=256 with chunks=4: the per-chunk budget topk/chunks must be a multiple of 128", topk=256)
    fails(r"topk=640 with chunks=4: .*topk must be a multiple of 512", topk=640)
    fails(r"size 2 .*owns 64 coarsest-level entries", levels=4)
    fails(r"chunks=4: must stay 1 with cp_group", chunks=4)
    # the ranks disagree: every rank raises, naming the setting and each rank's value
    fails(r"disagree .*topk: rank 0=512, rank 1=1024", topk=512 if rank == 0 else 1024)
    # one rank's shard cannot be selected (rank 1 got 1000 tokens): both raise, the healthy rank too, naming rank 1
    short = (q, k, v) if rank == 0 else (q[:, :1000], k[:, :1000], v[:, :1000])
    fails(r"disagree .*local_seq_len: rank 0=1024, rank 1=1000", *short)
    fails(r"disagree .*softmax_scale: rank 0=0\.5, rank 1=0\.25", softmax_scale=0.5 if rank == 0 else 0.25)
    # a process outside the group
    solo = dist.new_group([0])
    if rank == 1:
        fails(r"not a member", cp_group=solo)
    # after every refusal the ranks are still in step: a good call works on both
    assert lighthouse_attention(q, k, v, backend="torch", cp_group=group, **good).shape == q.shape
    with pytest.raises(ValueError, match=r"cp_causal_attention: local sequence length 3 must be even"):
        context_parallel.cp_causal_attention(*(torch.zeros(1, 1, 3, 4),) * 3, 0.5, group)


def test_errors():
    run_on_ranks(_check_errors, 2)


def _check_one_rank_fails_alone(rank, world):
    """A local check failing on rank 1 only (rank 0's call is good) may not leave rank 0 waiting in the settings
    all-gather: both ranks raise the same error, naming rank 1; afterwards the ranks are still in step."""
    good = dict(levels=2, pooling_factor=2, topk=512)
    q, k, v, _ = _inputs(0, 1, 1024, 2, 2, 8)
    group = dist.group.WORLD
    cases = [
        (dict(softmax_scale=0.0), r"softmax_scale=0.0: must be a finite number > 0"),
        (dict(q=q[0]), r"q must be 4-D \[B, N, H, D\], got shape \(1024, 2, 8\)"),
        (dict(q=q[:0], k=k[:0], v=v[:0]), r"q has a zero-sized dimension"),
        (dict(chunks=2), r"chunks=2: must stay 1 with cp_group"),
        (dict(topk=100), r"LighthouseConfig.topk=100: must be a positive multiple of 128"),
        (dict(rotary=5), r"rotary must be .*, got int"),
        (dict(backend="cuda"), r"backend='cuda'"),
    ]
    for bad, match in cases:
        call = {"q": q, "k": k, "v": v, "backend": "torch", **good, **(bad if rank == 1 else {})}
        with pytest.raises(ValueError, match=rf"^cp_group rank 1: {match}") as err:
            lighthouse_attention(cp_group=group, **call)
        messages = [None] * world
        dist.all_gather_object(messages, str(err.value))
        assert messages[0] == messages[1], messages
    # both ranks failing their own way: one error naming each
    with pytest.raises(ValueError, match=r"^cp_group rank 0: softmax_scale=-1.0: .*; rank 1: chunks=2: must stay 1"):
        lighthouse_attention(q, k, v, backend="torch", cp_group=group,
                             **good, **(dict(softmax_scale=-1.0) if rank == 0 else dict(chunks=2)))
    assert lighthouse_attention(q, k, v, backend="torch", cp_group=group, **good).shape == q.shape


def test_a_local_error_on_one_rank_fails_every_rank():
    run_on_ranks(_check_one_rank_fails_alone, 2, timeout_s=120)


def _check_callback_broken_on_one_rank(rank, world):
    """After the settings exchange: a caller's ``attention=`` or ``rotary=`` that returns the wrong result on rank 1
    only, or takes the wrong arguments there, raises on both ranks (rank 0 is not left waiting in the next
    collective); afterwards the ranks are still in step."""
    good = dict(levels=2, pooling_factor=2, topk=512)
    q, k, v, _ = _inputs(0, 1, 1024, 2, 2, 8)
    group = dist.group.WORLD

    def attention(q, k, v, scale):
        out = context_parallel.cp_causal_attention(q, k, v, scale, group)
        return out[:, :, :-1] if rank == 1 else out  # one row short on rank 1 only

    def rotary(x, positions):
        return x.double() if rank == 1 else x

    cases = [
        (dict(attention=attention), r"attention= returned \(1, 2, 1023, 8\) .*a dense kernel must return its q's"),
        (dict(rotary=rotary), r"rotary= returned \(1, 2, 1024, 8\) torch.float64 .*an entry rotary must return"),
        (dict(attention=(lambda q, k, v: q) if rank == 1 else None),
         r"attention=.*<lambda>: must take the 4 positional arguments \(q, k, v, softmax_scale\)"),
    ]
    for bad, match in cases:
        with pytest.raises(ValueError, match=rf"^cp_group rank 1: {match}") as err:
            lighthouse_attention(q, k, v, backend="torch", cp_group=group, **good, **bad)
        messages = [None] * world
        dist.all_gather_object(messages, str(err.value))
        assert messages[0] == messages[1], messages
    out = lighthouse_attention(q, k, v, backend="torch", cp_group=group, attention=functools.partial(
        context_parallel.cp_causal_attention, group=group), **good)
    assert out.shape == q.shape


def test_a_callback_broken_on_one_rank_fails_every_rank():
    run_on_ranks(_check_callback_broken_on_one_rank, 2, timeout_s=120)


def test_cp_group_that_cannot_be_used():
    """Without torch.distributed, or with an object that is no process group (whichever this test process has:
    other tests may have set up a world), the call is refused before any work."""
    q = torch.randn(1, 1024, 1, 8)
    match = ("not a torch.distributed process group" if dist.is_initialized()
             else "torch.distributed is not initialized")
    with pytest.raises(ValueError, match=match):
        lighthouse_attention(q, q, q, levels=2, pooling_factor=2, topk=512, cp_group=object())


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_layout_roundtrip(world):
    x = torch.arange(2 * world * 3).view(1, -1, 1)
    shards = [split_for_cp(x, r, world) for r in range(world)]
    for r, shard in enumerate(shards):
        chunks = [c.flatten().tolist() for c in x.chunk(2 * world, dim=1)]
        assert shard.flatten().tolist() == chunks[r] + chunks[2 * world - 1 - r]
    assert torch.equal(gather_from_cp(shards), x)


def test_layout_errors():
    with pytest.raises(ValueError, match="sequence length 6 .* divisible by 2 \\* context-parallel size = 4"):
        split_for_cp(torch.zeros(1, 6), 0, 2)
    with pytest.raises(ValueError, match=r"context-parallel rank 2: must be an int in \[0, 2\)"):
        split_for_cp(torch.zeros(1, 8), 2, 2)
    with pytest.raises(ValueError, match="odd length 3"):
        gather_from_cp([torch.zeros(1, 3)])
    for world in (0, True, 2.0, None):
        with pytest.raises(ValueError, match=r"context-parallel size=.*: must be a positive int"):
            split_for_cp(torch.zeros(1, 8), 0, world)
    with pytest.raises(ValueError, match=r"context-parallel rank True: must be an int in \[0, 2\)"):
        split_for_cp(torch.zeros(1, 8), True, 2)
    with pytest.raises(ValueError, match=r"seq_dim=2: not a dimension of x, of shape \(1, 8\)"):
        split_for_cp(torch.zeros(1, 8), 0, 2, seq_dim=2)
    with pytest.raises(ValueError, match=r"x: a list, not a torch.Tensor"):
        split_for_cp([0] * 8, 0, 2)
    with pytest.raises(ValueError, match=r"the shard of rank 1 has shape \(1, 2\), rank 0's \(1, 4\)"):
        gather_from_cp([torch.zeros(1, 4), torch.zeros(1, 2)])


def _check_layout_is_megatrons(rank, world):
    from megatron_utils import megatron_cp_batch

    batch = {"tokens": torch.arange(3 * 8 * world).view(3, -1),
             "attention_mask": torch.arange(8 * world).view(1, 1, -1)}
    want = megatron_cp_batch(batch, dist.group.WORLD)
    assert torch.equal(split_for_cp(batch["tokens"], rank, world, seq_dim=1), want["tokens"])
    assert torch.equal(split_for_cp(batch["attention_mask"], rank, world, seq_dim=2), want["attention_mask"])


@pytest.mark.parametrize("world", [2, 4])
def test_layout_is_megatrons(world):
    run_on_ranks(_check_layout_is_megatrons, world)
