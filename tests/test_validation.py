"""Every invalid setting or input fails loudly with a message naming the setting and the rule."""

from __future__ import annotations

import pytest
import torch

from megatron_lighthouse import LighthouseConfig, lighthouse_attention, select_indices

GOOD = dict(levels=2, pooling_factor=2, topk=128)


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
        (lambda q, k, v: (q.long(), k, v), r"q must be floating point"),
        (lambda q, k, v: (q, k.to("meta"), v.to("meta")), r"must be on one device"),
        (lambda q, k, v: (q.numpy(), k, v), r"q must be a torch.Tensor"),
        (lambda q, k, v: (q[:0], k[:0], v[:0]), r"q has a zero-sized dimension"),
        (lambda q, k, v: (q[:, :, :0], k[:, :, :0], v[:, :, :0]), r"q has a zero-sized dimension"),
        (lambda q, k, v: (q, k[:, :, :0], v[:, :, :0]), r"k has a zero-sized dimension"),
        (lambda q, k, v: (q[..., :0], k[..., :0], v[..., :0]), r"q has a zero-sized dimension"),
    ],
)
def test_bad_inputs(make, match):
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


@pytest.mark.parametrize("scale", [-1.0, 0.0, float("nan"), float("inf"), "0.5", True])
def test_softmax_scale_must_be_finite_and_positive(scale):
    with pytest.raises(ValueError, match=r"softmax_scale=.*: must be a finite number > 0"):
        lighthouse_attention(*_qkv(), softmax_scale=scale, **GOOD)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("wrong", ["length", "dtype", "not a tensor"])
def test_attention_callback_returning_the_wrong_result_is_refused(backend, wrong):
    """A dense kernel returning another shape would make the fused scatter read past its rows."""

    def attention(q, k, v, scale):
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
        return {"length": out[:, :, 1:], "dtype": out.double(), "not a tensor": out.tolist()}[wrong]

    with pytest.raises(ValueError, match=r"attention= returned .*a dense kernel must return its q's shape and dtype"):
        lighthouse_attention(*_qkv(), attention=attention, backend=backend, **GOOD)


def test_triton_backend_on_cpu_tensors_outside_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match=r"backend='triton' on cpu tensors: the Triton kernels run on CUDA"):
        lighthouse_attention(*_qkv(), backend="triton", **GOOD)


@pytest.mark.parametrize("chunks", [0, -1, 1.5, True])
def test_chunks_must_be_a_positive_int(chunks):
    with pytest.raises(ValueError, match=r"chunks=.*: must be an int >= 1"):
        lighthouse_attention(*_qkv(), chunks=chunks, **GOOD)


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
