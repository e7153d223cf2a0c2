"""Lighthouse in Megatron-Core under context parallelism (gloo, 2 spawned ranks, CPU), torch path: a ``GPTModel``
with ``context_parallel_size=2`` trains and its losses equal the CP=1 run of the same chunked semantics.

The TE path (Megatron's ``TEDotProductAttention`` over TE's own CP algorithms, p2p / all_gather / a2a on 2 and 4
ranks) is tests/test_te_cp_lighthouse.py.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.distributed as dist

from megatron_lighthouse import LighthouseConfig
from spawn import run_on_ranks

WORLD = 2
#: Valid for 2*W = 4 chunks of SEQ / 4 tokens: one tile per chunk, 128 level-1 entries per tile.
LIGHTHOUSE = LighthouseConfig(levels=2, pooling_factor=2, topk=512, dense_layers=(0,))
SEQ = 1024


def _config(cp: int, **kwargs):
    from megatron_lighthouse.transformer_config import LighthouseTransformerConfig

    values = dict(num_layers=3, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128,
                  use_cpu_initialization=True, attention_dropout=0.0, hidden_dropout=0.0, lighthouse=LIGHTHOUSE,
                  context_parallel_size=cp)
    values.update(kwargs)
    return LighthouseTransformerConfig(**values)


# ------------------------------------------------------------------------------------------------ GPT training
def _train_losses(rank, world, cp, steps, positions="learned_absolute"):
    """Per-step mean token loss of a tiny Lighthouse GPT (CP=``cp``, ``positions``: its position embedding type)
    trained with AdamW on a fixed batch."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    from megatron_lighthouse.spec import get_gpt_decoder_block_with_lighthouse_spec

    from megatron.core.models.common.embeddings import rotary_pos_embedding

    from megatron_lighthouse.cp_layout import split_for_cp
    from megatron_utils import megatron_cp_batch

    parallel_state.initialize_model_parallel(context_parallel_size=cp)
    # Two CUDA assumptions of Megatron's RotaryEmbedding, replaced on CPU: it moves its frequencies to the current
    # CUDA device, and slices the table for this CP rank (chunks r and 2W-1-r) through pinned memory.
    current_device, shard = torch.cuda.current_device, rotary_pos_embedding.get_pos_emb_on_this_cp_rank
    torch.cuda.current_device = lambda: "cpu"
    rotary_pos_embedding.get_pos_emb_on_this_cp_rank = lambda emb, seq_dim, group: split_for_cp(
        emb, group.rank(), group.size(), seq_dim=seq_dim)
    try:
        cfg = _config(cp)
        torch.manual_seed(0)
        model = GPTModel(config=cfg, transformer_layer_spec=get_gpt_decoder_block_with_lighthouse_spec(
            cfg, use_transformer_engine=False), vocab_size=64, max_sequence_length=SEQ,
            position_embedding_type=positions, share_embeddings_and_output_weights=False)
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        gen = torch.Generator().manual_seed(1)
        tokens = (torch.randint(0, 64, (2, 1), generator=gen) + torch.arange(SEQ + 1) * 3) % 64
        batch = dict(tokens=tokens[:, :-1], labels=tokens[:, 1:], position_ids=torch.arange(SEQ).expand(2, SEQ))
        group = parallel_state.get_context_parallel_group()
        batch = megatron_cp_batch(batch, group)  # identity when cp == 1
        losses = []
        for _ in range(steps):
            loss_sum = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"]).sum()
            (loss_sum / tokens[:, 1:].numel()).backward()
            for p in model.parameters():  # Megatron's DDP reduces gradients over DP x CP
                dist.all_reduce(p.grad, group=group)
            optimizer.step()
            optimizer.zero_grad()
            total = loss_sum.detach()
            dist.all_reduce(total, group=group)
            losses.append(total.item() / tokens[:, 1:].numel())
        return losses
    finally:
        torch.cuda.current_device, rotary_pos_embedding.get_pos_emb_on_this_cp_rank = current_device, shard
        parallel_state.destroy_model_parallel()


def _check_gpt_cp_matches_chunked_cp1(rank, world, steps, positions):
    import megatron_lighthouse.core_attention as core_attention

    cp_losses = _train_losses(rank, world, world, steps, positions)
    # CP=1 with the same semantics: the core attention selects the full sequence in 2*W chunks (with RoPE, each
    # rank's entries are rotated at global positions, through its own slice of Megatron's rotary table)
    original = core_attention.lighthouse_attention
    core_attention.lighthouse_attention = functools.partial(original, chunks=2 * world)
    try:
        reference = _train_losses(rank, world, 1, steps, positions)
    finally:
        core_attention.lighthouse_attention = original
    assert reference[-1] < reference[0] - 0.05, reference  # it trains
    torch.testing.assert_close(torch.tensor(cp_losses), torch.tensor(reference), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("positions", ["learned_absolute", "rope"])
def test_gpt_context_parallel_2_trains_like_chunked_cp1(positions):
    """(With RoPE, each rank's entries are rotated through its own slice of Megatron's rotary table.)"""
    run_on_ranks(_check_gpt_cp_matches_chunked_cp1, WORLD, 4, positions, pool="megatron")
