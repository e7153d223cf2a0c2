"""The TE hybrid stack spec with Lighthouse, built into a HybridModel over the fake TransformerEngine.

``get_hybrid_stack_with_lighthouse_spec(..., use_transformer_engine=True)`` must give the model Megatron's own
``hybrid_stack_spec`` gives (TE's fused LayerNorm+Linear layers, ``TEDotProductAttention``, the ``TENorm`` final
norm) in everything but the attention layers' self-attention: ``LighthouseSelfAttention`` holding a
``LighthouseCoreAttention`` around the same ``TEDotProductAttention``. The state dicts, TE's ``_extra_state``
entries included, load into each other strictly (a stage-two checkpoint is Megatron's hybrid model's), and switched
off the Lighthouse model computes the dense one. The local stack's distributed-checkpoint keys are the TE stack's.

Runs in the spawned ranks of the other fake-TE tests (each rank builds and checks its own models; data parallel 4).
Needs megatron-core >= 0.19 (``HybridModel``); skips with the hybrid entry points' one line otherwise.
"""

from __future__ import annotations

import pytest

from spawn import run_on_ranks
from test_te_fake import POOL, own_process_groups

PATTERN = "*-" * 5  # attention layers 1, 3, 5, 7, 9; with dense_layers (0, -1): 3, 5 and 7 run Lighthouse


def _check_te_hybrid_spec(rank, world):
    with own_process_groups():
        _te_hybrid_spec(rank, world)


def _te_hybrid_spec(rank, world):
    import fake_te

    fake = fake_te.install()
    from megatron.core import parallel_state
    from megatron.core.extensions.transformer_engine import TEDotProductAttention, TELayerNormColumnParallelLinear
    from megatron.core.models.hybrid.hybrid_layer_specs import hybrid_stack_spec
    from megatron.core.transformer.attention import SelfAttention

    from megatron_lighthouse import LighthouseConfig
    from megatron_lighthouse.core_attention import LighthouseCoreAttention
    from megatron_lighthouse.hybrid_spec import get_hybrid_stack_local_spec, get_hybrid_stack_with_lighthouse_spec
    from megatron_lighthouse.schedule import lighthouse_modules
    from megatron_lighthouse.self_attention import LighthouseSelfAttention
    from megatron_utils import check_switch_over_fake_te, tiny_config, tiny_hybrid

    parallel_state.initialize_model_parallel()
    try:
        lighthouse = LighthouseConfig(levels=2, pooling_factor=2, topk=128, dense_layers=(0, -1))
        config = tiny_config(lighthouse, num_query_groups=2, num_layers=len(PATTERN), is_hybrid_model=True)
        dense = tiny_hybrid(config, hybrid_stack_spec, PATTERN)
        spec = get_hybrid_stack_with_lighthouse_spec(lighthouse, PATTERN, use_transformer_engine=True)
        model = tiny_hybrid(config, spec, PATTERN, seed=1)
        assert spec.submodules.mlp_layer is hybrid_stack_spec.submodules.mlp_layer  # every other family: Megatron's
        assert hybrid_stack_spec.submodules.attention_layer.submodules.self_attention.module is SelfAttention

        # ---- structure: Megatron's TE hybrid model, but for the attention layers' self-attention
        attention_layers = [f"decoder.layers.{i}" for i in range(0, len(PATTERN), 2)]
        dense_modules, modules = dict(dense.named_modules()), dict(model.named_modules())
        assert sorted(set(modules) - set(dense_modules)) == sorted(
            f"{layer}.self_attention.core_attention.inner" for layer in attention_layers)
        assert set(dense_modules) <= set(modules)
        for name, module in dense_modules.items():
            got = type(modules[name])
            layer = ".".join(name.split(".")[:3])
            if layer in attention_layers and name == f"{layer}.self_attention":
                assert got is LighthouseSelfAttention and type(module) is SelfAttention, (name, got)
            elif layer in attention_layers and name == f"{layer}.self_attention.core_attention":
                assert got is LighthouseCoreAttention and type(module) is TEDotProductAttention, (name, got)
                assert type(modules[name].inner) is TEDotProductAttention and isinstance(modules[name].inner, fake)
            else:
                assert got is type(module), (name, got, type(module))
        qkv = modules["decoder.layers.4.self_attention.linear_qkv"]
        assert type(qkv) is TELayerNormColumnParallelLinear and isinstance(qkv, fake_te.LayerNormLinear)
        assert isinstance(modules["decoder.final_norm"], fake_te.LayerNorm)
        assert [m.layer_number for m in lighthouse_modules(model)] == [3, 5, 7]
        inner = model.decoder.layers[4].self_attention.core_attention.inner
        assert (inner.num_gqa_groups, dense.decoder.layers[4].self_attention.core_attention.num_gqa_groups) == (4, 2)

        # ---- state dicts: Megatron's keys, TE's _extra_state entries included; both ways strictly
        state, dense_state = model.state_dict(), dense.state_dict()
        assert list(state) == list(dense_state), sorted(set(state) ^ set(dense_state))
        assert "decoder.layers.4.self_attention.core_attention._extra_state" in state
        assert "decoder.final_norm._extra_state" in state
        model.load_state_dict(dense.state_dict(), strict=True)
        back = tiny_hybrid(config, hybrid_stack_spec, PATTERN, seed=2)
        back.load_state_dict(model.state_dict(), strict=True)
        assert sorted(model.sharded_state_dict()) == sorted(dense.sharded_state_dict())

        # ---- the local stack saves the TE stack's distributed-checkpoint keys and shapes
        local = tiny_hybrid(config, get_hybrid_stack_local_spec(), PATTERN)

        def sharded(m):
            return {v.key: tuple(v.global_shape) for v in m.sharded_state_dict().values()
                    if hasattr(v, "global_shape") and not v.key.endswith("_extra_state")}

        assert sharded(local) == sharded(dense)

        # ---- behaviour: switched off it is Megatron's model; on, three attention layers attend over subsequences
        check_switch_over_fake_te(model, dense, fake, lighthouse, [False, True, True, True, False])
    finally:
        parallel_state.destroy_model_parallel()


def test_te_hybrid_stack_spec_is_megatrons_with_lighthouse_attention():
    # (imported here: the spawned ranks import this module, and megatron-core must come after the fake TE there)
    from megatron_lighthouse.hybrid_spec import require_hybrid_model

    try:
        require_hybrid_model()
    except ImportError as err:
        pytest.skip(str(err))
    run_on_ranks(_check_te_hybrid_spec, POOL["world"], pool=POOL["pool"], timeout_s=240)
