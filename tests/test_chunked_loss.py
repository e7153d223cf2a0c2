"""chunked_lm_loss: the GPT's own loss and gradients, a chunk of positions at a time."""

from __future__ import annotations

import re

import pytest
import torch

pytest.importorskip("megatron.core")

from megatron_lighthouse.chunked_loss import chunked_lm_loss  # noqa: E402
from megatron_lighthouse.spec import get_gpt_decoder_block_with_lighthouse_spec  # noqa: E402

from megatron_utils import batch, init_megatron, tiny_config  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def _megatron():
    init_megatron()


#: A vocabulary no other width of the tiny model has (hidden 64, FFN 128), so logits are recognisable by shape.
VOCAB = 200


def _model(share: bool = False):
    from megatron.core.models.gpt import GPTModel

    cfg = tiny_config(num_query_groups=2)
    torch.manual_seed(0)
    return GPTModel(config=cfg, transformer_layer_spec=get_gpt_decoder_block_with_lighthouse_spec(
        cfg, use_transformer_engine=False), vocab_size=VOCAB, max_sequence_length=256,
        position_embedding_type="learned_absolute", share_embeddings_and_output_weights=share)


@pytest.mark.parametrize("chunk,share", [(1000, False), (256, True), (100, False), (1, False)])
def test_equals_the_models_own_loss_and_gradients(chunk, share):
    model = _model(share)
    tokens, pos, labels = batch()
    want = model(tokens, pos, None, labels=labels)
    want_grads = torch.autograd.grad(want.mean(), list(model.parameters()))
    got = chunked_lm_loss(model, tokens, pos, labels, chunk)
    assert got.shape == want.shape == tokens.shape and got.dtype == torch.float32
    torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-6)
    for g, w in zip(torch.autograd.grad(got.mean(), list(model.parameters())), want_grads):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
    assert model.post_process is True  # restored


def test_keeps_only_one_chunk_of_logits_for_the_backward():
    """What autograd saves grows with the whole sequence's logits without chunking, not with them."""
    model = _model()
    tokens, pos, labels = batch()
    vocab = model.output_layer.weight.shape[0]
    assert vocab == VOCAB

    def saved_logits(fn):
        sizes = []

        def pack(t):
            if t.dim() >= 2 and t.shape[-1] == vocab:
                sizes.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
        return sum(sizes)

    full = saved_logits(lambda: model(tokens, pos, None, labels=labels))
    chunked = saved_logits(lambda: chunked_lm_loss(model, tokens, pos, labels, 32))
    assert full >= tokens.numel() * vocab and chunked == 0  # the chunks are recomputed in the backward


def test_bad_settings_are_refused():
    model = _model()
    tokens, pos, labels = batch()
    for chunk in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match=r"chunk_tokens=.*: must be an int >= 1"):
            chunked_lm_loss(model, tokens, pos, labels, chunk)
    for bad_model in (None, "gpt"):
        with pytest.raises(ValueError, match=r"^model: a \w+; must be a torch.nn.Module"):
            chunked_lm_loss(bad_model, tokens, pos, labels, 64)
    for name, ids, got in (("input_ids", tokens.float(), r"\(2, 256\) torch.float32"),
                           ("input_ids", tokens.tolist(), "a list"), ("position_ids", pos[:, :10], r"\(2, 10\)")):
        args = {"input_ids": tokens, "position_ids": pos, name: ids}
        with pytest.raises(ValueError, match=rf"^chunked_lm_loss: {name} {got}.*: must be an int64 \(or int32\) "
                                             r"tensor of the labels' shape \(2, 256\)"):
            chunked_lm_loss(model, labels=labels, chunk_tokens=64, **args)
    with pytest.raises(ValueError, match=r"position_ids=None, but the model has learned position embeddings"):
        chunked_lm_loss(model, tokens, None, labels, 64)
    model.post_process = False
    with pytest.raises(ValueError, match=r"no output layer here"):
        chunked_lm_loss(model, tokens, pos, labels, 64)


def test_bad_labels_are_refused_before_the_model_runs():
    """Longer labels gave the loss of the truncated ones; shorter, 1-D, another batch size or float labels a bare
    IndexError after the whole decoder forward."""
    model = _model()
    calls = []
    model.register_forward_pre_hook(lambda module, args: calls.append(1))
    tokens, pos, labels = batch()
    longer = torch.cat((labels, labels[:, :1]), dim=1)
    for bad in (longer, labels[:, :-1], labels[0], labels[:1], labels[..., None]):
        shape = re.escape(str(tuple(bad.shape)))
        with pytest.raises(ValueError, match=rf"^chunked_lm_loss: labels of shape {shape} for input_ids of shape "
                                             r"\(2, 256\): labels must be \[b, s\], input_ids' shape"):
            chunked_lm_loss(model, tokens, pos, bad, 64)
    for bad in (labels.float(), labels.to(torch.int16), labels.bool(), labels.tolist()):
        with pytest.raises(ValueError, match=r"^chunked_lm_loss: labels of dtype .*: must be an int64 \(or int32\) "
                                             r"tensor of token ids"):
            chunked_lm_loss(model, tokens, pos, bad, 64)
    assert calls == []
    # A pipeline's last stage reads no tokens (input_ids None): the labels' shape is checked alone, so the check
    # does not refuse it (this model is a single stage: it then fails for want of input_ids, after the check).
    with pytest.raises(ValueError, match=r"labels of shape \(256,\) for input_ids of shape None: labels must be"):
        chunked_lm_loss(model, None, pos, labels[0], 64)
    with pytest.raises(Exception) as past_the_check:
        chunked_lm_loss(model, None, pos, labels, 64)
    assert "labels of shape" not in str(past_the_check.value)
    torch.testing.assert_close(chunked_lm_loss(model, tokens, pos, labels.int(), 64),
                               chunked_lm_loss(model, tokens, pos, labels, 64))
