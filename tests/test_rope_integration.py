"""RoPE in Megatron GPT models with Lighthouse layers (CPU): ``LighthouseConfig.rope`` "entries" vs "tokens"."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch

pytest.importorskip("megatron.core")

from megatron.core.transformer.attention import SelfAttention  # noqa: E402

from megatron_lighthouse import lighthouse_attention  # noqa: E402
from megatron_lighthouse.rotary import apply_rotary, entry_rotary  # noqa: E402
from megatron_lighthouse.self_attention import LighthouseSelfAttention  # noqa: E402
from megatron_lighthouse.spec import (  # noqa: E402
    get_gpt_decoder_block_dense_spec,
    get_gpt_decoder_block_with_lighthouse_spec,
    get_gpt_layer_with_lighthouse_spec,
)
from megatron_lighthouse.schedule import lighthouse_enabled  # noqa: E402

from megatron_utils import LIGHTHOUSE, SEQ, batch, init_megatron, tiny_config, tiny_gpt  # noqa: E402

FIRST_LIGHTHOUSE = 2  # layers 0, 1, 4, 5 of 6 stay dense


@pytest.fixture(autouse=True)
def _megatron_rope_on_cpu(monkeypatch):
    init_megatron()
    monkeypatch.setattr(torch.cuda, "current_device", lambda: "cpu")


def _model(rope: str, seed: int = 0, **config):
    cfg = tiny_config(lighthouse=dataclasses.replace(LIGHTHOUSE, rope=rope), **config)
    return tiny_gpt(cfg, get_gpt_decoder_block_with_lighthouse_spec(cfg, use_transformer_engine=False), seed=seed,
                    position_embedding_type="rope")


def _core_call(model, layer: int = FIRST_LIGHTHOUSE):
    """Run ``model`` on a batch; the inputs, output and rotary table of ``layer``'s core attention."""
    core = model.decoder.layers[layer].self_attention.core_attention
    seen = {}
    handle = core.register_forward_hook(
        lambda mod, args, out: seen.update(args=[a.detach() for a in args[:3]], out=out.detach(),
                                           freqs=mod.rotary_freqs))
    tokens, pos, _ = batch()
    with torch.no_grad():
        model(tokens, pos, None)
    handle.remove()
    return seen


def test_the_block_spec_builds_lighthouse_self_attention_on_lighthouse_layers():
    model = _model("entries")
    kinds = [type(layer.self_attention) for layer in model.decoder.layers]
    assert kinds == [SelfAttention] * 2 + [LighthouseSelfAttention] * 2 + [SelfAttention] * 2
    assert all(model.decoder.layers[i].self_attention.core_attention.rotary_handoff for i in (2, 3))


def test_entries_get_unrotated_qk_and_megatrons_table():
    """Same weights, rope="entries" vs "tokens": the first Lighthouse layer's core attention sees the same q/k,
    un-rotated in the first and rotated by Megatron in the second; its output is Lighthouse with the entries
    rotated at their last tokens' positions."""
    entries, tokens = _model("entries"), _model("tokens")
    tokens.load_state_dict(entries.state_dict())
    got, ref = _core_call(entries), _core_call(tokens)
    freqs = got["freqs"]
    assert freqs is not None and freqs.shape == (SEQ, 1, 1, 16) and ref["freqs"] is None
    for raw, rotated in zip(got["args"][:2], ref["args"][:2]):  # q, k [s, b, h, d]
        torch.testing.assert_close(apply_rotary(raw, freqs), rotated, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got["args"][2], ref["args"][2], rtol=0, atol=0)  # v is never rotated
    q, k, v = (x.transpose(0, 1) for x in got["args"])
    want = lighthouse_attention(q, k, v, levels=LIGHTHOUSE.levels, pooling_factor=LIGHTHOUSE.pooling_factor,
                                topk=LIGHTHOUSE.topk, rotary=entry_rotary(freqs))
    torch.testing.assert_close(got["out"], want.transpose(0, 1).reshape(SEQ, 2, 64), rtol=1e-5, atol=1e-6)
    assert (got["out"] - ref["out"]).abs().max() > 1e-3  # the two placements are different models


def test_switched_off_it_is_megatrons_dense_rope_model():
    entries, tokens = _model("entries"), _model("tokens")
    cfg = tiny_config()
    dense = tiny_gpt(cfg, get_gpt_decoder_block_dense_spec(cfg, use_transformer_engine=False), seed=5,
                     position_embedding_type="rope")
    for model in (tokens, dense):
        model.load_state_dict(entries.state_dict())
    tokens_in, pos, _ = batch()
    with torch.no_grad(), lighthouse_enabled(entries, False), lighthouse_enabled(tokens, False):
        want = dense(tokens_in, pos, None)
        torch.testing.assert_close(entries(tokens_in, pos, None), want, rtol=0, atol=0)
        torch.testing.assert_close(tokens(tokens_in, pos, None), want, rtol=0, atol=0)


def test_entries_model_trains():
    model = _model("entries")
    tokens, pos, labels = batch()
    loss = model(tokens, pos, None, labels=labels).mean()
    loss.backward()
    qkv = model.decoder.layers[FIRST_LIGHTHOUSE].self_attention.linear_qkv.weight.grad
    assert torch.isfinite(loss) and qkv is not None and qkv.abs().sum() > 0


def test_a_layer_megatron_keeps_without_rope_gets_none():
    """``no_rope_freq``: Megatron skips RoPE on marked layers; the hand-off then gives the core no table."""
    model = _model("entries", no_rope_freq=[0, 0, 1, 0, 0, 0])
    assert _core_call(model)["freqs"] is None
    assert _core_call(model, layer=3)["freqs"] is not None


def test_fused_single_qkv_rope_is_refused_at_construction():
    cfg = tiny_config(lighthouse=LIGHTHOUSE)
    cfg.fused_single_qkv_rope = True  # (set after __post_init__, which wants TransformerEngine for it)
    with pytest.raises(ValueError, match="fused_single_qkv_rope=True with lighthouse.rope='entries'"):
        tiny_gpt(cfg, get_gpt_decoder_block_with_lighthouse_spec(cfg, use_transformer_engine=False),
                 position_embedding_type="rope")


def test_bad_rope_setting():
    with pytest.raises(ValueError, match=r"LighthouseConfig.rope='both': must be one of \('entries', 'tokens'\)"):
        dataclasses.replace(LIGHTHOUSE, rope="both")


def test_core_outside_lighthouse_self_attention_warns_once(caplog):
    cfg = tiny_config()
    spec = get_gpt_layer_with_lighthouse_spec(cfg, use_transformer_engine=False)
    spec.submodules.self_attention.module = SelfAttention
    model = tiny_gpt(cfg, spec, position_embedding_type="rope")
    with caplog.at_level(logging.WARNING, logger="megatron_lighthouse.core_attention"):
        _core_call(model)
        _core_call(model)
    warnings = [r for r in caplog.records if "not inside LighthouseSelfAttention" in r.getMessage()]
    assert len(warnings) == 2  # layers 2 and 3 (the Lighthouse ones), once each
