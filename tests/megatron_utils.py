"""Shared setup for the Megatron-Core tests: a gloo world of one process and tiny fp32 GPT models on CPU."""

from __future__ import annotations

import inspect
import sys
import types
from typing import Any, Dict, Optional

import torch

from megatron_lighthouse.config import LighthouseConfig
from megatron_lighthouse.process_group import init_single_process_megatron

#: Tiny settings that fit SEQ: one tile, 256 tokens -> 128 level-1 entries per tile.
LIGHTHOUSE = LighthouseConfig(levels=2, pooling_factor=2, topk=128)
SEQ = 256
VOCAB = 128


def init_megatron() -> None:
    """gloo world of size 1 (file store) and Megatron's model-parallel state, once per process."""
    init_single_process_megatron("gloo", prefix="ml_megatron_")


def tiny_config(lighthouse: Optional[LighthouseConfig] = LIGHTHOUSE, num_query_groups: int = 4, num_layers: int = 6,
                **kwargs):
    """fp32 CPU ``LighthouseTransformerConfig``: hidden 64, 4 heads of 16, no dropout."""
    from megatron_lighthouse.transformer_config import LighthouseTransformerConfig

    values = dict(num_layers=num_layers, hidden_size=64, num_attention_heads=4, num_query_groups=num_query_groups,
                  ffn_hidden_size=128, use_cpu_initialization=True, attention_dropout=0.0, hidden_dropout=0.0,
                  lighthouse=lighthouse)
    values.update(kwargs)
    return LighthouseTransformerConfig(**values)


def tiny_gpt(config, block_spec, seed: int = 0, position_embedding_type: str = "learned_absolute"):
    """A ``GPTModel`` (learned absolute positions unless told, untied output) built from ``block_spec`` with seeded
    weights. ``"rope"`` on CPU needs ``torch.cuda.current_device`` patched to ``"cpu"`` (Megatron moves its
    inverse frequencies there)."""
    from megatron.core.models.gpt import GPTModel

    torch.manual_seed(seed)
    return GPTModel(config=config, transformer_layer_spec=block_spec, vocab_size=VOCAB, max_sequence_length=SEQ,
                    position_embedding_type=position_embedding_type, share_embeddings_and_output_weights=False)


def batch(batch_size: int = 2, seq: int = SEQ, seed: int = 1):
    """``(tokens, position_ids, labels)`` ``[b, s]`` int64 for a next-token task with structure to learn."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, VOCAB, (batch_size, 1), generator=g)
    tokens = (start + torch.arange(seq + 1) * 3) % VOCAB
    position_ids = torch.arange(seq).expand(batch_size, seq)
    return tokens[:, :-1].contiguous(), position_ids, tokens[:, 1:].contiguous()


def megatron_cp_batch(batch: Dict[str, torch.Tensor], group: Any = None) -> Dict[str, torch.Tensor]:
    """Megatron's own load-balanced split of ``batch`` for this context-parallel rank
    (``megatron.core.utils.get_batch_on_this_cp_rank``) over ``group`` (default: Megatron's CP group), called as each
    megatron-core version takes it: 0.19 added a required ``is_hybrid_cp``, reads ``batch["cu_seqlens"]`` (``None``:
    plain sequences) and, given no group, splits over the whole world."""
    from megatron.core import parallel_state
    from megatron.core.utils import get_batch_on_this_cp_rank

    kwargs = {"cp_group": parallel_state.get_context_parallel_group() if group is None else group}
    if "is_hybrid_cp" not in inspect.signature(get_batch_on_this_cp_rank).parameters:
        return get_batch_on_this_cp_rank(dict(batch), **kwargs)
    out = get_batch_on_this_cp_rank({**batch, "cu_seqlens": None}, is_hybrid_cp=False, **kwargs)
    return {key: out[key] for key in batch}


def tiny_hybrid(config, stack_spec, pattern: str, seed: int = 0, vp_stage: Optional[int] = None,
                pre_process: bool = True, post_process: bool = True):
    """A ``HybridModel`` (megatron-core >= 0.19) of ``config`` (``num_layers`` must be the pattern's) built from
    ``stack_spec`` for ``pattern``, learned absolute positions, untied output, seeded weights; ``vp_stage`` picks a
    ``|`` segment (in a world of one, segment ``vp_stage``)."""
    from megatron.core.models.hybrid.hybrid_model import HybridModel
    from megatron.core.process_groups_config import ProcessGroupCollection

    torch.manual_seed(seed)
    return HybridModel(config=config, hybrid_stack_spec=stack_spec, vocab_size=VOCAB, max_sequence_length=SEQ,
                       hybrid_layer_pattern=pattern, position_embedding_type="learned_absolute",
                       share_embeddings_and_output_weights=False, vp_stage=vp_stage, pre_process=pre_process,
                       post_process=post_process, pg_collection=ProcessGroupCollection.use_mpu_process_groups())


#: The module Megatron-LM's unpatched scripts take their spec from (``--spec ENV_SPEC NAME``).
ENV_SPEC = "megatron_lighthouse.env_spec"


def set_lighthouse_environment(monkeypatch, **variables) -> None:
    """Exactly ``variables`` of the ``LIGHTHOUSE_*`` settings in the environment."""
    for var in ("LIGHTHOUSE_LEVELS", "LIGHTHOUSE_POOLING_FACTOR", "LIGHTHOUSE_TOPK", "LIGHTHOUSE_DENSE_LAYERS"):
        monkeypatch.delenv(var, raising=False)
    for var, value in variables.items():
        monkeypatch.setenv(var, value)


def megatron_lm_spec(monkeypatch, name, **args):
    """``--spec megatron_lighthouse.env_spec NAME`` resolved as Megatron-LM resolves it once it has parsed its
    arguments (``args``, with that ``--spec``): a first import of the module, then ``vars(module)[NAME]``
    (megatron-core's ``spec_utils.import_module``)."""
    from megatron.core.transformer.spec_utils import import_module

    global_vars = types.ModuleType("megatron.training.global_vars")
    global_vars._GLOBAL_ARGS = types.SimpleNamespace(spec=[ENV_SPEC, name], **args)
    monkeypatch.setitem(sys.modules, "megatron.training", types.ModuleType("megatron.training"))
    monkeypatch.setitem(sys.modules, "megatron.training.global_vars", global_vars)
    monkeypatch.delitem(sys.modules, ENV_SPEC, raising=False)
    return import_module((ENV_SPEC, name))


def check_switch_over_fake_te(model, dense, fake, lighthouse: LighthouseConfig, attention: list) -> None:
    """Over the fake TransformerEngine (``fake``: its ``DotProductAttention``, recording each call): ``model``
    switched off computes ``dense`` (the same weights); on, TE's attention sees the Lighthouse subsequence in the
    Lighthouse layers and the whole sequence elsewhere. ``attention``: per attention layer, in order, whether it
    runs Lighthouse."""
    from megatron_lighthouse.schedule import set_lighthouse_enabled

    tokens, positions, _ = batch(2, SEQ)
    dense.eval()
    model.eval()
    with torch.no_grad():
        want = dense(tokens, positions, None)
        assert set_lighthouse_enabled(model, False) == sum(attention)
        torch.testing.assert_close(model(tokens, positions, None), want, rtol=1e-5, atol=1e-5)
        set_lighthouse_enabled(model, True)
        fake.calls.clear()
        out = model(tokens, positions, None)
    sub = lighthouse.subsequence_length(SEQ)
    seen = [info["query"] for kind, info in fake.calls if kind == "forward"]
    assert seen == [(sub if on else SEQ, 2, 4, 16) for on in attention], seen
    assert torch.isfinite(out).all() and (out - want).abs().max() > 1e-3, "Lighthouse layers did not run"
