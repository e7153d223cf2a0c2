"""The TE decoder-block spec with Lighthouse, built into a GPTModel over the fake TransformerEngine.

``get_gpt_decoder_block_with_lighthouse_spec(cfg, use_transformer_engine=True)`` must give the model Megatron's
own ``get_gpt_decoder_block_spec(cfg, use_transformer_engine=True)`` gives (TE's fused LayerNorm+Linear layers,
``TEDotProductAttention``, ``TENorm``) in everything but the Lighthouse layers' attention: there
``LighthouseSelfAttention`` (a ``SelfAttention``) holds a ``LighthouseCoreAttention`` around the same
``TEDotProductAttention``. The two models' state dicts, TE's ``_extra_state`` entries included, load into each
other with ``strict=True``, and with Lighthouse switched off the Lighthouse model computes the dense one.

Runs in the spawned ranks of the other fake-TE tests (each rank builds and checks its own models; data parallel 4),
where the fake TE is installed before Megatron's TE extension is imported.
"""

from __future__ import annotations

import pickle

import torch

from spawn import run_on_ranks
from test_te_fake import POOL, own_process_groups


def _fp8_like_state(tag: str) -> torch.Tensor:
    """An ``_extra_state`` value as TE writes it when it has FP8 metadata: a pickled dict in a uint8 tensor."""
    return torch.frombuffer(bytearray(pickle.dumps({"recipe": tag, "extra_fp8_variables": {"num_gemms": 3}})),
                            dtype=torch.uint8)


def _assert_same_state(got: dict, want: dict) -> None:
    """Equal keys and values (tensors equal; Megatron's own ``_extra_state`` entries are ``None``)."""
    assert list(got) == list(want), sorted(set(got) ^ set(want))
    for key, value in got.items():
        same = torch.equal(value, want[key]) if isinstance(value, torch.Tensor) else value == want[key]
        assert same, key


def _check_te_block_spec(rank, world):
    with own_process_groups():
        _te_block_spec(rank, world)


def _te_block_spec(rank, world):
    import fake_te

    fake = fake_te.install()
    from megatron.core import parallel_state
    from megatron.core.extensions.transformer_engine import (TEDotProductAttention,
                                                              TELayerNormColumnParallelLinear, TERowParallelLinear)
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.core.transformer.attention import SelfAttention

    from megatron_lighthouse import LighthouseConfig
    from megatron_lighthouse.core_attention import LighthouseCoreAttention
    from megatron_lighthouse.self_attention import LighthouseSelfAttention
    from megatron_lighthouse.spec import get_gpt_decoder_block_with_lighthouse_spec
    from megatron_utils import check_switch_over_fake_te, tiny_config, tiny_gpt

    parallel_state.initialize_model_parallel()
    try:
        lighthouse = LighthouseConfig(levels=2, pooling_factor=2, topk=128, dense_layers=(0, -1))
        cfg = tiny_config(lighthouse, num_query_groups=2, num_layers=4)
        dense = tiny_gpt(cfg, get_gpt_decoder_block_spec(cfg, use_transformer_engine=True))
        model = tiny_gpt(cfg, get_gpt_decoder_block_with_lighthouse_spec(cfg, use_transformer_engine=True), seed=1)

        # ---- structure: Megatron's TE model, but for the Lighthouse layers' attention
        lighthouse_layers = {f"decoder.layers.{i}" for i in (1, 2)}
        dense_modules, modules = dict(dense.named_modules()), dict(model.named_modules())
        extra = sorted(set(modules) - set(dense_modules))
        assert extra == sorted(f"{layer}.self_attention.core_attention.inner" for layer in lighthouse_layers), extra
        assert set(dense_modules) <= set(modules), sorted(set(dense_modules) - set(modules))
        for name, module in dense_modules.items():
            layer = ".".join(name.split(".")[:3])
            got = type(modules[name])
            if layer in lighthouse_layers and name == f"{layer}.self_attention":
                assert got is LighthouseSelfAttention and type(module) is SelfAttention, (name, got)
                assert issubclass(got, SelfAttention), got
            elif layer in lighthouse_layers and name == f"{layer}.self_attention.core_attention":
                assert got is LighthouseCoreAttention and type(module) is TEDotProductAttention, (name, got)
                inner = modules[name].inner
                assert type(inner) is TEDotProductAttention and isinstance(inner, fake), type(inner)
                # selection is per query head: the inner attention gets one kv head per query head
                assert (inner.num_gqa_groups, module.num_gqa_groups) == (4, 2), (inner.num_gqa_groups,
                                                                                 module.num_gqa_groups)
            else:
                assert got is type(module), (name, got, type(module))
        qkv = modules["decoder.layers.1.self_attention.linear_qkv"]
        assert type(qkv) is TELayerNormColumnParallelLinear and isinstance(qkv, fake_te.LayerNormLinear)
        assert isinstance(modules["decoder.layers.1.mlp.linear_fc2"], (TERowParallelLinear, fake_te.Linear))
        assert isinstance(modules["decoder.final_layernorm"], fake_te.LayerNorm)
        shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
        assert shapes == {n: tuple(p.shape) for n, p in dense.named_parameters()}, "parameters differ"

        # ---- state dicts: same keys, TE's _extra_state entries included, load both ways strictly
        dense_state, state = dense.state_dict(), model.state_dict()
        assert sorted(state) == sorted(dense_state), sorted(set(state) ^ set(dense_state))
        extra_keys = [k for k in state if k.endswith("._extra_state")]
        for key in ("decoder.layers.1.self_attention.core_attention._extra_state",
                    "decoder.layers.1.self_attention.linear_qkv._extra_state",
                    "decoder.final_layernorm._extra_state"):
            assert key in extra_keys, (key, extra_keys)
        dense.decoder.layers[1].self_attention.core_attention.set_extra_state(_fp8_like_state("attention"))
        dense.decoder.layers[1].self_attention.linear_qkv.set_extra_state(_fp8_like_state("qkv"))
        model.load_state_dict(dense.state_dict(), strict=True)
        inner = model.decoder.layers[1].self_attention.core_attention.inner
        assert pickle.loads(inner.get_extra_state().numpy().tobytes())["recipe"] == "attention"
        assert pickle.loads(model.decoder.layers[1].self_attention.linear_qkv.get_extra_state().numpy()
                            .tobytes())["recipe"] == "qkv"
        _assert_same_state(model.state_dict(), dense.state_dict())
        back = tiny_gpt(cfg, get_gpt_decoder_block_spec(cfg, use_transformer_engine=True), seed=2)
        back.load_state_dict(model.state_dict(), strict=True)
        _assert_same_state(back.state_dict(), dense.state_dict())

        # ---- behaviour: switched off it is the dense model; on, the Lighthouse layers attend over subsequences
        check_switch_over_fake_te(model, dense, fake, lighthouse, [False, True, True, False])
    finally:
        parallel_state.destroy_model_parallel()


def test_te_block_spec_builds_megatron_te_model_with_lighthouse_attention():
    run_on_ranks(_check_te_block_spec, POOL["world"], pool=POOL["pool"], timeout_s=240)
