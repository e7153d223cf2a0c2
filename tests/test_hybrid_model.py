"""Megatron-Core ``HybridModel`` with Lighthouse in its attention layers, on CPU (gloo world of 1), local stack.

Needs megatron-core >= 0.19; on older ones (Python 3.11 here: 0.16.1) every test but the first skips with the one
line the hybrid entry points raise. The TransformerEngine stack is tested over the fake TE in
``test_te_hybrid_spec.py``.
"""

from __future__ import annotations

import argparse
import dataclasses

import pytest
import torch

from megatron_lighthouse.config import LighthouseConfig
from megatron_lighthouse.hybrid_spec import (
    get_hybrid_stack_dense_spec,
    get_hybrid_stack_local_spec,
    get_hybrid_stack_with_lighthouse_spec,
    require_hybrid_model,
    with_lighthouse_attention,
)

from megatron_utils import (
    LIGHTHOUSE,
    SEQ,
    batch,
    init_megatron,
    megatron_lm_spec,
    set_lighthouse_environment,
    tiny_config,
    tiny_gpt,
    tiny_hybrid,
)

try:
    require_hybrid_model()
    NO_HYBRID_MODEL = None
except ImportError as err:
    NO_HYBRID_MODEL = str(err)
needs_hybrid_model = pytest.mark.skipif(NO_HYBRID_MODEL is not None, reason=NO_HYBRID_MODEL or "")

PATTERN = "*-" * 6  # the 6-block GPT model as a hybrid stack: attention layers 1, 3, ..., 11
LIGHTHOUSE_LAYERS = (5, 7)  # attention layers 3 and 4 of 6 (the paper's dense_layers 0, 1, -2, -1)


@pytest.mark.skipif(NO_HYBRID_MODEL is None, reason="this megatron-core has HybridModel")
def test_without_hybrid_model_the_entry_points_say_so_in_one_line():
    entries = [lambda: get_hybrid_stack_with_lighthouse_spec(LIGHTHOUSE, PATTERN),
               lambda: get_hybrid_stack_dense_spec(use_transformer_engine=False), get_hybrid_stack_local_spec,
               lambda: with_lighthouse_attention(None, LIGHTHOUSE, PATTERN)]
    for entry in entries:
        with pytest.raises(ImportError) as err:
            entry()
        message = str(err.value)
        assert "\n" not in message and message.startswith("HybridModel needs megatron-core >= 0.19"), message
        assert message == NO_HYBRID_MODEL


@pytest.fixture(scope="module")
def megatron():
    if NO_HYBRID_MODEL is not None:
        pytest.skip(NO_HYBRID_MODEL)
    init_megatron()


def _config(pattern: str = PATTERN, lighthouse: LighthouseConfig = LIGHTHOUSE, **kwargs):
    return tiny_config(lighthouse, num_query_groups=2, num_layers=len(pattern.split("/")[0].replace("|", "")),
                       is_hybrid_model=True, **kwargs)


def _pair(pattern: str = PATTERN):
    """A Lighthouse hybrid model and the dense one (local stacks) with the same weights."""
    config = _config(pattern)
    light = tiny_hybrid(config, get_hybrid_stack_with_lighthouse_spec(LIGHTHOUSE, pattern,
                                                                      use_transformer_engine=False), pattern)
    dense = tiny_hybrid(config, get_hybrid_stack_dense_spec(use_transformer_engine=False), pattern, seed=1)
    dense.load_state_dict(light.state_dict(), strict=True)
    return light, dense


def _lighthouse_layers(model) -> list:
    """The layer numbers whose core attention runs Lighthouse (not kept dense)."""
    from megatron_lighthouse.schedule import lighthouse_modules

    return [m.layer_number for m in lighthouse_modules(model)]


def test_local_stack_is_the_dense_one_but_for_the_core_attention(megatron):
    from megatron.core.models.hybrid.hybrid_block import HybridStack
    from megatron.core.ssm.mlp_layer import MLPLayer
    from megatron.core.transformer.attention import SelfAttention
    from megatron.core.transformer.identity_op import IdentityOp

    from megatron_lighthouse.core_attention import LighthouseCoreAttention
    from megatron_lighthouse.sdpa_core_attention import SDPACoreAttention
    from megatron_lighthouse.self_attention import LighthouseSelfAttention

    light, dense = _pair()
    assert isinstance(light.decoder, HybridStack) and type(light.decoder) is type(dense.decoder)
    modules, dense_modules = dict(light.named_modules()), dict(dense.named_modules())
    inner = {f"decoder.layers.{i}.self_attention.core_attention.inner" for i in range(0, 12, 2)}
    assert set(modules) - set(dense_modules) == inner and set(dense_modules) <= set(modules)
    for name, module in dense_modules.items():
        got = type(modules[name])
        if name.endswith(".self_attention") and type(module) is not IdentityOp:
            assert got is LighthouseSelfAttention and type(module) is SelfAttention, name
        elif name.endswith(".core_attention"):
            assert got is LighthouseCoreAttention and type(module) is SDPACoreAttention, name
            assert type(modules[name].inner) is SDPACoreAttention
        else:
            assert got is type(module), name
    assert [type(layer).__name__ for layer in light.decoder.layers] == ["TransformerLayer", "MLPLayer"] * 6
    assert isinstance(light.decoder.layers[1], MLPLayer) and isinstance(light.decoder.final_norm, torch.nn.LayerNorm)
    assert _lighthouse_layers(light) == list(LIGHTHOUSE_LAYERS)
    # the dense attention layers' inner attention is the dense model's (kv heads), the Lighthouse ones' per head
    groups = [(layer.layer_number, layer.self_attention.core_attention.inner.config.num_query_groups)
              for layer in light.decoder.layers if isinstance(layer.self_attention, SelfAttention)]
    assert groups == [(1, 2), (3, 2), (5, 4), (7, 4), (9, 2), (11, 2)]
    # same state-dict keys and tensors; each loads the other's strictly
    state, dense_state = light.state_dict(), dense.state_dict()
    assert list(state) == list(dense_state) and all(torch.equal(state[k], dense_state[k]) for k in state
                                                    if isinstance(state[k], torch.Tensor))
    assert not any(".inner." in key for key in state)
    assert sorted(light.sharded_state_dict()) == sorted(dense.sharded_state_dict())


def test_forward_backward_and_the_switch(megatron):
    from megatron_lighthouse.schedule import LighthouseSchedule, set_lighthouse_enabled

    light, dense = _pair()
    tokens, positions, labels = batch()
    loss = light(tokens, positions, None, labels=labels)
    assert loss.shape == tokens.shape
    loss.mean().backward()
    grads = {n: p.grad for n, p in light.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert grads["decoder.layers.4.self_attention.linear_qkv.weight"].abs().sum() > 0
    light.eval()
    dense.eval()
    with torch.no_grad():
        want = dense(tokens, positions, None)
        lighthouse = light(tokens, positions, None)
        assert (lighthouse - want).abs().max() > 1e-3, "the Lighthouse layers did not run"
        # the switch toggles exactly the two Lighthouse attention layers; switched, the model is the dense one
        assert LighthouseSchedule(dense_from_iteration=3).apply(light, 3) == 0
        cores = [layer.self_attention.core_attention for layer in light.decoder.layers[::2]]
        assert [(c.layer_number, c.enabled, c.dense_layer) for c in cores] == [
            (1, False, True), (3, False, True), (5, False, False), (7, False, False), (9, False, True),
            (11, False, True)]
        torch.testing.assert_close(light(tokens, positions, None), want, rtol=1e-5, atol=1e-5)
        assert set_lighthouse_enabled(light, True) == 2
        assert [c.enabled for c in cores] == [False, False, True, True, False, False]
        torch.testing.assert_close(light(tokens, positions, None), lighthouse)


def test_the_switch_on_resume(megatron):
    """Stage two resumed from a checkpoint (Megatron-LM's args.iteration, no curr_iteration yet): the hook's switch
    moves exactly the Lighthouse attention layers to dense."""
    from megatron_lighthouse.megatron_lm import maybe_switch_to_dense

    light, _ = _pair()
    args = argparse.Namespace(lighthouse_dense_from_iteration=3, iteration=5)
    assert maybe_switch_to_dense(light, args) is True
    cores = [layer.self_attention.core_attention for layer in light.decoder.layers[::2]]
    assert [c.layer_number for c in cores if not c.enabled and not c.dense_layer] == [5, 7]
    assert maybe_switch_to_dense(light, args) is False  # already dense
    args.curr_iteration = 2
    maybe_switch_to_dense(light, args)
    assert [c.layer_number for c in cores if c.enabled] == [5, 7]


@pytest.mark.parametrize("pattern, stages", [
    # three virtual stages of one pipeline rank (Megatron's segment vp_stage * pp_size + pp_rank)
    ("*-*-|*-*-*|-*-", [(1, 3), (5, 7, 9), (11,)]),
    ("*-|*-*-*-*-|*-", [(1,), (3, 5, 7, 9), (11,)]),
])
def test_pipeline_segments_place_the_dense_layers_right(megatron, pattern, stages):
    """Every stage builds its own segment from the one stack spec: the Lighthouse layers are those of the whole
    pattern's attention layers, whichever stage holds them."""
    config = _config(pattern)
    spec = get_hybrid_stack_with_lighthouse_spec(LIGHTHOUSE, pattern, use_transformer_engine=False)
    found = []
    for vp_stage, attention in enumerate(stages):
        model = tiny_hybrid(config, spec, pattern, vp_stage=vp_stage, pre_process=vp_stage == 0,
                            post_process=vp_stage == len(stages) - 1)
        numbers = [layer.layer_number for layer in model.decoder.layers if type(layer).__name__ == "TransformerLayer"]
        assert tuple(numbers) == attention
        found += _lighthouse_layers(model)
    assert found == [5, 7]


def test_a_spec_built_for_another_pattern_is_refused_at_build(megatron):
    spec = get_hybrid_stack_with_lighthouse_spec(LIGHTHOUSE, PATTERN, use_transformer_engine=False)
    with pytest.raises(ValueError, match=r"LighthouseCoreAttention \(layer 2\): hybrid_layer_pattern '\*-\*-\*-\*-\*-\*-'"
                                         r" describes 12 layers with attention at \[1, 3, 5, 7, 9, 11\], but this "
                                         r"model has config.num_layers=12 and attention at layer 2: the spec was "
                                         r"built for another pattern"):
        tiny_hybrid(_config(), spec, "-*" * 6)
    with pytest.raises(ValueError, match=r"describes 12 layers .* config.num_layers=14"):
        tiny_hybrid(_config("*-" * 7), spec, "*-" * 7)


def test_a_normalization_megatron_does_not_build_is_refused(megatron):
    """Megatron's local layer spec builds a LayerNorm for any other string, without a word."""
    for build in (lambda: get_hybrid_stack_local_spec("rmsnorm"),
                  lambda: get_hybrid_stack_with_lighthouse_spec(LIGHTHOUSE, PATTERN, use_transformer_engine=False,
                                                                normalization="RMS")):
        with pytest.raises(ValueError, match=r"^normalization='\w+': must be one of \(None, 'LayerNorm', 'RMSNorm'\)"):
            build()


@pytest.mark.parametrize("symbol, family, needs", [("M", "Mamba", "mamba_ssm"), ("G", "Gated DeltaNet", "fla"),
                                                   ("D", "DeepSeek Sparse Attention", "TransformerEngine")])
def test_local_stack_refuses_families_it_has_no_module_for_at_build(megatron, symbol, family, needs):
    pattern = (symbol + "-") + "*-" * 5
    spec = (get_hybrid_stack_local_spec() if symbol == "D"
            else get_hybrid_stack_with_lighthouse_spec(LIGHTHOUSE, pattern, use_transformer_engine=False))
    with pytest.raises(ValueError) as err:
        tiny_hybrid(_config(pattern), spec, pattern.replace("*", "-") if symbol == "D" else pattern)
    message = str(err.value)
    assert message.startswith(f"hybrid layer 1 ('{symbol}', {family}): not in the local hybrid stack spec"), message
    assert needs in message


def test_moe_layers_on_the_local_stack(megatron, monkeypatch):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: "cpu")  # Megatron's router asks for it; all is on CPU
    pattern = "*E" * 5
    config = _config(pattern, num_moe_experts=4, moe_router_topk=2, add_bias_linear=False)
    model = tiny_hybrid(config, get_hybrid_stack_with_lighthouse_spec(LIGHTHOUSE, pattern,
                                                                      use_transformer_engine=False), pattern)
    assert [type(layer).__name__ for layer in model.decoder.layers[:2]] == ["TransformerLayer", "MoETransformerLayer"]
    assert _lighthouse_layers(model) == [5]
    tokens, positions, labels = batch()
    model(tokens, positions, None, labels=labels).mean().backward()
    assert model.decoder.layers[1].mlp.router.weight.grad is not None


def test_spec_settings_are_checked_once_when_the_spec_is_built(megatron):
    with pytest.raises(ValueError, match=r"^hybrid_layer_pattern '\*-\*-\*-\*-' with dense_layers \(0, 1, -2, -1\): "
                                         r"keeps all 4 attention layers \(hybrid layers 1, 3, 5, 7\) dense"):
        get_hybrid_stack_with_lighthouse_spec(LighthouseConfig(), "*-" * 4, use_transformer_engine=False)
    with pytest.raises(ValueError, match=r"lighthouse=\{'topk': 128\}: must be a LighthouseConfig"):
        get_hybrid_stack_with_lighthouse_spec({"topk": 128}, PATTERN, use_transformer_engine=False)
    with pytest.raises(ImportError, match="use_transformer_engine=True needs TransformerEngine"):
        get_hybrid_stack_with_lighthouse_spec(LIGHTHOUSE, PATTERN)


def test_dense_spec_for_a_hybrid_stack(megatron):
    from megatron_lighthouse.export import dense_spec_for

    spec = get_hybrid_stack_with_lighthouse_spec(LIGHTHOUSE, PATTERN, use_transformer_engine=False)
    dense = dense_spec_for(spec)
    model = tiny_hybrid(_config(), dense, PATTERN)
    assert _lighthouse_layers(model) == [] and type(model.decoder.layers[4].self_attention.core_attention).__name__ \
        == "SDPACoreAttention"
    assert spec.submodules.attention_layer is not dense.submodules.attention_layer  # the original is left alone
    assert list(model.state_dict()) == list(tiny_hybrid(_config(), spec, PATTERN).state_dict())


def _dist_checkpointing_on_cpu(monkeypatch) -> None:
    """What Megatron's torch_dist checkpoint writer needs of a GPU host, stood in on this CPU one: its CUDA
    synchronisation and device (the tensors are on the CPU), and psutil's memory reading for its log line."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args, **kwargs: None)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: "cpu")
    monkeypatch.setattr(filesystem_async, "_process_memory", lambda: 0)


def test_a_lighthouse_gpt_checkpoint_loads_into_the_hybrid_model_through_megatrons_route(megatron, tmp_path,
                                                                                         monkeypatch):
    """Megatron's GPT -> Hybrid route (the migration guide's option A: the hybrid model's sharded state dict
    retargeted at the GPT checkpoint, ``gpt_checkpoint_interop``): a Lighthouse GPT's distributed checkpoint loads
    into the Lighthouse ``*-`` hybrid model strictly, and the two compute the same logits, Lighthouse on: the hybrid
    model's Lighthouse layers are the GPT's, as dense_layers count attention layers."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.gpt_checkpoint_interop import (
        gpt_compatible_layer_maps,
        retarget_sharded_state_dict_to_gpt_checkpoint,
    )

    from megatron_lighthouse.spec import get_gpt_decoder_block_with_lighthouse_spec

    _dist_checkpointing_on_cpu(monkeypatch)
    gpt_config = tiny_config(LIGHTHOUSE, num_query_groups=2, num_layers=6)
    gpt = tiny_gpt(gpt_config, get_gpt_decoder_block_with_lighthouse_spec(gpt_config, use_transformer_engine=False))
    dist_checkpointing.save(gpt.sharded_state_dict(), str(tmp_path))
    hybrid = tiny_hybrid(_config(), get_hybrid_stack_with_lighthouse_spec(LIGHTHOUSE, PATTERN,
                                                                          use_transformer_engine=False), PATTERN, seed=7)
    sharded = hybrid.sharded_state_dict()
    retarget_sharded_state_dict_to_gpt_checkpoint(sharded, gpt_compatible_layer_maps(PATTERN))
    hybrid.load_state_dict(dist_checkpointing.load(sharded, str(tmp_path)), strict=True)
    assert _lighthouse_layers(hybrid) == [5, 7]
    tokens, positions, _ = batch()
    gpt.eval()
    hybrid.eval()
    with torch.no_grad():
        torch.testing.assert_close(hybrid(tokens, positions, None), gpt(tokens, positions, None), rtol=0, atol=0)


# -- the Megatron-LM side: start-up checks, summary, spec choice, unpatched --spec ------------------------------


def _hybrid_args(*argv: str, pattern: str = "*-" * 8, impl: str = "local", **values) -> argparse.Namespace:
    from megatron_lighthouse.megatron_lm import add_lighthouse_args

    args = add_lighthouse_args(argparse.ArgumentParser(prog="pretrain_hybrid.py")).parse_args(list(argv))
    defaults = dict(seq_length=SEQ, num_layers=len(pattern.split("/")[0].replace("|", "")), context_parallel_size=1,
                    hybrid_layer_pattern=pattern, transformer_impl=impl, no_persist_layer_norm=True,
                    normalization="LayerNorm", spec=None)
    for name, value in {**defaults, **values}.items():
        setattr(args, name, value)
    return args


SMALL = ("--lighthouse", "--lighthouse-topk", "128", "--lighthouse-levels", "2", "--lighthouse-pooling-factor", "2")


def test_start_up_checks_count_attention_layers():
    from megatron_lighthouse.megatron_lm import lighthouse_summary, validate_lighthouse_args

    args = _hybrid_args(*SMALL)
    lighthouse = validate_lighthouse_args(args)
    line = lighthouse_summary(args, lighthouse, 4, 16)
    assert ("--hybrid-layer-pattern *-*-*-*-*-*-*-*-: 4 of 8 attention layers run Lighthouse (hybrid layers 5, 7, 9, "
            "11); dense: 1, 3, 13, 15") in line, line
    with pytest.raises(ValueError, match=r"^--hybrid-layer-pattern \*-\*-\*-\*- with --lighthouse-dense-layers "
                                         r"0,1,-2,-1: keeps all 4 attention layers \(hybrid layers 1, 3, 5, 7\) dense: "
                                         r"no layer would run Lighthouse$"):
        validate_lighthouse_args(_hybrid_args(*SMALL, pattern="*-" * 4))
    with pytest.raises(ValueError, match=r"^--hybrid-layer-pattern M\*M\*\|M\*M\* with --lighthouse-dense-layers 9: "
                                         r"LighthouseConfig.dense_layers entry 9: out of range for a model of 4 "
                                         r"attention layers$"):
        validate_lighthouse_args(_hybrid_args(*SMALL, "--lighthouse-dense-layers", "9", pattern="M*M*|M*M*",
                                              impl="transformer_engine"))
    with pytest.raises(ValueError, match=r"^--transformer-impl local with --hybrid-layer-pattern M\*M\*M\*M\*M\*: its "
                                         r"'M' \(Mamba\) layers are not in the local hybrid stack spec"):
        validate_lighthouse_args(_hybrid_args(*SMALL, pattern="M*" * 5))
    # Megatron's own hybrid stack spec (the migration guide's --spec) is the one Lighthouse goes into; others are not
    spec = ["megatron.core.models.hybrid.hybrid_layer_specs", "hybrid_stack_spec"]
    assert validate_lighthouse_args(_hybrid_args(*SMALL, spec=spec)) == lighthouse
    with pytest.raises(ValueError, match=r"^--lighthouse with --spec my.specs stack: --lighthouse builds"):
        validate_lighthouse_args(_hybrid_args(*SMALL, spec=["my.specs", "stack"]))


@dataclasses.dataclass
class HybridModelConfig:
    """What the hook reads of Megatron-LM's ``HybridModelConfig``: its ``hybrid_stack_spec`` field."""

    transformer: object = None
    hybrid_stack_spec: object = None


def test_start_lighthouse_sets_the_hybrid_stack_spec(megatron):
    from megatron_lighthouse.megatron_lm import start_lighthouse

    args = _hybrid_args(*SMALL, "--lighthouse-dense-layers", "0,-1", hidden_size=64, num_attention_heads=4)
    model_config = HybridModelConfig()
    lines = []
    start_lighthouse(args, model_config, printer=lines.append)
    assert "6 of 8 attention layers run Lighthouse (hybrid layers 3, 5, 7, 9, 11, 13); dense: 1, 15" in lines[0]
    model = tiny_hybrid(_config("*-" * 8), model_config.hybrid_stack_spec, "*-" * 8)
    assert _lighthouse_layers(model) == [3, 5, 7, 9, 11, 13]


def test_env_spec_hybrid_stack_specs(megatron, monkeypatch):
    """Unpatched pretrain_hybrid.py: ``--spec megatron_lighthouse.env_spec NAME`` gives the hybrid stack spec for
    Megatron-LM's parsed pattern, its LIGHTHOUSE_* settings checked as the hook checks its flags."""
    small = dict(LIGHTHOUSE_TOPK="128", LIGHTHOUSE_LEVELS="2", LIGHTHOUSE_POOLING_FACTOR="2")
    set_lighthouse_environment(monkeypatch, **small, LIGHTHOUSE_DENSE_LAYERS="0,-1")
    pattern = "*-" * 8
    args = dict(seq_length=SEQ, num_layers=16, hybrid_layer_pattern=pattern, transformer_impl="local")
    spec = megatron_lm_spec(monkeypatch, "lighthouse_local_hybrid_stack_spec", **args)
    assert _lighthouse_layers(tiny_hybrid(_config(pattern), spec, pattern)) == [3, 5, 7, 9, 11, 13]
    assert spec.submodules.attention_layer.submodules.self_attention.submodules.core_attention.params == {
        "lighthouse": LighthouseConfig(levels=2, pooling_factor=2, topk=128, dense_layers=(0, -1)),
        "hybrid_layer_pattern": pattern}
    # without TransformerEngine the TE name gives the local stack, as lighthouse_layer_spec does for GPT
    spec = megatron_lm_spec(monkeypatch, "lighthouse_hybrid_stack_spec", **args)
    assert _lighthouse_layers(tiny_hybrid(_config(pattern), spec, pattern)) == [3, 5, 7, 9, 11, 13]
    dense = megatron_lm_spec(monkeypatch, "dense_local_hybrid_stack_spec", **args)
    assert _lighthouse_layers(tiny_hybrid(_config(pattern), dense, pattern)) == []
    set_lighthouse_environment(monkeypatch, **small, LIGHTHOUSE_DENSE_LAYERS="0,1,2,3,4,5,6,7")
    with pytest.raises(ValueError, match=r"^--hybrid-layer-pattern \*-\*-\*-\*-\*-\*-\*-\*- with "
                                         r"LIGHTHOUSE_DENSE_LAYERS=0,1,2,3,4,5,6,7: keeps all 8 attention layers"):
        megatron_lm_spec(monkeypatch, "lighthouse_local_hybrid_stack_spec", **args)
    with pytest.raises(ValueError, match=r"lighthouse_hybrid_stack_spec: a hybrid stack spec for pretrain_hybrid.py, "
                                         r"built for its --hybrid-layer-pattern; Megatron-LM's parsed arguments have "
                                         r"none"):
        megatron_lm_spec(monkeypatch, "lighthouse_hybrid_stack_spec", **{**args, "hybrid_layer_pattern": None})
