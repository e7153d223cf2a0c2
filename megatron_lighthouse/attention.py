"""Functional entry points: :func:`lighthouse_attention` and :func:`select_indices`.

Layout contract: ``q`` is ``[B, N, H, D]``, ``k`` and ``v`` are ``[B, N, H_kv, D]`` with ``H % H_kv == 0``
(grouped-query attention; kv head ``j`` serves query heads ``j*H/H_kv ... (j+1)*H/H_kv - 1``, and kv heads
are expanded before selection, so every query head selects on its own). The result is ``[B, N, H, D]`` in
``q``'s dtype. Scores and selection run in float32.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .config import LighthouseConfig
from .context_parallel import cp_causal_attention, cp_local_topk
from .naive import build_pyramid, pyramid_last_tokens, pyramid_scores, scatter_to_tokens, select_pyramid_indices
from .rotary import EntryRotary

#: ``attention(q, k, v, softmax_scale) -> out``, all ``[B, H, S, D]``, causal over ``S``.
DenseAttention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]

_BACKENDS = ("auto", "torch", "triton")


@functools.lru_cache(maxsize=None)
def _triton_kernels_available() -> bool:
    try:
        import lighthouse_kernels  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str, q: torch.Tensor) -> str:
    """``"torch"`` (the pure-PyTorch oracle) or ``"triton"`` (fused kernels); ``"auto"`` is triton for CUDA tensors."""
    if backend not in _BACKENDS:
        raise ValueError(f"backend={backend!r}: must be one of {_BACKENDS}")
    if backend == "auto":
        return "triton" if q.is_cuda and _triton_kernels_available() else "torch"
    return backend


def sdpa_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float) -> torch.Tensor:
    """Stock causal attention on ``[B, H, S, D]`` tensors (torch SDPA picks flash / cuDNN / math)."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=softmax_scale)


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Raise ``ValueError`` unless q/k/v follow the layout contract of this module."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D [B, N, H, D], got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be floating point, got {t.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[1] != k.shape[1] or q.shape[3] != k.shape[3]:
        raise ValueError(
            f"q {tuple(q.shape)} and k/v {tuple(k.shape)} must agree in batch, sequence and head dim ([B, N, H, D])"
        )
    if q.shape[2] % k.shape[2] != 0:
        raise ValueError(f"query heads ({q.shape[2]}) must be a multiple of kv heads ({k.shape[2]})")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")


def expand_kv_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """``[B, N, H_kv, D]`` -> ``[B, N, num_heads, D]``, each kv head repeated for its query group."""
    groups = num_heads // x.shape[2]
    return x if groups == 1 else x.repeat_interleave(groups, dim=2)


def _split_chunks(x: torch.Tensor, chunks: int) -> torch.Tensor:
    """``[B, N, H, D]`` -> ``[B*chunks, N/chunks, H, D]`` (chunk-major within each batch row)."""
    b, n, h, d = x.shape
    return x.reshape(b * chunks, n // chunks, h, d)


def _chunks_to_sequence(x: torch.Tensor, chunks: int) -> torch.Tensor:
    """``[B*chunks, H, S_c, D]`` -> ``[B, H, chunks*S_c, D]`` (chunk subsequences concatenated in order)."""
    bc, h, s, d = x.shape
    return x.view(bc // chunks, chunks, h, s, d).transpose(1, 2).reshape(bc // chunks, h, chunks * s, d)


def _sequence_to_chunks(x: torch.Tensor, chunks: int) -> torch.Tensor:
    """Inverse of :func:`_chunks_to_sequence`."""
    b, h, s, d = x.shape
    return x.view(b, h, chunks, s // chunks, d).transpose(1, 2).reshape(b * chunks, h, s // chunks, d)


def _select_chunked(
    q: torch.Tensor, k: torch.Tensor, cfg: LighthouseConfig, chunks: int, backend: str = "torch"
) -> torch.Tensor:
    """Pyramid scores and selection per chunk. q/k ``[B*chunks, N_c, H, D]``; returns indices ``[B*chunks, H, S_c]``."""
    n_chunk = q.shape[1]
    topk = cfg.topk // chunks
    if backend == "triton":
        import lighthouse_kernels as fused

        score_q, score_k = fused.pool_scores(q, k, cfg.levels, cfg.pooling_factor)
        return fused.select_indices_fused(score_q, score_k, n_chunk, cfg.levels, cfg.pooling_factor, topk)
    score_q, score_k = pyramid_scores(q, k, cfg.levels, cfg.pooling_factor)
    return select_pyramid_indices(score_q, score_k, n_chunk, cfg.levels, cfg.pooling_factor, topk)


def entry_positions(indices: torch.Tensor, seq_len: int, levels: int, pooling_factor: int,
                    chunks: int = 1) -> torch.Tensor:
    """Token index (in the ``seq_len`` sequence) of the last token of each selected entry: chunk-local pyramid
    ``indices`` ``[B*chunks, H, S_c]`` -> int64 ``[B, H, chunks*S_c]``, in subsequence order."""
    n_chunk = seq_len // chunks
    last = pyramid_last_tokens(n_chunk, levels, pooling_factor, indices.device)[indices.long()]
    offset = torch.arange(chunks, device=indices.device).repeat(last.shape[0] // chunks) * n_chunk
    return _chunks_to_sequence((last + offset.view(-1, 1, 1)).unsqueeze(-1), chunks).squeeze(-1)


def attend_selected(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    indices: torch.Tensor,
    *,
    levels: int,
    pooling_factor: int,
    chunks: int = 1,
    softmax_scale: Optional[float] = None,
    attention: Optional[DenseAttention] = None,
    backend: str = "auto",
    rotary: Optional[EntryRotary] = None,
) -> torch.Tensor:
    """Gather the selected entries, attend causally over them, scatter back (spec sections 4-6).

    Differentiable in q/k/v; ``indices`` (``[B*chunks, H, S_c]``, from the selection) are constants.
    q/k/v are ``[B, N, H, D]`` with kv heads already expanded. Returns ``[B, N, H, D]``.
    ``backend="triton"`` gathers (pooling on the fly) and scatters with the fused deterministic kernels.
    ``rotary`` rotates the gathered q and k entries at their last tokens' positions before the attention.
    """
    b, n, h, d = q.shape
    scale = 1.0 / math.sqrt(d) if softmax_scale is None else softmax_scale

    def attend(picked_q: torch.Tensor, picked_k: torch.Tensor, picked_v: torch.Tensor) -> torch.Tensor:
        if rotary is not None:
            positions = entry_positions(indices, n, levels, pooling_factor, chunks)
            picked_q, picked_k = rotary(picked_q, positions), rotary(picked_k, positions)
        return attention(picked_q, picked_k, picked_v, scale)

    if resolve_backend(backend, q) == "triton":
        import lighthouse_kernels as fused

        attention = attention or fused.dense_attention("auto", q.device.type)
        indices = indices.contiguous()
        inv = fused.inverse_map_for(indices, n // chunks, levels, pooling_factor)
        split = [_split_chunks(x, chunks) for x in (q, k, v)]
        picked = fused.gather_from_tokens(*split, indices, levels, pooling_factor, inv)
        out_sub = attend(*(_chunks_to_sequence(x, chunks) for x in picked))
        out_sub = _sequence_to_chunks(out_sub, chunks)
        out = fused.scatter_to_tokens(out_sub, indices, n // chunks, levels, pooling_factor, inv)
        return out.view(b, n, h, d)
    attention = attention or sdpa_causal
    index = indices.unsqueeze(-1).expand(-1, -1, -1, d)
    picked = [
        _chunks_to_sequence(build_pyramid(_split_chunks(x, chunks), levels, pooling_factor).gather(2, index), chunks)
        for x in (q, k, v)
    ]
    out_sub = attend(*picked)
    out = scatter_to_tokens(_sequence_to_chunks(out_sub, chunks), indices, n // chunks, levels, pooling_factor)
    return out.view(b, chunks, h, n // chunks, d).permute(0, 1, 3, 2, 4).reshape(b, n, h, d)


def select_indices(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    levels: int,
    pooling_factor: int,
    topk: int,
    chunks: int = 1,
    backend: str = "auto",
) -> torch.Tensor:
    """Selected pyramid positions per (batch, head).

    Args:
        q: ``[B, N, H, D]``; k: ``[B, N, H_kv, D]``.
    Returns:
        int64 ``[B, H, S]`` positions into the concatenated pyramid in causal order (``chunks == 1``), or
        ``[B, chunks, H, S_c]`` with chunk-local positions when ``chunks > 1``.
    """
    check_qkv(q, k, k)
    cfg = LighthouseConfig(levels=levels, pooling_factor=pooling_factor, topk=topk)
    cfg.validate(q.shape[1], chunks)
    k = expand_kv_heads(k, q.shape[2])
    backend = resolve_backend(backend, q)
    indices = _select_chunked(_split_chunks(q, chunks), _split_chunks(k, chunks), cfg, chunks, backend)
    if chunks == 1:
        return indices
    return indices.view(q.shape[0], chunks, *indices.shape[1:])


def lighthouse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    levels: int,
    pooling_factor: int,
    topk: int,
    chunks: int = 1,
    softmax_scale: Optional[float] = None,
    attention: Optional[DenseAttention] = None,
    backend: str = "auto",
    cp_group: Optional[dist.ProcessGroup] = None,
    rotary: Optional[EntryRotary] = None,
) -> torch.Tensor:
    """Lighthouse attention: select a short causal subsequence of a q/k/v pyramid, attend densely, scatter back.

    Args:
        q: ``[B, N, H, D]``; k, v: ``[B, N, H_kv, D]``, ``H % H_kv == 0``; one floating dtype, one device.
        levels, pooling_factor, topk: see :class:`LighthouseConfig` (``topk`` is the budget of the whole
            sequence; with ``chunks > 1`` each chunk gets ``topk // chunks``).
        chunks: split the sequence into this many equal chunks, each selected independently; one causal
            attention runs over the chunk subsequences concatenated in order (the context-parallel semantics).
        softmax_scale: defaults to ``1/sqrt(D)``.
        attention: dense kernel ``(q, k, v, softmax_scale) -> out`` on ``[B, H, S, D]``, causal; defaults
            to torch SDPA.
        backend: ``"torch"`` runs the pure-PyTorch reference; ``"triton"`` the fused kernels of
            ``lighthouse_kernels`` (dense part still ``attention``, by default SDPA preferring cuDNN);
            ``"auto"`` is ``"triton"`` for CUDA tensors when Triton imports, else ``"torch"``.
        cp_group: context parallelism over this group of ``W`` ranks: q/k/v are the rank's load-balanced shard
            (global chunks ``r`` and ``2W-1-r`` of ``2W``, concatenated, as Megatron lays them out) and ``topk``
            is the global budget. Each local chunk is selected alone with ``topk // (2W)``; ``attention``
            defaults to :func:`cp_causal_attention` over the group. ``chunks`` must stay 1.
        rotary: rotary position embedding of the selected entries (:data:`~megatron_lighthouse.rotary.EntryRotary`,
            e.g. :func:`~megatron_lighthouse.rotary.entry_rotary` of Megatron's table): q and k are then given
            *un-rotated*, pooled and selected as they are, and each selected entry is rotated at the position of
            the last token it covers, as the published model does. ``None``: no rotation here (q/k already carry
            their positions, or the model has none).
    Returns:
        ``[B, N, H, D]`` in q's dtype.
    """
    check_qkv(q, k, v)
    backend = resolve_backend(backend, q)
    if cp_group is not None:
        if chunks != 1:
            raise ValueError(f"chunks={chunks}: must stay 1 with cp_group (each CP rank selects its 2 chunks)")
        topk = cp_local_topk(
            cp_group, q, k, levels=levels, pooling_factor=pooling_factor, topk=topk, softmax_scale=softmax_scale
        )
        chunks = 2
        attention = attention or functools.partial(cp_causal_attention, group=cp_group)
    cfg = LighthouseConfig(levels=levels, pooling_factor=pooling_factor, topk=topk)
    cfg.validate(q.shape[1], chunks)
    h = q.shape[2]
    k, v = expand_kv_heads(k, h), expand_kv_heads(v, h)
    indices = _select_chunked(_split_chunks(q, chunks), _split_chunks(k, chunks), cfg, chunks, backend)
    return attend_selected(
        q,
        k,
        v,
        indices,
        levels=levels,
        pooling_factor=pooling_factor,
        chunks=chunks,
        softmax_scale=softmax_scale,
        attention=attention,
        backend=backend,
        rotary=rotary,
    )
