"""Every invalid setting or input fails loudly with a message naming the setting and the rule."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch

from megatron_lighthouse import LighthouseConfig, lighthouse_attention, select_indices
from megatron_lighthouse import attention as op
from megatron_lighthouse import config as config_module
from megatron_lighthouse.rotary import entry_rotary

GOOD = dict(levels=2, pooling_factor=2, topk=128)


@pytest.fixture
def no_work(monkeypatch):
    """The op's selection and attention fail the test if they run: a refusal must come before any work."""

    def ran(*args, **kwargs):
        raise AssertionError("the op ran its selection or attention before refusing the call")

    monkeypatch.setattr(op, "_select", ran)
    monkeypatch.setattr(op, "_attend_selected", ran)


def _qkv(n=1024, h=2, d=8, h_kv=None, dtype=torch.float32):
    return (
        torch.randn(1, n, h, d, dtype=dtype),
        torch.randn(1, n, h_kv or h, d, dtype=dtype),
        torch.randn(1, n, h_kv or h, d, dtype=dtype),
    )


@pytest.mark.parametrize(
    "settings,match",
    [
        (dict(topk=100), r"topk=100: must be a positive multiple of 128"),
        (dict(topk=0), r"topk=0"),
        (dict(pooling_factor=3), r"pooling_factor=3: must be a power of two"),
        (dict(pooling_factor=128), r"pooling_factor=128: .*<= 64"),
        (dict(pooling_factor=1), r"pooling_factor=1"),
        (dict(levels=1), r"levels=1: must be >= 2"),
        (dict(levels=2.0), r"levels=2.0: must be an int"),
        (dict(scorer="gla"), r"scorer='gla'"),
        (dict(dense_layers=(0, "x")), r"dense_layers"),
        (dict(dense_layers=5), r"dense_layers=5: must be a sequence of ints"),
        (dict(dense_layers="0,1"), r"dense_layers='0,1': must be a sequence of ints"),
    ],
)
def test_invalid_settings_fail_at_construction(settings, match):
    with pytest.raises(ValueError, match=match):
        LighthouseConfig(**{**GOOD, **settings})


@pytest.mark.parametrize(
    "n,settings,chunks,match",
    [
        (1000, dict(levels=3, pooling_factor=4, topk=128), 1, r"sequence length 1000: must be divisible by .* = 16"),
        (128, GOOD, 1, r"owns 64 coarsest-level entries, needs >= 128; use a sequence length >= 256"),
        (256, dict(levels=3, pooling_factor=2, topk=128), 1, r"owns 64 coarsest-level entries, needs >= 128"),
        (2048, dict(levels=2, pooling_factor=2, topk=256), 4, r"topk=256 with chunks=4"),
        (2048, dict(levels=2, pooling_factor=2, topk=384), 3, r"must be divisible by chunks=3"),
        (2048, GOOD, 0, r"chunks=0"),
    ],
)
def test_sequence_that_does_not_fit(n, settings, chunks, match):
    with pytest.raises(ValueError, match=match):
        LighthouseConfig(**settings).validate(n, chunks)
    q, k, v = _qkv(n)
    with pytest.raises(ValueError, match=match):
        lighthouse_attention(q, k, v, chunks=chunks, **settings)


@pytest.mark.parametrize("n,settings", [(256, GOOD), (512, dict(levels=3, pooling_factor=2, topk=128))])
def test_exactly_128_coarsest_entries_per_tile_is_valid(n, settings):
    LighthouseConfig(**settings).validate(n)
    assert lighthouse_attention(*_qkv(n), **settings).shape == (1, n, 2, 8)


def test_error_suggests_valid_lengths():
    cfg = LighthouseConfig(levels=3, pooling_factor=4, topk=256)
    with pytest.raises(ValueError, match=r"nearest valid lengths: \(4992, 5024\)"):
        cfg.validate(5000)
    with pytest.raises(ValueError, match=r"and at least 4096 \(each tile needs >= 128 coarsest-level entries\); "
                                         r"nearest valid lengths: \(4096,\)"):
        cfg.validate(4090)
    with pytest.raises(ValueError) as above_the_shortest:
        cfg.validate(5000)
    assert "at least" not in str(above_the_shortest.value)


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda q, k, v: (q[0], k, v), r"q must be 4-D"),
        (lambda q, k, v: (q, k[:, :512], v[:, :512]), r"must agree in batch, sequence and head dim"),
        (lambda q, k, v: (q, k, v[..., :4]), r"k and v must have the same shape"),
        (lambda q, k, v: (q, k[:, :, :1].expand(-1, -1, 3, -1), v[:, :, :1].expand(-1, -1, 3, -1)),
         r"multiple of kv heads"),
        (lambda q, k, v: (q, k.double(), v.double()), r"must share a dtype"),
        (lambda q, k, v: (q.long(), k, v), r"q must be float16, bfloat16, float32 or float64, got torch.int64"),
        (lambda q, k, v: [x.to(torch.float8_e4m3fn) for x in (q, k, v)],
         r"q must be float16, bfloat16, float32 or float64, got torch.float8_e4m3fn"),
        (lambda q, k, v: (q, k.to("meta"), v.to("meta")), r"must be on one device"),
        (lambda q, k, v: (q.numpy(), k, v), r"q must be a torch.Tensor"),
        (lambda q, k, v: (q[:0], k[:0], v[:0]), r"q has a zero-sized dimension"),
        (lambda q, k, v: (q[:, :, :0], k[:, :, :0], v[:, :, :0]), r"q has a zero-sized dimension"),
        (lambda q, k, v: (q, k[:, :, :0], v[:, :, :0]), r"k has a zero-sized dimension"),
        (lambda q, k, v: (q[..., :0], k[..., :0], v[..., :0]), r"q has a zero-sized dimension"),
    ],
)
def test_bad_inputs(make, match, no_work):
    q, k, v = make(*_qkv(h=2))
    with pytest.raises(ValueError, match=match):
        lighthouse_attention(q, k, v, **GOOD)


def test_bad_backend_and_select_inputs():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"backend='cuda'"):
        lighthouse_attention(q, k, v, backend="cuda", **GOOD)
    with pytest.raises(ValueError, match=r"sequence length"):
        select_indices(q[:, :1000], k[:, :1000], levels=3, pooling_factor=4, topk=128)


def test_dense_layer_set():
    cfg = LighthouseConfig(**GOOD)
    assert cfg.dense_layer_set(30) == {0, 1, 28, 29}
    with pytest.raises(ValueError, match=r"dense_layers entry 1: out of range for a model of 1 layers"):
        cfg.dense_layer_set(1)
    for bad in (2.5, True, -1, 0, "30"):
        with pytest.raises(ValueError, match=rf"num_layers={bad!r}: must be a positive int"):
            cfg.dense_layer_set(bad)


@pytest.mark.parametrize("name,value", [("num_heads", 0), ("num_heads", -8), ("num_heads", 2.0), ("head_dim", 0),
                                        ("head_dim", -64), ("head_dim", True)])
def test_attention_cost_needs_positive_heads_and_head_dim(name, value):
    with pytest.raises(ValueError, match=rf"{name}={value!r}: must be a positive int"):
        LighthouseConfig(**GOOD).attention_cost(256, **{"num_heads": 4, "head_dim": 64, name: value})


@pytest.mark.parametrize("levels,pooling_factor", [(57, 2), (29, 4), (11, 64), (10**6, 4), (10**18, 2)])
def test_levels_are_bounded_at_construction(levels, pooling_factor):
    """The shortest valid sequence, 128 * pooling_factor**(levels-1) tokens, must stay in int64: beyond that no
    sequence fits, and validate would compute with giant integers."""
    with pytest.raises(ValueError, match=rf"levels={levels} with pooling_factor={pooling_factor}: "
                                         rf"pooling_factor\*\*\(levels-1\) must be <= 2\*\*55"):
        LighthouseConfig(levels=levels, pooling_factor=pooling_factor)
    LighthouseConfig(levels=1 + 55 // (pooling_factor.bit_length() - 1), pooling_factor=pooling_factor)  # the largest


@pytest.mark.parametrize("scale", [-1.0, 0.0, float("nan"), float("inf"), "0.5", True, np.float32("nan"),
                                   np.float64(-0.5), np.bool_(True), torch.tensor(0.5)])
def test_softmax_scale_must_be_finite_and_positive(scale):
    with pytest.raises(ValueError, match=r"softmax_scale=.*: must be a finite number > 0"):
        lighthouse_attention(*_qkv(), softmax_scale=scale, **GOOD)


@pytest.mark.parametrize("scale", [np.float32(0.5), np.float64(0.5), np.int64(1), 1])
def test_softmax_scale_takes_any_real_number(scale):
    q, k, v = _qkv()
    want = lighthouse_attention(q, k, v, softmax_scale=float(scale), **GOOD)
    torch.testing.assert_close(lighthouse_attention(q, k, v, softmax_scale=scale, **GOOD), want, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("wrong", ["length", "dtype", "device", "not a tensor"])
def test_attention_callback_returning_the_wrong_result_is_refused(backend, wrong):
    """A dense kernel returning another shape would make the fused scatter read past its rows."""

    def attention(q, k, v, scale):
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
        return {"length": out[:, :, 1:], "dtype": out.double(), "device": out.to("meta"),
                "not a tensor": out.tolist()}[wrong]

    with pytest.raises(ValueError, match=r"attention= returned .*; a dense kernel must return its q's shape, dtype "
                                         r"and device, \(1, 2, 768, 8\) torch.float32 on cpu"):
        lighthouse_attention(*_qkv(), attention=attention, backend=backend, **GOOD)


@pytest.mark.parametrize("name", ["attention", "rotary"])
@pytest.mark.parametrize("value", [5, "sdpa", torch.zeros(4, 8)])
def test_attention_and_rotary_must_be_callables(name, value, no_work):
    with pytest.raises(ValueError, match=rf"{name} must be .*or None, got {type(value).__name__}"):
        lighthouse_attention(*_qkv(), **{name: value}, **GOOD)


@pytest.mark.parametrize("name,value,match", [
    ("attention", lambda q, k, v: q, r"attention=.*<lambda>: must take the 4 positional arguments "
                                    r"\(q, k, v, softmax_scale\); too many positional arguments"),
    ("attention", lambda q, k, v, scale, mask: q, r"attention=.*: must take the 4 .*missing a required argument"),
    ("rotary", lambda x: x, r"rotary=.*<lambda>: must take the 2 positional arguments \(x, positions\); too many"),
    ("rotary", lambda x, positions, z: x, r"rotary=.*: must take the 2 .*missing a required argument: 'z'"),
    ("rotary", lambda *, x, positions: x, r"rotary=.*: must take the 2 positional arguments"),
])
def test_callbacks_that_cannot_take_their_arguments_are_refused_before_any_work(name, value, match, no_work):
    with pytest.raises(ValueError, match=match):
        lighthouse_attention(*_qkv(), **{name: value}, **GOOD)


def test_callbacks_with_defaults_or_star_args_pass():
    q, k, v = _qkv()
    want = lighthouse_attention(q, k, v, **GOOD)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    for attention in (lambda *a: sdpa(*a[:3], is_causal=True, scale=a[3]),
                      lambda q, k, v, scale, extra=None: sdpa(q, k, v, is_causal=True, scale=scale)):
        torch.testing.assert_close(lighthouse_attention(q, k, v, attention=attention, **GOOD), want)


@pytest.mark.parametrize(
    "table,match",
    [
        (torch.zeros(1023, 1, 1, 8), r"rotary= table of 1023 positions: q has 1024 tokens"),
        (torch.zeros(1024, 16), r"rotary= table of 16 angles per position: more than q's head dim 8"),
        (torch.zeros(1024, 1, 1, 8, device="meta"), r"rotary= table on meta: q is on cpu"),
    ],
)
def test_a_rotary_table_that_does_not_fit_q_is_refused_before_any_work(table, match, no_work):
    with pytest.raises(ValueError, match=match):
        lighthouse_attention(*_qkv(), rotary=entry_rotary(table), **GOOD)


def test_triton_backend_refuses_float64(no_work, monkeypatch):
    """The fused kernels compute in fp32: float64 inputs would come back at fp32 precision."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # CPU tensors reach the dtype rule
    with pytest.raises(ValueError, match=r"backend='triton' with torch.float64 inputs: the fused kernels compute "
                                         r"in fp32; use backend='torch'"):
        lighthouse_attention(*_qkv(dtype=torch.float64), backend="triton", **GOOD)


def _cuda_like(dtype):
    """What resolve_backend reads of a CUDA tensor, on a machine without one."""
    return types.SimpleNamespace(is_cuda=True, dtype=dtype, device=torch.device("cuda", 0))


@pytest.mark.skipif(not op._triton_kernels_available(), reason="auto picks Triton only where it imports")
def test_auto_backend_runs_float64_on_torch():
    assert op.resolve_backend("auto", _cuda_like(torch.float32)) == "triton"
    assert op.resolve_backend("auto", _cuda_like(torch.float64)) == "torch"


# levels=2, p=2, topk=128: one tile per chunk over n/2 coarsest entries, so n = 2**21 + 2 tokens give 2**20 + 1
TOO_WIDE = 2**21 + 2


def test_triton_selection_tile_limit_is_checked_before_any_work(no_work, monkeypatch):
    """Triton holds a tile's coarsest entries in one block of at most 2**20: a wider tile is refused up front."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # CPU tensors reach the tile rule
    config = LighthouseConfig(**GOOD)
    match = (r"backend='(triton|auto)': levels=2, pooling_factor=2, topk=128 give 1048577 coarsest-level entries per "
             r"selection tile .*more than the 1048576 .*use backend='torch', or more levels or a larger topk")
    q = torch.zeros(1, 1, 1, 1).expand(1, TOO_WIDE, 1, 1)  # no memory behind the 2M tokens
    with pytest.raises(ValueError, match=match):
        lighthouse_attention(q, q, q, backend="triton", **GOOD)
    with pytest.raises(ValueError, match=match):
        select_indices(q, q, backend="triton", **GOOD)
    assert config.tile_entries(TOO_WIDE - 2) == config_module.MAX_TILE_ENTRIES  # the widest tile Triton takes
    assert op.resolve_backend("triton", q, config, TOO_WIDE - 2, 1) == "triton"
    with pytest.raises(ValueError, match=match):
        op.resolve_backend("triton", q, config, TOO_WIDE, 1)
    with pytest.raises(ValueError, match=r"1048577 coarsest-level entries per selection tile \(2097154 tokens per "
                                         r"chunk / pooling_factor\*\*\(levels-1\) / 1 tiles\)"):
        op.resolve_backend("triton", q, LighthouseConfig(**{**GOOD, "topk": 256}), 2 * TOO_WIDE, 2)
    assert op.resolve_backend("torch", q, config, TOO_WIDE, 1) == "torch"  # the oracle has no such limit


@pytest.mark.skipif(not op._triton_kernels_available(), reason="the kernels package is not importable")
def test_the_op_and_the_kernels_share_the_tile_limit():
    import lighthouse_kernels

    assert config_module.MAX_TILE_ENTRIES == lighthouse_kernels.MAX_TILE_ENTRIES == 2**20


@pytest.mark.skipif(not op._triton_kernels_available(), reason="auto picks Triton only where it imports")
def test_auto_backend_does_not_fall_back_silently_past_the_tile_limit():
    with pytest.raises(ValueError, match=r"backend='auto': .*1048577 coarsest-level entries per selection tile"):
        op.resolve_backend("auto", _cuda_like(torch.bfloat16), LighthouseConfig(**GOOD), TOO_WIDE, 1)


def test_triton_backend_on_cpu_tensors_outside_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match=r"backend='triton' on cpu tensors: the Triton kernels run on CUDA"):
        lighthouse_attention(*_qkv(), backend="triton", **GOOD)


@pytest.mark.parametrize("chunks", [0, -1, 1.5, True, None, "2"])
def test_chunks_must_be_a_positive_int(chunks):
    with pytest.raises(ValueError, match=r"chunks=.*: must be a positive int"):
        lighthouse_attention(*_qkv(), chunks=chunks, **GOOD)
    with pytest.raises(ValueError, match=r"chunks=.*: must be a positive int"):
        select_indices(*_qkv()[:2], chunks=chunks, **GOOD)


@pytest.mark.parametrize("bad", [0, -1, 2.0, True, None, "2", 2**64, float("inf"), float("nan")])
@pytest.mark.parametrize("method", ["tiles", "tile_entries", "validate", "suggest_lengths", "subsequence_length",
                                    "attention_cost", "for_sequence"])
def test_every_count_of_the_config_is_checked_alike(method, bad):
    """One rule for every count a config method takes (chunks, sequence length): an int (not a bool or float),
    >= 1, at most 2**62 (int64 pyramid positions); a ValueError naming it, never a ZeroDivisionError or TypeError."""
    cfg = LighthouseConfig()
    calls = {"tiles": lambda: cfg.tiles(bad), "tile_entries": lambda: cfg.tile_entries(32768, bad),
             "validate": lambda: cfg.validate(32768, bad), "suggest_lengths": lambda: cfg.suggest_lengths(bad),
             "subsequence_length": lambda: cfg.subsequence_length(bad),
             "attention_cost": lambda: cfg.attention_cost(32768, 8, 64, bad),
             "for_sequence": lambda: LighthouseConfig.for_sequence(bad)}
    rule = "must be at most 2\\*\\*62" if bad == 2**64 else "must be a positive int"
    with pytest.raises(ValueError, match=rf"^(chunks|seq_len)={bad!r}: {rule}"):
        calls[method]()


def test_counts_the_config_cannot_split():
    cfg = LighthouseConfig()
    with pytest.raises(ValueError, match=r"topk=2048 with chunks=32: the per-chunk budget"):
        cfg.tiles(32)
    assert cfg.tiles(16) == 1 and cfg.tiles(np.int64(2)) == 8
    with pytest.raises(ValueError, match=r"seq_len=2\*\*64|seq_len=18446744073709551616: must be at most 2\*\*62"):
        LighthouseConfig.for_sequence(2**64)
    with pytest.raises(ValueError, match=r"for_sequence: topK: not a setting; the settings: pooling_factor, topk"):
        LighthouseConfig.for_sequence(1 << 20, topK=128)
    with pytest.raises(ValueError, match=r"LighthouseConfig.topk=.*at most 2\*\*62"):
        LighthouseConfig(topk=2**70)
    with pytest.raises(ValueError, match=r"dense_layers=\(18446744073709551616,\): must be a sequence of ints"):
        LighthouseConfig(dense_layers=(2**64,))
    assert LighthouseConfig(levels=np.int64(3), dense_layers=iter([0, -1])).dense_layers == (0, -1)


def test_config_and_keywords_are_one_or_the_other():
    q, k, v = _qkv()
    config = LighthouseConfig(**GOOD)
    assert torch.equal(lighthouse_attention(q, k, v, config=config), lighthouse_attention(q, k, v, **GOOD))
    with pytest.raises(ValueError, match=r"config= and topk=: give the settings one way, not both"):
        lighthouse_attention(q, k, v, config=config, topk=128)
    with pytest.raises(ValueError, match=r"config=.*must be a LighthouseConfig"):
        lighthouse_attention(q, k, v, config=dict(GOOD))


def test_growing_pyramid_keeps_the_top_level_bounded():
    """LighthouseConfig.for_sequence: the fewest levels whose top level has at most max_top_level entries."""
    pick = {n: LighthouseConfig.for_sequence(n).levels for n in (1 << 15, 1 << 17, 1 << 18, 1 << 20, 1 << 22)}
    assert pick == {1 << 15: 2, 1 << 17: 3, 1 << 18: 3, 1 << 20: 4, 1 << 22: 5}
    for n, levels in pick.items():
        cfg = LighthouseConfig.for_sequence(n)
        assert n // cfg.pooling_factor ** (levels - 1) <= 16384 < n // cfg.pooling_factor ** (levels - 2)
        assert cfg.subsequence_length(n) <= 16384 + (levels - 1) * 4 * 2048
    assert LighthouseConfig.for_sequence(4096, pooling_factor=2, topk=128, max_top_level=1024).levels == 3
    assert LighthouseConfig.for_sequence(1 << 20, chunks=4).levels == 3  # per chunk: 256K tokens
    with pytest.raises(ValueError, match=r"chooses levels itself"):
        LighthouseConfig.for_sequence(1 << 20, levels=3)
    with pytest.raises(ValueError, match=r"owns .* coarsest-level entries"):
        LighthouseConfig.for_sequence(4096)  # too short for topk=2048 at any pyramid


def test_for_sequence_names_max_top_level_when_it_leaves_no_valid_levels():
    """At 1M tokens a top level of at most 2048 entries needs levels=6, where each of the 16 tiles owns 64 < 128
    coarsest entries; levels=5 is valid with 4096: the bound is what fails, not levels (for_sequence's choice)."""
    with pytest.raises(ValueError, match=r"max_top_level=2048: .*levels=6, .*leaves 1024, .*split evenly into the 16 "
                                         r"selection tiles of >= 128 entries each; levels=5 fits with 4096: use "
                                         r"max_top_level >= 4096") as err:
        LighthouseConfig.for_sequence(1 << 20, max_top_level=2048)
    assert "lower topk/levels" not in str(err.value)
    assert LighthouseConfig.for_sequence(1 << 20, max_top_level=4096).levels == 5
    for bad in (True, 0, 2.5):
        with pytest.raises(ValueError, match=rf"max_top_level={bad!r}: must be a positive int"):
            LighthouseConfig.for_sequence(1 << 20, max_top_level=bad)
