"""The fake TransformerEngine (tests/fake_te.py) is held to TE itself, not to this package.

* Signatures: every modelled TE method takes exactly the parameters (names, kinds, defaults) recorded from TE's
  source for the version the fake reports (tests/te_api/te_api.json); a misspelt or removed argument fails.
* Preconditions: TE's forward asserts, its backend refusals (fp32 under context parallelism) and CP checks.
* Numerics: the fake's CP algorithms (p2p ring, all-gather, a2a) on 2 and 4 gloo ranks equal plain causal
  attention over the whole sequence, forward and gradients; without CP, plain causal attention; the linear and
  norm stand-ins equal torch's.
* ``_extra_state``: present in every module's state dict, round-trips as TE's does.

The fake is used here without :func:`fake_te.install` (no Megatron involved), so this process's imports stay
untouched.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import json
import math
import pathlib
import pickle

import pytest
import torch
import torch.nn.functional as F

import fake_te
from spawn import run_on_ranks

SNAPSHOT = json.loads((pathlib.Path(__file__).resolve().parent / "te_api" / "te_api.json").read_text())

#: snapshot class key -> (fake class, methods the snapshot records)
MODELLED = {
    "DotProductAttention": fake_te.DotProductAttention,
    "Linear": fake_te.Linear,
    "LayerNormLinear": fake_te.LayerNormLinear,
    "LayerNorm": fake_te.LayerNorm,
    "RMSNorm": fake_te.RMSNorm,
    "ops.LayerNorm": fake_te._LayerNormOp,
    "ops.RMSNorm": fake_te._RMSNormOp,
    "TransformerEngineBaseModule": fake_te._BaseModule,
    "ops.BasicOperation": fake_te._NormOp,
}


def _signature(fn) -> list:
    """``fn``'s parameters as the snapshot writes them: ``{"name", "kind", "default"}`` (default as ``repr``)."""
    return [{"name": p.name, "kind": p.kind.name,
             "default": None if p.default is inspect.Parameter.empty else repr(p.default)}
            for p in inspect.signature(fn).parameters.values()]


def test_fake_reports_the_snapshot_version():
    entry = SNAPSHOT["versions"][fake_te.SNAPSHOT_TAG]
    assert entry["version"] == fake_te.TE_VERSION, (fake_te.SNAPSHOT_TAG, entry["version"], fake_te.TE_VERSION)
    assert fake_te.MEMBERS["transformer_engine"]["__version__"] == fake_te.TE_VERSION


@pytest.mark.parametrize("key", sorted(MODELLED))
def test_signatures_equal_te_source(key):
    recorded = SNAPSHOT["versions"][fake_te.SNAPSHOT_TAG]["classes"][key]["methods"]
    for method, params in recorded.items():
        got = _signature(getattr(MODELLED[key], method))
        assert got == params, (
            f"fake {key}.{method} differs from TE {fake_te.SNAPSHOT_TAG} "
            f"({SNAPSHOT['versions'][fake_te.SNAPSHOT_TAG]['commit']}):\n"
            + "\n".join(f"  fake {g}\n  TE   {p}" for g, p in zip(got, params) if g != p)
            + (f"\n  lengths {len(got)} vs {len(params)}" if len(got) != len(params) else ""))


def test_no_catch_all_where_te_has_none():
    for key, cls in MODELLED.items():
        for method, params in SNAPSHOT["versions"][fake_te.SNAPSHOT_TAG]["classes"][key]["methods"].items():
            kinds = {p["kind"] for p in _signature(getattr(cls, method))}
            assert ("VAR_KEYWORD" in kinds) == any(p["kind"] == "VAR_KEYWORD" for p in params), (key, method)


def test_misspelt_or_unknown_arguments_fail():
    with pytest.raises(TypeError, match="num_gqa_group"):
        fake_te.DotProductAttention(4, 16, num_gqa_group=2)
    attn = fake_te.DotProductAttention(4, 16, num_gqa_groups=2)
    q, kv = torch.randn(8, 1, 4, 16), torch.randn(8, 1, 2, 16)
    with pytest.raises(TypeError, match="packed_seq_params"):
        attn(q, kv, kv, None, packed_seq_params=None)
    with pytest.raises(TypeError, match="cp_comm"):
        attn.set_context_parallel_group(None, None, None, cp_comm="p2p")
    # the norm modules hand **kwargs to the operation, which takes only its own keywords (as in TE)
    with pytest.raises(TypeError, match="bogus"):
        fake_te.LayerNorm(16, device="cpu", bogus=1)
    with pytest.raises(TypeError, match="init_method"):
        fake_te.RMSNorm(16, device="cpu", init_method=None)


def _causal_reference(q, k, v, scale):
    """Plain causal attention, ``[S, B, H, D]`` q and ``[S, B, G, D]`` k/v -> ``[S, B, H*D]`` (GQA repeat)."""
    h = q.shape[2]
    q_, k_, v_ = (x.permute(1, 2, 0, 3).float() for x in (q, k, v))
    k_, v_ = (x.repeat_interleave(h // x.shape[1], dim=1) for x in (k_, v_))
    out = F.scaled_dot_product_attention(q_, k_, v_, is_causal=True, scale=scale)
    return out.permute(2, 0, 1, 3).reshape(q.shape[0], q.shape[1], -1)


def test_attention_without_cp_is_causal_attention():
    torch.manual_seed(0)
    attn = fake_te.DotProductAttention(4, 16, num_gqa_groups=2, softmax_scale=0.3)
    q = torch.randn(12, 2, 4, 16, requires_grad=True)
    k, v = (torch.randn(12, 2, 2, 16, requires_grad=True) for _ in range(2))
    out = attn(q, k, v, None, attn_mask_type="causal")
    assert out.shape == (12, 2, 64) and out.dtype == torch.float32
    ref = _causal_reference(q, k, v, 0.3)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    for got, want in zip(grads, torch.autograd.grad(ref.square().sum(), (q, k, v))):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # (the first query's dq is 0 up to rounding)
    # no_mask: every key
    full = attn(q, k, v, None, attn_mask_type="no_mask")
    want = F.scaled_dot_product_attention(q.permute(1, 2, 0, 3), *(x.permute(1, 2, 0, 3).repeat_interleave(2, 1)
                                                                    for x in (k, v)), scale=0.3)
    torch.testing.assert_close(full, want.permute(2, 0, 1, 3).reshape(12, 2, 64), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case,error,match", [
    ("kv_heads", AssertionError, "must have num_gqa_group = 2 heads! Found 4"),
    ("head_dim", AssertionError, "expected head_dim = 16"),
    ("dtype", AssertionError, "same data type"),
    ("kv_shape", AssertionError, "Keys and values must have the same"),
    ("mask", AssertionError, "Attention mask type sliding is not supported"),
    ("format", AssertionError, "qkv_format"),
    ("tp", AssertionError, "must have num_gqa_group = 1 heads! Found 2"),
    ("gqa_divides", AssertionError, "divisible by the number of GQA groups"),
])
def test_te_forward_preconditions(case, error, match):
    kwargs = dict(num_gqa_groups=2)
    if case == "tp":  # tp_size 2 (no group): TE expects num_gqa_groups // tp_size kv heads per rank
        kwargs["tp_size"] = 2
    if case == "gqa_divides":
        kwargs["num_gqa_groups"] = 3
    with pytest.raises(error, match=match):
        attn = fake_te.DotProductAttention(4, 16, **kwargs)
        q, k, v = torch.randn(8, 1, 4, 16), torch.randn(8, 1, 2, 16), torch.randn(8, 1, 2, 16)
        call = {}
        if case == "kv_heads":
            k, v = torch.randn(8, 1, 4, 16), torch.randn(8, 1, 4, 16)
        elif case == "head_dim":
            q, k, v = torch.randn(8, 1, 4, 8), torch.randn(8, 1, 2, 8), torch.randn(8, 1, 2, 8)
        elif case == "dtype":
            v = v.double()
        elif case == "kv_shape":
            v = torch.randn(6, 1, 2, 16)
        elif case == "mask":
            call["attn_mask_type"] = "sliding"
        elif case == "format":
            call["qkv_format"] = "sbh"
        attn(q, k, v, None, **call)


def test_unmodelled_features_refuse():
    with pytest.raises(NotImplementedError, match="sliding-window"):
        fake_te.DotProductAttention(4, 16, window_size=(128, 0))
    with pytest.raises(NotImplementedError, match="softmax_type"):
        fake_te.DotProductAttention(4, 16, softmax_type="learnable")
    attn = fake_te.DotProductAttention(4, 16, attention_dropout=0.1)
    q = torch.randn(8, 1, 4, 16)
    with pytest.raises(NotImplementedError, match="dropout"):
        attn(q, q, q)
    with pytest.raises(NotImplementedError, match="tensor parallelism"):
        fake_te.Linear(16, 16, tp_size=2, device="cpu")
    placeholder = fake_te._placeholder("transformer_engine.pytorch.GroupedLinear")
    assert placeholder.some.attribute is fake_te._placeholder("transformer_engine.pytorch.GroupedLinear.some.attribute")

    class Mixin:
        pass

    class Sub(Mixin, placeholder):  # Megatron subclasses TE classes, with mixins: no metaclass conflict
        pass

    with pytest.raises(NotImplementedError, match="GroupedLinear"):
        Sub()
    with pytest.raises(NotImplementedError, match=r"GroupedLinear\.some"):
        placeholder.some(1)


def test_linear_and_norm_stand_ins_compute_torch():
    torch.manual_seed(0)
    x = torch.randn(5, 3, 16)
    lin = fake_te.Linear(16, 8, init_method=torch.nn.init.normal_, device="cpu", return_bias=True)
    with torch.no_grad():
        lin.bias.normal_()
    out, bias = lin(x)
    torch.testing.assert_close(out, x @ lin.weight.T)
    assert bias is lin.bias
    assert sorted(n for n, _ in lin.named_parameters()) == ["bias", "weight"]
    assert lin.weight.shape == (8, 16) and torch.all(lin.weight != 0)

    for norm in ("LayerNorm", "RMSNorm"):
        lnl = fake_te.LayerNormLinear(16, 8, normalization=norm, device="cpu", zero_centered_gamma=True, eps=1e-6)
        with torch.no_grad():
            for p in lnl.parameters():
                p.normal_()
        names = sorted(n for n, _ in lnl.named_parameters())
        assert names == sorted(["weight", "bias", "layer_norm_weight"] + (["layer_norm_bias"] if norm == "LayerNorm"
                                                                           else [])), names
        gamma = lnl.layer_norm_weight + 1.0
        if norm == "LayerNorm":
            normed = F.layer_norm(x, (16,), gamma, lnl.layer_norm_bias, 1e-6)
        else:
            normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * gamma
        torch.testing.assert_close(lnl(x), normed @ lnl.weight.T + lnl.bias, rtol=1e-5, atol=1e-5)

        if norm == "LayerNorm":  # TE's deprecated spelling still builds, with TE's DeprecationWarning
            with pytest.warns(DeprecationWarning, match=r"`hidden_size` arg has been renamed to `normalized_shape`"):
                module = fake_te.LayerNorm(hidden_size=16, eps=1e-6, device="cpu", params_dtype=torch.float64)
        else:
            module = getattr(fake_te, norm)(16, eps=1e-6, device="cpu", dtype=torch.float64)
        assert module.weight.dtype == torch.float64 and torch.all(module.weight == 1)
        assert (module.bias is not None) == (norm == "LayerNorm")


def test_extra_state_round_trips_like_te():
    attn = fake_te.DotProductAttention(4, 16)
    state = attn.state_dict()
    assert list(state) == ["_extra_state"], list(state)
    assert state["_extra_state"].dtype == torch.uint8 and state["_extra_state"].numel() == 0  # no FP8 metadata

    metadata = {"recipe": "delayed", "extra_fp8_variables": {"num_gemms": 3, "fp8_checkpoint": True}}
    pickled = torch.frombuffer(bytearray(pickle.dumps(metadata)), dtype=torch.uint8)
    other = fake_te.DotProductAttention(4, 16)
    other.load_state_dict({"_extra_state": pickled}, strict=True)
    saved = other.state_dict()["_extra_state"]
    assert pickle.loads(saved.numpy().tobytes()) == metadata
    attn.load_state_dict(other.state_dict(), strict=True)
    assert pickle.loads(attn.get_extra_state().numpy().tobytes()) == metadata

    buffer = io.BytesIO()  # TE's deprecated format
    torch.save({"extra_fp8_variables": {"num_gemms": 1}}, buffer)
    attn.set_extra_state(buffer)
    assert pickle.loads(attn.get_extra_state().numpy().tobytes()) == {"extra_fp8_variables": {"num_gemms": 1}}
    with pytest.raises(RuntimeError, match="Unsupported checkpoint format"):
        attn.set_extra_state("state")

    for module in (fake_te.Linear(4, 4, device="cpu"), fake_te.LayerNormLinear(4, 4, device="cpu"),
                   fake_te.LayerNorm(4, device="cpu"), fake_te.RMSNorm(4, device="cpu")):
        assert "_extra_state" in module.state_dict(), type(module).__name__
        with pytest.raises(RuntimeError, match="Missing key"):
            module.load_state_dict({k: v for k, v in module.state_dict().items() if k != "_extra_state"})


# --------------------------------------------------------------------------------------------- multi-rank
def _shard(x: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Megatron's load-balanced shard along dim 0: chunks ``rank`` and ``2*world-1-rank`` of ``2*world``."""
    chunks = x.chunk(2 * world)
    return torch.cat((chunks[rank], chunks[2 * world - 1 - rank]))


#: bf16 tolerance (relative L2 against fp32 attention on the same bf16 inputs). One bf16 rounding has relative
#: error up to 2**-9 (about 1.1e-3 in relative L2 on random data); the fake rounds each step's output, the merged
#: output, and the gradients after summing partial contributions in bf16 (as TE's kernels and collectives do),
#: which measures 1.4e-3 to 4e-3 here (W=2 and 4, all three schedules). 8e-3 leaves a factor 2; a wrong mask,
#: chunk order or merge is off by more than 1e-1.
BF16_REL_L2 = 8e-3


def _rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


#: The spawned ranks every multi-rank fake-TE test runs on (test_te_cp_lighthouse and test_te_gpt_spec too: one
#: startup for all; smaller CP groups run side by side in it).
POOL = dict(pool="fake_te", world=4)


@contextlib.contextmanager
def own_process_groups():
    """Destroys on exit the process groups created inside. Megatron's ``destroy_model_parallel`` only drops its
    references, and every gloo group keeps a few threads: tasks in the shared ranks would pile up thousands."""
    import torch.distributed as dist
    from torch.distributed import distributed_c10d

    before = set(distributed_c10d._world.pg_map)
    try:
        yield
    finally:
        for group in [g for g in distributed_c10d._world.pg_map if g not in before]:
            dist.destroy_process_group(group)


def _cp_groups(rank: int, pool_world: int, world: int):
    """CP groups of ``world`` consecutive ranks over the ``pool_world`` ranks (every rank creates every group, as
    ``new_group`` requires): ``(my group, its global ranks, my rank in it, my singleton group)``."""
    import torch.distributed as dist

    groups = [dist.new_group(list(range(start, start + world))) for start in range(0, pool_world, world)]
    singletons = [dist.new_group([r]) for r in range(pool_world)]
    first = rank - rank % world
    return groups[rank // world], list(range(first, first + world)), rank - first, singletons[rank]


def _check_cp_equals_full_attention(rank, pool_world, world, cp_comm_type, dtype_name, heads, kv_heads):
    with own_process_groups():
        _cp_equals_full_attention(rank, pool_world, world, cp_comm_type, dtype_name, heads, kv_heads)


def _cp_equals_full_attention(rank, pool_world, world, cp_comm_type, dtype_name, heads, kv_heads):
    dtype = getattr(torch, dtype_name)
    group, global_ranks, cp_rank, alone = _cp_groups(rank, pool_world, world)
    fake_te.DotProductAttention.allow_fp32_context_parallel = dtype == torch.float32
    try:
        gen = torch.Generator().manual_seed(3)
        seq, b, d = 16 * world, 2, 16
        full = [torch.randn(seq, b, h, d, generator=gen).to(dtype) for h in (heads, kv_heads, kv_heads, heads)]
        cp_group = [group, alone] if cp_comm_type == "a2a+p2p" else group
        attn = fake_te.DotProductAttention(heads, d, num_gqa_groups=kv_heads, cp_group=cp_group,
                                           cp_global_ranks=global_ranks, cp_stream=None,
                                           cp_comm_type=cp_comm_type, softmax_scale=1 / math.sqrt(d))
        local = [_shard(x, cp_rank, world).requires_grad_(i < 3) for i, x in enumerate(full)]
        out = attn(*local[:3], None, attn_mask_type="causal")
        assert out.dtype == dtype and out.shape == (seq // world, b, heads * d), (out.dtype, out.shape)
        out.backward(local[3].reshape(out.shape))

        want = [x.float().requires_grad_(i < 3) for i, x in enumerate(full)]
        ref = _causal_reference(*want[:3], 1 / math.sqrt(d))
        ref.backward(want[3].reshape(ref.shape))
        pairs = [("out", out, _shard(ref.detach(), cp_rank, world))]
        pairs += [(f"d{n}", g.grad, _shard(w.grad, cp_rank, world)) for n, g, w in zip("qkv", local, want)]
        for name, got, expected in pairs:
            err = _rel_l2(got, expected)
            tol = 1e-6 if dtype == torch.float32 else BF16_REL_L2
            assert err <= tol, f"{cp_comm_type} W={world} {dtype_name} rank {rank}: {name} rel-L2 {err:.2e} > {tol}"
    finally:
        fake_te.DotProductAttention.allow_fp32_context_parallel = False


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("cp_comm_type", ["p2p", "all_gather", "a2a"])
@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
def test_fake_cp_algorithms_equal_full_causal_attention(world, cp_comm_type, dtype_name):
    """Each rank's output and q/k/v gradients (GQA: 8 query heads, 4 kv heads) equal its shard of plain causal
    attention over the gathered sequence (fp32: exact up to rounding; bf16: :data:`BF16_REL_L2`). W=2 runs as
    two groups of 2 ranks of the pool, the second ring addressing global ranks 2 and 3."""
    run_on_ranks(_check_cp_equals_full_attention, POOL["world"], world, cp_comm_type, dtype_name, 8, 4,
                 pool=POOL["pool"], timeout_s=120)


def test_fake_hierarchical_a2a_p2p_reduces_to_a2a():
    """``"a2a+p2p"`` with a p2p level of one rank is TE's a2a (TE reduces it so)."""
    run_on_ranks(_check_cp_equals_full_attention, POOL["world"], 2, "a2a+p2p", "bfloat16", 4, 2,
                 pool=POOL["pool"], timeout_s=120)


def _check_cp_preconditions(rank, pool_world, world):
    with own_process_groups():
        _cp_preconditions(rank, pool_world, world)


def _cp_preconditions(rank, pool_world, world):
    group, global_ranks, _, _ = _cp_groups(rank, pool_world, world)

    def attention(heads=4, kv_heads=2, d=16, **kwargs):
        kwargs = {"cp_group": group, "cp_global_ranks": global_ranks, "cp_comm_type": "p2p", **kwargs}
        return fake_te.DotProductAttention(heads, d, num_gqa_groups=kv_heads, **kwargs)

    def inputs(heads=4, kv_heads=2, d=16, seq=8, dtype=torch.bfloat16):
        return (torch.randn(seq, 1, heads, d, dtype=dtype), torch.randn(seq, 1, kv_heads, d, dtype=dtype),
                torch.randn(seq, 1, kv_heads, d, dtype=dtype))

    cases = [
        # TE has no fp32 backend under CP (FusedAttention needs fp16/bf16; unfused has no CP)
        (attention(), inputs(dtype=torch.float32), ValueError, "No dot product attention backend"),
        # TE's all_gather without its underscore (Megatron-LM's --help spelling): TE's own error
        (attention(cp_comm_type="all_gather".replace("_", "")), inputs(), ValueError,
         f"Unsupported communication type: {'all_gather'.replace('_', '')}!"),
        (attention(heads=6, kv_heads=3, cp_comm_type="a2a"), inputs(6, 3), AssertionError,
         "number of attention heads needs to be divisible by CP size"),
        (attention(cp_comm_type="a2a+p2p"), inputs(), AssertionError,
         r"a2a\+p2p requires cp_group = \[a2a_cp_group, p2p_cp_group\]"),
        (attention(cp_comm_type="all_gather", d=12), inputs(d=12), AssertionError, "multiple of 8"),
        (attention(cp_comm_type="a2a", cp_group=[group, group]), inputs(), AssertionError, "cp_group must be"),
        (attention(), inputs(seq=7), AssertionError, "divisible by 2"),
    ]
    for attn, (q, k, v), error, match in cases:
        with pytest.raises(error, match=match):
            attn(q, k, v, None, attn_mask_type="causal")
    attn = attention()  # a CP group set later (as Megatron does for dynamic CP) counts too
    attn.set_context_parallel_group(None, None, None)
    attn(*inputs(dtype=torch.float32))  # no CP: fp32 runs (TE's unfused backend)
    attn.set_context_parallel_group(group, global_ranks, None, "all_gather")
    with pytest.raises(ValueError, match="No dot product attention backend"):
        attn(*inputs(dtype=torch.float32))


def test_fake_cp_preconditions_are_te_s():
    run_on_ranks(_check_cp_preconditions, POOL["world"], 2, pool=POOL["pool"], timeout_s=120)
