"""The language-model loss of a Megatron-Core ``GPTModel`` over long sequences, a chunk of tokens at a time.

At a million tokens the output logits, not the attention, fill the GPU: ``[s, b, vocab]`` is 64 GiB in bf16 for a
32K vocabulary, and the cross entropy keeps a float32 copy. :func:`chunked_lm_loss` runs the model up to its final
hidden states, then the output layer and the cross entropy on ``chunk_tokens`` positions at a time, each chunk
recomputed in the backward pass (activation checkpointing), so at most one chunk's logits exist at once. The
result equals ``model(input_ids, position_ids, None, labels=labels)``.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch.utils.checkpoint import checkpoint

from .export import unwrap_model


@contextlib.contextmanager
def _hidden_states_only(model: torch.nn.Module) -> Iterator[None]:
    """Inside, ``GPTModel.forward`` returns the decoder's final hidden states ``[s, b, h]`` (its output stage
    skipped: Megatron's own rule for a model without ``post_process``)."""
    model.post_process = False
    try:
        yield
    finally:
        model.post_process = True


def chunked_lm_loss(model: torch.nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor,
                    labels: torch.Tensor, chunk_tokens: int) -> torch.Tensor:
    """Per-token language-model loss of ``model``, computed ``chunk_tokens`` positions at a time.

    Args:
        model: a Megatron-Core ``GPTModel`` with its output layer (``post_process=True``), possibly wrapped.
        input_ids, position_ids, labels: ``[b, s]`` int64 (under context parallelism, this rank's shard); labels
            may also be int32.
        chunk_tokens: sequence positions per chunk, ``>= 1``; ``s`` need not be a multiple.
    Returns:
        ``[b, s]`` float32 per-token loss, as the model returns with ``labels`` (differentiable).

    ``ValueError`` before the model runs: a bad ``chunk_tokens``, labels that are not an int64 / int32 tensor of
    ``input_ids``' shape, ``input_ids`` or ``position_ids`` that are not int64 / int32 tensors of the labels' shape
    (``None`` where the model reads none: ``input_ids`` on a pipeline's last stage, ``position_ids`` without learned
    position embeddings), a model without its output layer or with multi-token prediction.
    """
    if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1:
        raise ValueError(f"chunk_tokens={chunk_tokens!r}: must be an int >= 1 (sequence positions per chunk)")
    dtype = getattr(labels, "dtype", None)
    if dtype not in (torch.int64, torch.int32):
        raise ValueError(f"chunked_lm_loss: labels of dtype {dtype}: must be an int64 (or int32) tensor of token ids")
    ids_shape = getattr(input_ids, "shape", None)  # None on a pipeline's last stage: it reads no tokens
    if labels.dim() != 2 or (ids_shape is not None and labels.shape != ids_shape):
        raise ValueError(f"chunked_lm_loss: labels of shape {tuple(labels.shape)} for input_ids of shape "
                         f"{None if ids_shape is None else tuple(ids_shape)}: labels must be [b, s], input_ids' "
                         f"shape (one label per position)")
    gpt = unwrap_model(model)
    for name, ids in (("input_ids", input_ids), ("position_ids", position_ids)):
        if ids is not None and (getattr(ids, "dtype", None) not in (torch.int64, torch.int32)
                                or ids.shape != labels.shape):
            got = f"{tuple(ids.shape)} {ids.dtype}" if isinstance(ids, torch.Tensor) else f"a {type(ids).__name__}"
            raise ValueError(f"chunked_lm_loss: {name} {got}: must be an int64 (or int32) tensor of the labels' "
                             f"shape {tuple(labels.shape)}")
    if position_ids is None and getattr(getattr(gpt, "embedding", None), "add_position_embedding", False):
        raise ValueError("chunked_lm_loss: position_ids=None, but the model has learned position embeddings, which "
                         "read them")
    if not getattr(gpt, "post_process", False) or not hasattr(gpt, "output_layer"):
        raise ValueError("chunked_lm_loss: the model has no output layer here (post_process=False: a pipeline "
                         "stage other than the last)")
    if getattr(gpt.config, "mtp_num_layers", None):
        raise ValueError(f"chunked_lm_loss: mtp_num_layers={gpt.config.mtp_num_layers}: multi-token prediction "
                         "computes its own losses from the full hidden states; not supported")
    with _hidden_states_only(gpt):
        hidden = model(input_ids, position_ids, None)  # [s, b, h]
    weight = gpt.shared_embedding_or_output_weight() if gpt.share_embeddings_and_output_weights else None
    scale = getattr(gpt, "_scale_logits", None)  # MuP output scaling (megatron-core >= 0.19)

    def chunk_loss(states: torch.Tensor, chunk_labels: torch.Tensor) -> torch.Tensor:
        logits, _ = gpt.output_layer(states, weight=weight)
        if scale is not None:
            logits = scale(logits)
        return gpt.compute_language_model_loss(chunk_labels, logits)  # [b, c]

    losses = [checkpoint(chunk_loss, hidden[start:start + chunk_tokens], labels[:, start:start + chunk_tokens],
                         use_reentrant=False)
              for start in range(0, hidden.shape[0], chunk_tokens)]
    return torch.cat(losses, dim=1).float()
