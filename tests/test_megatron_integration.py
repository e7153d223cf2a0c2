"""Megatron-Core integration on CPU (gloo world of 1): tiny GPT models with Lighthouse core attention."""

from __future__ import annotations

import dataclasses
import functools
import sys
import types

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("megatron.core")

from megatron.core.models.gpt import gpt_layer_specs  # noqa: E402
from megatron.core.transformer.enums import AttnMaskType  # noqa: E402
from megatron.core.transformer.spec_utils import ModuleSpec  # noqa: E402

from megatron_lighthouse import lighthouse_attention  # noqa: E402
from megatron_lighthouse.config import LighthouseConfig  # noqa: E402
from megatron_lighthouse.core_attention import LighthouseCoreAttention, LighthouseCoreAttentionSubmodules  # noqa: E402
from megatron_lighthouse.export import dense_spec_for, dense_state_dict, save_dense_checkpoint  # noqa: E402
from megatron_lighthouse.sdpa_core_attention import SDPACoreAttention  # noqa: E402
from megatron_lighthouse.spec import (  # noqa: E402
    get_gpt_decoder_block_dense_spec,
    get_gpt_decoder_block_with_lighthouse_spec,
    get_gpt_layer_dense_spec,
    get_gpt_layer_with_lighthouse_spec,
)
from megatron_lighthouse.core_attention import TRAINING_ONLY  # noqa: E402
from megatron_lighthouse.schedule import (  # noqa: E402
    LighthouseSchedule,
    lighthouse_enabled,
    lighthouse_modules,
    set_lighthouse_enabled,
)
from megatron_lighthouse.transformer_config import lighthouse_config_from_env  # noqa: E402

from megatron_utils import (  # noqa: E402
    ENV_SPEC,
    LIGHTHOUSE,
    SEQ,
    batch,
    init_megatron,
    megatron_lm_spec as _megatron_lm_spec,
    set_lighthouse_environment as _environment,
    tiny_config,
    tiny_gpt,
)

DENSE_LAYERS = {0, 1, 4, 5}  # (0, 1, -2, -1) of 6 layers


@pytest.fixture(scope="module", autouse=True)
def _megatron():
    init_megatron()


def _pair(num_query_groups: int = 4):
    """A Lighthouse GPT and the dense GPT with the same weights."""
    cfg = tiny_config(num_query_groups=num_query_groups)
    light = tiny_gpt(cfg, get_gpt_decoder_block_with_lighthouse_spec(cfg, use_transformer_engine=False))
    dense = tiny_gpt(cfg, get_gpt_decoder_block_dense_spec(cfg, use_transformer_engine=False), seed=123)
    dense.load_state_dict(light.state_dict())
    return light, dense


def _logits(model, tokens, position_ids):
    return model(tokens, position_ids, None)


def test_block_spec_layer_types_forward_backward():
    light, _ = _pair()
    for i, layer in enumerate(light.decoder.layers):
        core = layer.self_attention.core_attention
        if i in DENSE_LAYERS:
            assert type(core) is SDPACoreAttention, i
        else:
            assert type(core) is LighthouseCoreAttention and type(core.inner) is SDPACoreAttention, i
            assert core.enabled and not core.dense_layer
    tokens, pos, labels = batch()
    loss = light(tokens, pos, None, labels=labels)
    assert loss.shape == tokens.shape
    loss.mean().backward()
    grads = [p.grad for p in light.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    qkv = light.decoder.layers[2].self_attention.linear_qkv.weight.grad
    assert qkv.abs().sum() > 0


@pytest.mark.parametrize("num_query_groups", [4, 2])
def test_disabled_equals_dense_and_enabled_differs(num_query_groups):
    light, dense = _pair(num_query_groups)
    tokens, pos, _ = batch()
    with torch.no_grad():
        reference = _logits(dense, tokens, pos)
        enabled = _logits(light, tokens, pos)
        assert set_lighthouse_enabled(light, False) == 2
        disabled = _logits(light, tokens, pos)
    torch.testing.assert_close(disabled, reference, rtol=1e-5, atol=1e-5)
    assert (enabled - reference).abs().max() > 1e-3


def test_disabled_equals_megatron_stock_local_model(monkeypatch):
    """Megatron's own local spec (``DotProductAttention``) with the Lighthouse model's weights (strict load)."""
    from megatron.core.tensor_parallel import random as megatron_random
    from megatron.core.utils import GlobalMemoryBuffer

    # Two CUDA assumptions of DotProductAttention, off on CPU: its (beta=0, never read) baddbmm scratch comes from
    # a CUDA buffer, and it forks the CUDA RNG for dropout (0 here): Megatron's inference tracker forks nothing.
    monkeypatch.setattr(GlobalMemoryBuffer, "get_tensor",
                        lambda self, shape, dtype, name, mem_alloc_context=None: torch.empty(shape, dtype=dtype))
    for name in ("_CUDA_RNG_STATE_TRACKER", "_CUDA_RNG_STATE_TRACKER_INITIALIZED"):
        monkeypatch.setattr(megatron_random, name, getattr(megatron_random, name))
    megatron_random.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
    light, _ = _pair(2)
    stock = tiny_gpt(tiny_config(num_query_groups=2), gpt_layer_specs.get_gpt_layer_local_spec(), seed=99)
    stock.load_state_dict(light.state_dict())
    # Megatron-LM's distributed checkpoints (torch_dist) hold the sharded state dict: the same keys and shardings,
    # so a Lighthouse checkpoint loads into Megatron-LM's own local model.
    light_sharded, stock_sharded = light.sharded_state_dict(), stock.sharded_state_dict()
    assert sorted(light_sharded) == sorted(stock_sharded)
    for key, sharded in light_sharded.items():
        for attr in ("key", "global_shape", "global_offset", "axis_fragmentations"):
            assert getattr(sharded, attr, None) == getattr(stock_sharded[key], attr, None), (key, attr)
    tokens, pos, _ = batch()
    mask = torch.ones(1, 1, SEQ, SEQ, dtype=torch.bool).triu(1)  # Megatron-LM's causal mask (True: masked out)
    with torch.no_grad(), lighthouse_enabled(light, False):
        torch.testing.assert_close(light(tokens, pos, mask), stock(tokens, pos, mask), rtol=1e-5, atol=1e-5)
    light.load_state_dict(stock.state_dict())


@pytest.mark.parametrize("num_query_groups", [4, 2])
def test_enabled_layer_equals_lighthouse_attention(num_query_groups):
    light, _ = _pair(num_query_groups)
    core = light.decoder.layers[3].self_attention.core_attention
    seen = {}
    core.register_forward_hook(lambda mod, args, out: seen.update(args=args, out=out))
    tokens, pos, _ = batch()
    with torch.no_grad():
        _logits(light, tokens, pos)
    query, key, value = seen["args"][:3]
    assert query.shape == (SEQ, 2, 4, 16) and key.shape == (SEQ, 2, num_query_groups, 16)
    expected = lighthouse_attention(
        query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1),
        levels=LIGHTHOUSE.levels, pooling_factor=LIGHTHOUSE.pooling_factor, topk=LIGHTHOUSE.topk,
    )
    torch.testing.assert_close(seen["out"], expected.transpose(0, 1).reshape(SEQ, 2, 64), rtol=1e-5, atol=1e-6)


def test_state_dict_identical_and_checkpoint_roundtrip(tmp_path):
    light, dense = _pair(2)
    light_sd, dense_sd = light.state_dict(), dense.state_dict()
    assert list(light_sd) == list(dense_sd)
    assert all(getattr(light_sd[k], "shape", None) == getattr(dense_sd[k], "shape", None) for k in light_sd)
    assert not any(".inner." in k for k in light_sd)
    light_sharded, dense_sharded = light.sharded_state_dict(), dense.sharded_state_dict()
    assert sorted(light_sharded) == sorted(dense_sharded)
    for key, sharded in light_sharded.items():  # same global shapes and sharding of every ShardedTensor
        other = dense_sharded[key]
        assert type(sharded) is type(other), key
        for attr in ("key", "global_shape", "global_offset", "axis_fragmentations"):
            assert getattr(sharded, attr, None) == getattr(other, attr, None), (key, attr)
        if isinstance(getattr(sharded, "data", None), torch.Tensor):
            assert sharded.data.shape == other.data.shape, key

    path = tmp_path / "dense.pt"
    save_dense_checkpoint(light, path)
    fresh_dense = tiny_gpt(tiny_config(num_query_groups=2),
                           get_gpt_decoder_block_dense_spec(tiny_config(), use_transformer_engine=False), seed=7)
    fresh_dense.load_state_dict(torch.load(path))
    tokens, pos, _ = batch()
    with torch.no_grad(), lighthouse_enabled(light, False):
        torch.testing.assert_close(_logits(fresh_dense, tokens, pos), _logits(light, tokens, pos),
                                   rtol=1e-5, atol=1e-5)
    # and back: a dense checkpoint loads into the Lighthouse model (strict)
    light.load_state_dict(dense_state_dict(fresh_dense))


class _StatefulInner(SDPACoreAttention):
    """An inner core attention with state: a buffer, and extra state as TE's modules keep their FP8 metadata
    (``get_extra_state`` -> ``<prefix>_extra_state``), to check the key remapping."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("scale_state", torch.arange(3.0))
        self.meta = torch.zeros(2)

    def get_extra_state(self):
        return self.meta.clone()

    def set_extra_state(self, state):
        self.meta = state.clone()


def _core(config, layer_number=3, inner=_StatefulInner, **kwargs):
    return LighthouseCoreAttention(
        config, layer_number, AttnMaskType.causal, "self",
        submodules=LighthouseCoreAttentionSubmodules(core_attention=ModuleSpec(module=inner)), **kwargs,
    )


def test_inner_state_keys_hidden():
    cfg = tiny_config()
    core = _core(cfg)
    dense = torch.nn.ModuleDict({"core_attention": _StatefulInner(cfg, 3, AttnMaskType.causal, "self")})
    light = torch.nn.ModuleDict({"core_attention": core})
    assert list(light.state_dict()) == list(dense.state_dict()) == ["core_attention.scale_state",
                                                                    "core_attention._extra_state"]
    assert list(core.state_dict()) == ["scale_state", "_extra_state"]
    dense.core_attention.meta = torch.tensor([7.0, 8.0])
    dense.core_attention.scale_state.fill_(5.0)
    light.load_state_dict(dense.state_dict())  # dense -> Lighthouse (strict)
    assert torch.equal(core.inner.scale_state, torch.full((3,), 5.0))
    assert torch.equal(core.inner.meta, torch.tensor([7.0, 8.0]))
    core.inner.meta = torch.tensor([1.0, 2.0])
    dense.load_state_dict(light.state_dict())  # and back
    assert torch.equal(dense.core_attention.meta, torch.tensor([1.0, 2.0]))


def test_inner_built_with_query_heads_as_kv_heads_and_unknown_arguments_refused():
    cfg = tiny_config(num_query_groups=2)
    seen = {}

    class Recording(SDPACoreAttention):
        def __init__(self, config, layer_number, attn_mask_type, attention_type, softmax_scale=None,
                     cp_comm_type=None):
            seen.update(groups=config.num_query_groups, softmax_scale=softmax_scale, cp_comm_type=cp_comm_type)
            super().__init__(config, layer_number, attn_mask_type, attention_type, softmax_scale=softmax_scale)

    _core(cfg, inner=Recording, softmax_scale=0.5, cp_comm_type="p2p", pg_collection=None)
    assert seen == {"groups": 4, "softmax_scale": 0.5, "cp_comm_type": "p2p"}
    assert cfg.num_query_groups == 2
    # an argument the inner attention does not take is an error, not silently dropped
    with pytest.raises(ValueError, match=r"LighthouseCoreAttention \(layer 3\): fp8='e4m3': not an argument of the "
                                         r"inner core attention Recording"):
        _core(cfg, inner=Recording, fp8="e4m3")
    with pytest.raises(ValueError, match=r"pg_collection=.*: not an argument of the inner core attention Recording"):
        _core(cfg, inner=Recording, pg_collection=types.SimpleNamespace(cp=None))
    # a layer kept dense builds its inner exactly as the dense model does, and takes the kv heads as they are;
    # the inner may also be given as a functools.partial (megatron-core >= 0.17 style builders)
    dense_core = LighthouseCoreAttention(
        cfg, 1, AttnMaskType.causal, "self", softmax_scale=0.25,
        submodules=LighthouseCoreAttentionSubmodules(core_attention=functools.partial(Recording)),
    )
    assert dense_core.dense_layer and seen == {"groups": 2, "softmax_scale": 0.25, "cp_comm_type": None}
    q, kv = torch.randn(SEQ, 1, 4, 16), torch.randn(SEQ, 1, 2, 16)
    keys = []
    dense_core.inner.register_forward_pre_hook(lambda mod, args: keys.append(tuple(args[1].shape)))
    expected = SDPACoreAttention(cfg, 1, AttnMaskType.causal, "self", softmax_scale=0.25)(q, kv, kv, None)
    torch.testing.assert_close(dense_core(q, kv, kv, None), expected)
    assert keys == [(SEQ, 1, 2, 16)]


def test_gqa_training_loop_loss_decreases():
    cfg = tiny_config(num_query_groups=2)
    model = tiny_gpt(cfg, get_gpt_decoder_block_with_lighthouse_spec(cfg, use_transformer_engine=False))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    tokens, pos, labels = batch(batch_size=2)
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = model(tokens, pos, None, labels=labels).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_bad_sequence_length_clear_error():
    light, _ = _pair()
    tokens, pos, _ = batch(seq=192)
    with pytest.raises(ValueError, match=r"\(layer 3\), 192 tokens: sequence length 192: each tile owns 96"):
        _logits(light, tokens, pos)


def test_unsupported_inputs_raise():
    cfg = tiny_config()
    with pytest.raises(ValueError, match="only self-attention"):
        LighthouseCoreAttention(cfg, 3, AttnMaskType.causal, "cross", submodules=LighthouseCoreAttentionSubmodules(
            core_attention=SDPACoreAttention))
    with pytest.raises(ValueError, match="only causal"):
        LighthouseCoreAttention(
            cfg, 3, AttnMaskType.padding, "self",
            submodules=LighthouseCoreAttentionSubmodules(core_attention=SDPACoreAttention))
    with pytest.raises(ValueError, match="no Lighthouse settings"):
        _core(tiny_config(lighthouse=None))
    core = _core(cfg)
    q = torch.randn(SEQ, 1, 4, 16)
    with pytest.raises(ValueError, match="packed"):
        core(q, q, q, None, packed_seq_params=object())
    with pytest.raises(ValueError, match="attention_bias"):
        core(q, q, q, None, attention_bias=torch.zeros(1))
    with pytest.raises(ValueError, match="training-only"):  # Megatron's inference after the prompt
        core(q, q, q, None, attn_mask_type=AttnMaskType.no_mask)
    with pytest.raises(ValueError, match="training-only"):  # decode: one query against a KV cache
        core(q[:1], q, q, None)
    for number in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match=r"layer_number=.*: must be an int >= 1"):
            _core(cfg, layer_number=number)
    for scale in (-1.0, 0.0, float("nan")):
        with pytest.raises(ValueError, match=r"softmax_scale=.*: must be a finite number > 0"):
            _core(cfg, softmax_scale=scale)
    for bad in (None, "config", {"num_layers": 6}):
        with pytest.raises(ValueError, match=r"^SDPACoreAttention: config of type \w+: must be a megatron.core "):
            SDPACoreAttention(bad, 1, AttnMaskType.causal, "self")


def test_query_heads_must_be_a_multiple_of_the_key_value_heads():
    """More key/value heads than query heads gave all-zero outputs, a count that does not divide them a bare
    RuntimeError: refused at construction (config) and at each call (tensors), naming both counts."""
    def sdpa(cfg):
        return SDPACoreAttention(cfg, 3, AttnMaskType.causal, "self")

    for groups in (8, 3):
        for build in (_core, sdpa):
            with pytest.raises(ValueError, match=rf"\(layer 3\): config.num_attention_heads=4 with "
                                                 rf"config.num_query_groups={groups}: the query heads must be a "
                                                 r"multiple of the query groups"):
                build(tiny_config(num_query_groups=groups))
    cfg = tiny_config(num_query_groups=2)
    disabled = _core(cfg)
    disabled.enabled = False
    q = torch.randn(SEQ, 2, 4, 16)
    for heads in (8, 3, 0):
        kv = torch.randn(SEQ, 2, heads, 16)
        for module in (sdpa(cfg), _core(cfg), disabled):
            with pytest.raises(ValueError, match=rf"\(layer 3\): 4 query heads for {heads} key and {heads} value "
                                                 r"heads: the query heads must be a multiple of the key/value heads"):
                module(q, kv, kv, None)
    with pytest.raises(ValueError, match=r"4 query heads for 2 key and 4 value heads"):
        sdpa(cfg)(q, q[:, :, :2], q, None)


def test_inputs_must_be_sbhd():
    """A 3-D query (or key / value) gave "not enough values to unpack": refused with the layout it needs."""
    cfg = tiny_config()
    q = torch.randn(SEQ, 2, 4, 16)
    for module in (_core(cfg), SDPACoreAttention(cfg, 3, AttnMaskType.causal, "self")):
        with pytest.raises(ValueError, match=r"\(layer 3\): query of shape \(256, 2, 64\): must be 4-D \[s, b, heads, "
                                             r"head_dim\] \(Megatron's sbhd layout\)"):
            module(q.flatten(2), q, q, None)
        with pytest.raises(ValueError, match=r"\(layer 3\): key of shape \(256, 4, 16\): must be 4-D"):
            module(q, q[:, 0], q, None)
        with pytest.raises(ValueError, match=r"\(layer 3\): value of shape \(256, 2, 4, 16, 1\): must be 4-D"):
            module(q, q, q[..., None], None)
        with pytest.raises(ValueError, match=r"\(layer 3\): key is a list: must be a tensor \[s, b, heads, "
                                             r"head_dim\]"):
            module(q, [q], q, None)


def test_sdpa_attention_dropout_must_be_a_probability():
    """-0.5 failed only at the first training forward (with torch's message), 1.5 with a bare RuntimeError."""
    for p in (-0.5, 1.0, 1.5, float("nan"), True, "0.1"):
        with pytest.raises(ValueError, match=r"^SDPACoreAttention \(layer 3\): attention_dropout=.*: must be a "
                                             r"probability, 0 <= p < 1$"):
            SDPACoreAttention(tiny_config(), 3, AttnMaskType.causal, "self", attention_dropout=p)
    with pytest.raises(ValueError, match=r"\(layer 3\): config.attention_dropout=-0.5: must be a probability"):
        SDPACoreAttention(tiny_config(attention_dropout=-0.5), 3, AttnMaskType.causal, "self")
    assert SDPACoreAttention(tiny_config(attention_dropout=0.5), 3, AttnMaskType.causal, "self").dropout_p == 0.5
    assert SDPACoreAttention(tiny_config(), 3, AttnMaskType.causal, "self", attention_dropout=0).dropout_p == 0


def test_lighthouse_is_never_settable_after_construction():
    core = _core(tiny_config())
    with pytest.raises(AttributeError):
        core.lighthouse = LighthouseConfig(levels=3, pooling_factor=2, topk=128)
    with pytest.raises(dataclasses.FrozenInstanceError):
        core.lighthouse.topk = 256


def _causal_mask(batch_size, seq=SEQ):
    return torch.ones(batch_size, 1, seq, seq, dtype=torch.bool).triu(1)


def test_attention_masks_other_than_causal_are_refused():
    """Padding and document masks change who may attend to whom: a Lighthouse layer refuses them (so does the
    SDPA core attention), Megatron's plain causal mask passes, also through a whole GPTModel."""
    cfg = tiny_config()
    core = _core(cfg)
    q = torch.randn(SEQ, 2, 4, 16)
    torch.testing.assert_close(core(q, q, q, _causal_mask(2)), core(q, q, q, None))
    padding = _causal_mask(2)
    padding[1, :, :, SEQ - 8:] = True  # the last 8 tokens of row 1 are padding
    document = _causal_mask(2)
    document[:, :, SEQ // 2:, :SEQ // 2] = True  # --reset-attention-mask: two documents per row
    for mask in (padding, document, _causal_mask(2)[..., :-1], torch.zeros(2, 1, SEQ, SEQ, dtype=torch.bool)):
        with pytest.raises(ValueError, match=r"is not the plain causal mask: padding and document masks"):
            core(q, q, q, mask)
        with pytest.raises(ValueError, match=r"SDPACoreAttention \(layer 3\): attention_mask .* not the plain causal"):
            SDPACoreAttention(cfg, 3, AttnMaskType.causal, "self")(q, q, q, mask)
    light, _ = _pair()
    tokens, pos, _ = batch()
    with pytest.raises(ValueError, match=r"\(layer 1\): attention_mask .* not the plain causal mask"):
        light(tokens, pos, document)  # layer 1 is kept dense: its SDPA core attention refuses it first
    light(tokens, pos, _causal_mask(2))


def test_a_switched_layer_is_the_stock_one_for_packed_sequences_and_inference():
    """Switched to dense, packed sequences, masks and decoding go to the inner attention as in the dense model."""
    calls = []

    class Recording(SDPACoreAttention):
        def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                    packed_seq_params=None):
            calls.append((tuple(key.shape), attn_mask_type, packed_seq_params))
            return torch.zeros(*query.shape[:-2], query.shape[-2] * query.shape[-1])

    core = _core(tiny_config(num_query_groups=2), inner=Recording)
    core.enabled = False
    q, kv = torch.randn(SEQ, 1, 4, 16), torch.randn(SEQ, 1, 2, 16)
    packed = object()
    core(q, kv, kv, None, packed_seq_params=packed)
    core(q[:1], kv, kv, None, attn_mask_type=AttnMaskType.no_mask)
    core(q[:, 0], kv[:, 0], kv[:, 0], None, packed_seq_params=packed)  # THD: [t, h, d], kv heads expanded too
    assert calls == [((SEQ, 1, 4, 16), None, packed), ((SEQ, 1, 4, 16), AttnMaskType.no_mask, None),
                     ((SEQ, 4, 16), None, packed)]


def test_sdpa_core_attention_decodes_against_a_kv_cache():
    """Megatron's static-batching inference: after the prompt (no_mask) one query attends to every cached key;
    a shorter query block continues the cache causally. Both equal the matching rows of full causal attention."""
    cfg = tiny_config(num_query_groups=2)
    core = SDPACoreAttention(cfg, 3, AttnMaskType.causal, "self")
    q, kv = torch.randn(SEQ, 2, 4, 16), torch.randn(SEQ, 2, 2, 16)
    full = core(q, kv, kv, None)
    torch.testing.assert_close(core(q[-1:], kv, kv, None, attn_mask_type=AttnMaskType.no_mask), full[-1:])
    torch.testing.assert_close(core(q[-5:], kv, kv, None), full[-5:], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"no_mask with 256 queries for 256 keys"):
        core(q, kv, kv, None, attn_mask_type=AttnMaskType.no_mask)


def test_inference_through_megatron_is_refused_while_lighthouse_runs():
    light, _ = _pair()
    attention = light.decoder.layers[3].self_attention
    hidden = torch.randn(SEQ, 1, 64)
    with pytest.raises(ValueError, match=r"LighthouseSelfAttention \(layer 4\): Lighthouse is training-only"):
        attention(hidden, None, inference_context=object())
    assert TRAINING_ONLY.startswith("Lighthouse is training-only: switch to dense attention")


def test_unsupported_config_settings_raise():
    window = tiny_config(window_size=(64, 0))
    with pytest.raises(ValueError, match=r"LighthouseCoreAttention \(layer 3\): window_size=\(64, 0\)"):
        _core(window)
    with pytest.raises(ValueError, match=r"_StatefulInner \(layer 1\): window_size"):
        _core(window, layer_number=1)  # kept dense: the inner attention (SDPA-based here) decides
    with pytest.raises(ValueError, match=r"qk_clip=True"):
        _core(tiny_config(qk_clip=True, qk_clip_alpha=0.5, qk_clip_threshold=100.0), layer_number=1)
    with pytest.raises(ValueError, match=r"softmax_type='learnable'"):
        SDPACoreAttention(tiny_config(softmax_type="learnable"), 3, AttnMaskType.causal, "self")


@pytest.mark.parametrize("name", ["fp8_dot_product_attention", "fp8_multi_head_attention"])
def test_fp8_attention_is_refused_on_lighthouse_layers_only(name):
    """FP8 attention inputs are refused where Lighthouse runs (set after __post_init__, which wants TE for FP8);
    a layer kept dense builds, and FP8 linear layers alone (config.fp8) pass."""
    cfg = tiny_config()
    setattr(cfg, name, True)
    with pytest.raises(ValueError, match=rf"LighthouseCoreAttention \(layer 3\): {name}=True: not supported on "
                                         rf"Lighthouse layers .* FP8 linear layers \(config.fp8, --fp8-format\) work"):
        _core(cfg)
    assert _core(cfg, layer_number=1).dense_layer
    linear_only = tiny_config()
    linear_only.fp8 = "hybrid"
    assert not _core(linear_only).dense_layer


def test_transformer_engine_variant_without_transformer_engine_raises():
    """CI has no TransformerEngine: the TE variants (the default) say so, naming the setting."""
    cfg = tiny_config()
    for build in (lambda: get_gpt_layer_with_lighthouse_spec(cfg),
                  lambda: get_gpt_decoder_block_with_lighthouse_spec(cfg),
                  lambda: get_gpt_decoder_block_dense_spec(cfg, use_transformer_engine=True)):
        with pytest.raises(ImportError, match=r"use_transformer_engine=True needs TransformerEngine .* "
                                              r"use_transformer_engine=False"):
            build()


def test_context_parallel_group_of_the_wrong_size_raises():
    """A CP group whose size is not config.context_parallel_size: refused at construction, naming both."""
    two_ranks = types.SimpleNamespace(cp=types.SimpleNamespace(size=lambda: 2))
    for build in (lambda cfg, **kw: _core(cfg, **kw),
                  lambda cfg, **kw: SDPACoreAttention(cfg, 3, AttnMaskType.causal, "self", **kw)):
        with pytest.raises(ValueError, match=r"group has 1 ranks but config.context_parallel_size=2"):
            build(tiny_config(context_parallel_size=2))  # Megatron's CP group here: this one process
        with pytest.raises(ValueError, match=r"group has 2 ranks but config.context_parallel_size=1"):
            build(tiny_config(), pg_collection=two_ranks)
    assert _core(tiny_config(), pg_collection=types.SimpleNamespace(cp=dist.group.WORLD)).cp_group is None


def test_switch_schedule_and_wrappers():
    light, _ = _pair()

    class Wrapper(torch.nn.Module):  # stands in for DDP / Float16Module
        def __init__(self, module):
            super().__init__()
            self.module = module

    chunks = [Wrapper(light)]
    assert len(lighthouse_modules(chunks)) == 2
    with lighthouse_enabled(chunks, False) as n:
        assert n == 2 and not any(m.enabled for m in lighthouse_modules(light))
    assert all(m.enabled for m in lighthouse_modules(light))
    schedule = LighthouseSchedule(dense_from_iteration=10)
    assert schedule.enabled_at(9) and not schedule.enabled_at(10)
    assert schedule.apply(chunks, 12) == 0 and not any(m.enabled for m in lighthouse_modules(light))
    assert schedule.apply(chunks, 3) == 2 and all(m.enabled for m in lighthouse_modules(light))
    assert LighthouseSchedule().enabled_at(10**9)
    with pytest.raises(ValueError, match="dense_from_iteration"):
        LighthouseSchedule(dense_from_iteration=-1)
    assert dense_state_dict(Wrapper(light)).keys() == light.state_dict().keys()


def test_dense_spec_for():
    cfg = tiny_config()
    block = dense_spec_for(get_gpt_decoder_block_with_lighthouse_spec(cfg, use_transformer_engine=False))
    cores = [s.submodules.self_attention.submodules.core_attention for s in block.layer_specs]
    assert all(c.module is SDPACoreAttention for c in cores)
    layer = dense_spec_for(get_gpt_layer_with_lighthouse_spec(cfg, use_transformer_engine=False))
    assert layer.submodules.self_attention.submodules.core_attention.module is SDPACoreAttention


def _core_module(layer_spec):
    return layer_spec.submodules.self_attention.submodules.core_attention.module


def _mlp_module(layer_spec):
    mlp = layer_spec.submodules.mlp
    return mlp.func if isinstance(mlp, functools.partial) else mlp.module


def test_block_spec_follows_megatron_layer_specs():
    """Dense / MoE layers as Megatron's own block spec lays them out (moe_layer_freq); only the core attention
    differs; Megatron-LM's layer-spec options must agree with the config."""
    cfg = tiny_config(num_moe_experts=2, moe_layer_freq=[0, 1, 0, 1, 1, 0], add_bias_linear=False)
    stock = gpt_layer_specs.get_gpt_decoder_block_spec(cfg, use_transformer_engine=False)
    light = get_gpt_decoder_block_with_lighthouse_spec(cfg, use_transformer_engine=False, num_experts=2)
    assert [_mlp_module(s) for s in light.layer_specs] == [_mlp_module(s) for s in stock.layer_specs]
    assert len({_mlp_module(s) for s in stock.layer_specs}) == 2
    assert [_core_module(s) for s in light.layer_specs] == [
        SDPACoreAttention if i in DENSE_LAYERS else LighthouseCoreAttention for i in range(6)]
    assert light.layer_norm is stock.layer_norm
    with pytest.raises(ValueError, match=r"num_experts=4 disagrees with config.num_moe_experts=2"):
        get_gpt_decoder_block_with_lighthouse_spec(cfg, use_transformer_engine=False, num_experts=4)
    with pytest.raises(ValueError, match=r"fp8=.*not a decoder-block spec option"):
        get_gpt_decoder_block_dense_spec(cfg, use_transformer_engine=False, fp8="e4m3")


@pytest.mark.parametrize("call,message", [
    (lambda cfg: get_gpt_layer_with_lighthouse_spec(cfg, qk_layernrom=True, use_transformer_engine=False),
     r"^qk_layernrom=True: not an option of Megatron's get_gpt_layer_local_spec \(nor of this package's spec "
     r"functions\); its options: num_experts, "),
    (lambda cfg: get_gpt_layer_dense_spec(num_expert=4, use_transformer_engine=False), r"^num_expert=4: not an option"),
    (lambda cfg: get_gpt_layer_dense_spec(qk_layernrom=False, use_transformer_engine=False), r"^qk_layernrom=False"),
    (lambda cfg: get_gpt_decoder_block_with_lighthouse_spec(cfg, qk_layernrom=True, use_transformer_engine=False),
     r"^qk_layernrom=True: not a decoder-block spec option"),
    (lambda cfg: get_gpt_layer_with_lighthouse_spec("cfg", use_transformer_engine=False),
     r"^get_gpt_layer_with_lighthouse_spec: config of type str: must be a megatron.core TransformerConfig"),
    (lambda cfg: get_gpt_layer_with_lighthouse_spec(cfg, {"levels": 2}, use_transformer_engine=False),
     r"^lighthouse=\{'levels': 2\}: must be a LighthouseConfig"),
    (lambda cfg: get_gpt_decoder_block_with_lighthouse_spec(None, LIGHTHOUSE, use_transformer_engine=False),
     r"^get_gpt_decoder_block_with_lighthouse_spec: config of type NoneType: must be a megatron.core"),
    (lambda cfg: get_gpt_decoder_block_dense_spec({"num_layers": 6}, use_transformer_engine=False),
     r"^the decoder-block spec: config of type dict"),
    (lambda cfg: get_gpt_decoder_block_with_lighthouse_spec(cfg, vp_stage=5, use_transformer_engine=False),
     r"^vp_stage=5: must be None or an int in \[0, 1\) \(config.virtual_pipeline_model_parallel_size=None\)"),
    (lambda cfg: get_gpt_decoder_block_dense_spec(cfg, pp_rank=3, use_transformer_engine=False),
     r"^pp_rank=3: must be None or an int in \[0, 1\)"),
    (lambda cfg: get_gpt_decoder_block_dense_spec(cfg, pp_rank="0", use_transformer_engine=False), r"^pp_rank='0'"),
    (lambda cfg: get_gpt_decoder_block_dense_spec(cfg, normalization="rmsnorm", use_transformer_engine=False),
     r"^normalization='rmsnorm': must be one of \(None, 'LayerNorm', 'RMSNorm'\)"),
    (lambda cfg: get_gpt_decoder_block_dense_spec(cfg, qk_l2_norm="yes", use_transformer_engine=False),
     r"^qk_l2_norm='yes': must be True or False"),
    (lambda cfg: get_gpt_decoder_block_dense_spec(cfg, use_transformer_engine="no"),
     r"^use_transformer_engine='no': must be True or False"),
    (lambda cfg: get_gpt_layer_dense_spec(use_transformer_engine=None), r"^use_transformer_engine=None"),
])
def test_spec_functions_refuse_what_they_would_ignore(call, message):
    """A misspelt option, a config that is no config, a stage the config does not have: each was dropped or ignored
    (the model then silently lacked qk-layernorm), or failed deep inside Megatron."""
    with pytest.raises(ValueError, match=message):
        call(tiny_config())


def test_an_option_of_another_megatron_version_passes_only_when_off():
    """Megatron-LM's layer-spec arguments differ across megatron-core versions (moe_use_legacy_grouped_gemm left the
    local spec in 0.19): off, it passes wherever it is unknown; on, the function that cannot honour it refuses."""
    import inspect

    local = inspect.signature(gpt_layer_specs.get_gpt_layer_local_spec).parameters
    get_gpt_layer_dense_spec(use_transformer_engine=False, moe_use_legacy_grouped_gemm=False)
    if "moe_use_legacy_grouped_gemm" not in local:
        with pytest.raises(ValueError, match=r"^moe_use_legacy_grouped_gemm=True: not an option of Megatron's "
                                             r"get_gpt_layer_local_spec in this megatron-core"):
            get_gpt_layer_dense_spec(use_transformer_engine=False, moe_use_legacy_grouped_gemm=True)


@pytest.mark.parametrize("num_layers", [2, 4])
def test_default_dense_layers_that_leave_no_lighthouse_layer_are_refused(num_layers):
    """The default dense_layers (0, 1, -2, -1) keep a model of 4 layers or fewer wholly dense: a 'Lighthouse' model
    without a Lighthouse layer, built without a word, is refused where the layer count is known."""
    cfg = tiny_config(lighthouse=LighthouseConfig(levels=2, pooling_factor=2, topk=128), num_layers=num_layers)
    message = rf"dense_layers=\(0, 1, -2, -1\) keeps all {num_layers} layers \(config.num_layers\) dense: no layer"
    with pytest.raises(ValueError, match=message):
        get_gpt_decoder_block_with_lighthouse_spec(cfg, use_transformer_engine=False)
    with pytest.raises(ValueError, match=message):
        get_gpt_layer_with_lighthouse_spec(cfg, use_transformer_engine=False)
    assert get_gpt_decoder_block_dense_spec(cfg, use_transformer_engine=False).layer_specs  # the dense model builds
    five = tiny_config(lighthouse=cfg.lighthouse, num_layers=5)
    assert sum(_core_module(s) is LighthouseCoreAttention
               for s in get_gpt_decoder_block_with_lighthouse_spec(five, use_transformer_engine=False).layer_specs) == 1


def test_pipeline_stages_map_global_layers():
    cfg = tiny_config(pipeline_model_parallel_size=2, num_layers=8, lighthouse=dataclasses.replace(
        LIGHTHOUSE, dense_layers=(0, 1, -2, -1)), pipeline_dtype=torch.float32)

    def kinds(spec):
        return "".join("L" if _core_module(s) is LighthouseCoreAttention else "D" for s in spec.layer_specs)

    def stage(config, pp_rank, vp_stage=None):
        return kinds(get_gpt_decoder_block_with_lighthouse_spec(config, use_transformer_engine=False,
                                                                pp_rank=pp_rank, vp_stage=vp_stage))

    assert [stage(cfg, 0), stage(cfg, 1)] == ["DDLL", "LLDD"]
    # interleaved (virtual) stages: pp rank 0 holds layers 0-1 and 4-5, pp rank 1 layers 2-3 and 6-7
    vp = dataclasses.replace(cfg, virtual_pipeline_model_parallel_size=2)
    assert [stage(vp, 0, 0), stage(vp, 1, 0), stage(vp, 0, 1), stage(vp, 1, 1)] == ["DD", "LL", "LL", "DD"]


#: Megatron-LM arguments a tiny Lighthouse model fits: LIGHTHOUSE at SEQ tokens, 6 layers (4 of them dense).
TINY_ARGS = dict(seq_length=SEQ, num_layers=6, transformer_impl="local")
TINY_ENV = {"LIGHTHOUSE_LEVELS": "2", "LIGHTHOUSE_POOLING_FACTOR": "2", "LIGHTHOUSE_TOPK": "128"}


def test_megatron_lm_spec_entry_point(monkeypatch):
    """``--spec megatron_lighthouse.env_spec lighthouse_local_layer_spec`` resolves as Megatron-LM resolves it;
    ``megatron_lighthouse.spec`` itself builds nothing when imported."""
    import megatron_lighthouse.spec as spec_module

    assert not hasattr(spec_module, "lighthouse_local_layer_spec")
    _environment(monkeypatch, **TINY_ENV)
    spec = _megatron_lm_spec(monkeypatch, "lighthouse_local_layer_spec", **TINY_ARGS)
    assert isinstance(spec, ModuleSpec)
    assert "dense_local_layer_spec" not in vars(sys.modules[ENV_SPEC])  # only the spec asked for is built
    cfg = tiny_config(lighthouse=None)
    model = tiny_gpt(cfg, spec)
    cores = [layer.self_attention.core_attention for layer in model.decoder.layers]
    assert all(type(c) is LighthouseCoreAttention for c in cores)
    assert [c.dense_layer for c in cores] == [i in DENSE_LAYERS for i in range(6)]
    assert cores[2].lighthouse == LIGHTHOUSE
    assert set_lighthouse_enabled(model, False) == 2
    dense = tiny_gpt(cfg, _megatron_lm_spec(monkeypatch, "dense_local_layer_spec", **TINY_ARGS))
    assert all(type(layer.self_attention.core_attention) is SDPACoreAttention for layer in dense.decoder.layers)
    dense.load_state_dict(model.state_dict())
    env = {"LIGHTHOUSE_LEVELS": "2", "LIGHTHOUSE_POOLING_FACTOR": "2", "LIGHTHOUSE_TOPK": "256",
           "LIGHTHOUSE_DENSE_LAYERS": "0,-1"}
    assert lighthouse_config_from_env(env) == LighthouseConfig(levels=2, pooling_factor=2, topk=256,
                                                               dense_layers=(0, -1))
    with pytest.raises(ValueError, match="LIGHTHOUSE_TOPK"):
        lighthouse_config_from_env({"LIGHTHOUSE_TOPK": "lots"})


@pytest.mark.parametrize("env, message", [
    ({"LIGHTHOUSE_TOPK": "100"}, "LIGHTHOUSE_TOPK=100: must be a positive multiple of 128"),
    ({"LIGHTHOUSE_LEVELS": "1"}, "LIGHTHOUSE_LEVELS=1: must be >= 2"),
    ({"LIGHTHOUSE_POOLING_FACTOR": "3"}, "LIGHTHOUSE_POOLING_FACTOR=3: must be a power of two"),
])
def test_bad_environment_settings_name_the_variable(env, message):
    with pytest.raises(ValueError) as err:
        lighthouse_config_from_env(env)
    assert str(err.value).startswith(message)


@pytest.mark.parametrize("var, meant", [("LIGHTHOUSE_POOLNG_FACTOR", "LIGHTHOUSE_POOLING_FACTOR"),
                                        ("LIGHTHOUSE_TOP_K", "LIGHTHOUSE_TOPK"), ("LIGHTHOUSE_LEVEL", "LIGHTHOUSE_LEVELS"),
                                        ("LIGHTHOUSE_DENSE_LAYER", "LIGHTHOUSE_DENSE_LAYERS")])
def test_a_misspelt_setting_is_refused(var, meant):
    """A near-miss of a setting's name would leave that setting at its default without a word."""
    with pytest.raises(ValueError) as err:
        lighthouse_config_from_env({"LIGHTHOUSE_TOPK": "1024", var: "8"})
    assert str(err.value).startswith(f"{var}='8': not a Lighthouse setting; did you mean {meant}? (the settings: "
                                     "LIGHTHOUSE_LEVELS, "), str(err.value)


@pytest.mark.parametrize("var", ["LIGHTHOUSE_DENSE_FROM_ITER", "LIGHTHOUSE_SCORER", "LIGHTHOUSE_MONITOR"])
def test_every_other_lighthouse_variable_is_refused(var):
    """Not close to a setting's name, and still ignored if accepted: the in-run switch and the monitor need the
    patched pretrain_gpt.py, the scorer has one value."""
    with pytest.raises(ValueError) as err:
        lighthouse_config_from_env({var: "5"})
    assert str(err.value).startswith(f"{var}='5': not a Lighthouse setting; (the settings: LIGHTHOUSE_LEVELS, "), err


def test_rope_from_the_environment():
    assert lighthouse_config_from_env({"LIGHTHOUSE_ROPE": "tokens"}).rope == "tokens"
    assert lighthouse_config_from_env({}).rope == "entries"
    with pytest.raises(ValueError, match=r"^LIGHTHOUSE_ROPE='token': must be one of \('entries', 'tokens'\)"):
        lighthouse_config_from_env({"LIGHTHOUSE_ROPE": "token"})


def test_other_lighthouse_variables_are_not_settings():
    """The examples' own variables (LIGHTHOUSE_CHECKPOINT of resume_dense.sh) may be in the environment."""
    env = {"LIGHTHOUSE_CHECKPOINT": "/ckpt", "LIGHTHOUSE_GOLDEN_DIR": "/g", "LIGHTHOUSE_TOPK": "1024"}
    assert lighthouse_config_from_env(env) == LighthouseConfig(topk=1024)


def test_env_spec_builds_each_spec_on_first_access(monkeypatch):
    """Outside Megatron-LM nothing is built at import; each name is built when first read, and kept. The dense
    spec reads no LIGHTHOUSE_* variable, so a bad one does not stop stage two."""
    import importlib

    _environment(monkeypatch, LIGHTHOUSE_TOPK="100")
    monkeypatch.delitem(sys.modules, ENV_SPEC, raising=False)
    module = importlib.import_module(ENV_SPEC)
    assert not any(name in vars(module) for name in module.NAMES)
    dense = module.dense_local_layer_spec
    assert vars(module)["dense_local_layer_spec"] is dense and module.dense_local_layer_spec is dense
    with pytest.raises(ValueError, match=r"^LIGHTHOUSE_TOPK=100: must be a positive multiple of 128"):
        module.lighthouse_local_layer_spec
    with pytest.raises(AttributeError, match=r"has no attribute 'lighthouse_spec'; its specs: "):
        module.lighthouse_spec


@pytest.mark.parametrize("name", ["lighthouse_local_layer_spec", "lighthouse_layer_spec"])
def test_env_spec_checks_the_settings_against_megatron_lm_args(monkeypatch, name):
    """As the patched hook checks its flags, naming the LIGHTHOUSE_* variables (and the --spec) instead."""
    switch = f"--spec {ENV_SPEC} {name}"
    _environment(monkeypatch)
    with pytest.raises(ValueError, match=r"^--seq-length 100000 does not fit LIGHTHOUSE_TOPK=2048 "
                                         r"LIGHTHOUSE_POOLING_FACTOR=4 LIGHTHOUSE_LEVELS=3: .*nearest valid lengths: "
                                         r"\(99840, 100096\)"):
        _megatron_lm_spec(monkeypatch, name, seq_length=100000, num_layers=6)
    with pytest.raises(ValueError, match=r"^--seq-length 16384 with --context-parallel-size 2 \(4 chunks\) does "
                                         r"not fit LIGHTHOUSE_TOPK=2048 "):
        _megatron_lm_spec(monkeypatch, name, seq_length=16384, num_layers=6, context_parallel_size=2)
    _environment(monkeypatch, LIGHTHOUSE_DENSE_LAYERS="0,1")
    with pytest.raises(ValueError, match=r"^LIGHTHOUSE_DENSE_LAYERS=0,1 keeps all 2 layers \(--num-layers\) dense: "
                                         r"no layer would run Lighthouse"):
        _megatron_lm_spec(monkeypatch, name, seq_length=32768, num_layers=2)
    with pytest.raises(ValueError, match=r"^LIGHTHOUSE_DENSE_LAYERS=0,1 with --num-layers 1: .*entry 1"):
        _megatron_lm_spec(monkeypatch, name, seq_length=32768, num_layers=1)
    with pytest.raises(ValueError, match=f"^--reset-attention-mask with {switch}: a document mask"):
        _megatron_lm_spec(monkeypatch, name, seq_length=32768, num_layers=6, reset_attention_mask=True)
    with pytest.raises(ValueError, match=f"^{switch} with --heterogeneous-layers-config-path h.json: {switch} builds"):
        _megatron_lm_spec(monkeypatch, name, seq_length=32768, num_layers=6,
                          heterogeneous_layers_config_path="h.json")
    assert isinstance(_megatron_lm_spec(monkeypatch, name, seq_length=32768, num_layers=6), ModuleSpec)


def test_env_spec_dense_spec_checks_no_lighthouse_settings(monkeypatch):
    """Stage two is dense: neither the sequence length nor the dense layers are Lighthouse's business there."""
    _environment(monkeypatch, LIGHTHOUSE_TOPK="100", LIGHTHOUSE_DENSE_LAYERS="0,1")
    spec = _megatron_lm_spec(monkeypatch, "dense_local_layer_spec", seq_length=100000, num_layers=2,
                             reset_attention_mask=True)
    assert isinstance(spec, ModuleSpec)


def test_env_spec_refuses_a_spec_name_it_does_not_have(monkeypatch):
    with pytest.raises(ValueError, match=rf"^--spec {ENV_SPEC} lighthouse_spec: not a spec of this module; "
                                         r"use one of lighthouse_layer_spec, "):
        _megatron_lm_spec(monkeypatch, "lighthouse_spec", **TINY_ARGS)


def test_transformer_engine_inner_contract():
    """With (fake) TransformerEngine, the inner TEDotProductAttention gets H kv heads and [S, B, H, D] inputs."""
    import pathlib
    import subprocess
    import sys

    here = pathlib.Path(__file__).resolve().parent
    result = subprocess.run([sys.executable, str(here / "megatron_te_contract.py")], cwd=here, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("OK"), result.stderr[-4000:]


@pytest.mark.parametrize("model", [None, "model", {"weight": torch.zeros(1)}])
def test_export_refuses_what_is_no_model(model, tmp_path):
    """None, a string or a state dict gave an AttributeError from inside (unwrap_model returned them as they were)."""
    for export in (dense_state_dict, lambda m: save_dense_checkpoint(m, tmp_path / "x.pt")):
        with pytest.raises(ValueError, match=r"^model: a \w+; must be a torch.nn.Module"):
            export(model)
    for path in (None, 3, ""):
        with pytest.raises(ValueError, match=r"^path=.*: must be a file path"):
            save_dense_checkpoint(torch.nn.Linear(2, 2), path)
    assert list(tmp_path.iterdir()) == []


def test_save_dense_checkpoint_is_atomic(tmp_path, monkeypatch):
    """A save that fails half-way leaves the earlier checkpoint whole and no temporary file behind."""
    light, _ = _pair()
    path = tmp_path / "dense.pt"
    save_dense_checkpoint(light, path)
    before = path.read_bytes()
    real_save = torch.save

    def half_then_fail(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        save_dense_checkpoint(light, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["dense.pt"]
