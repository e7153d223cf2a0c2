"""The op: :func:`lighthouse_attention` and :func:`select_indices`.

Layout contract: ``q`` is ``[B, N, H, D]``, ``k`` and ``v`` are ``[B, N, H_kv, D]`` with ``H % H_kv == 0``
(grouped-query attention; kv head ``j`` serves query heads ``j*H/H_kv ... (j+1)*H/H_kv - 1``). Every query head
selects on its own, scored against its kv head's keys, and gathers its entries straight from its kv head: the steps
pool and score k and v once per kv head, never copy them per query head, and sum a kv head's gradient over its
query heads. The result is ``[B, N, H, D]`` in ``q``'s dtype. Scores and selection run in float32.

The four steps around the dense attention (pool and score, select, gather, scatter) come from one of two modules
with the same functions: :mod:`megatron_lighthouse.naive` (pure PyTorch, the oracle) or ``lighthouse_kernels``
(fused Triton); :func:`_steps` is the one place that picks.
"""

from __future__ import annotations

import functools
import inspect
import math
import numbers
import os
from types import ModuleType
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist

from .config import MAX_TILE_ENTRIES, LighthouseConfig, check_int
from .context_parallel import check_cp_call, check_cp_shard, cp_causal_attention, cp_world_size
from .dense import DenseAttention, dense_attention
from .naive import pyramid_last_tokens
from .rotary import EntryRotary, check_rotary, is_table_rotary

_BACKENDS = ("auto", "torch", "triton")
#: The dtypes q/k/v may have (the dense kernels' floating types).
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@functools.lru_cache(maxsize=None)
def _triton_kernels_available() -> bool:
    try:
        import lighthouse_kernels  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str, q: torch.Tensor, config: Optional[LighthouseConfig] = None, seq_len: int = 0,
                    chunks: int = 1) -> str:
    """``"torch"`` (the pure-PyTorch oracle) or ``"triton"`` (fused kernels); ``"auto"`` is triton for CUDA tensors
    when Triton imports, except float64 ones, which it runs on torch (the fused kernels compute in fp32).
    ``ValueError`` for another name, for ``"triton"`` on tensors Triton cannot run on (not CUDA, outside the CPU
    interpreter ``TRITON_INTERPRET=1``) or on float64 ones, and, given ``config`` (valid for ``seq_len`` tokens in
    ``chunks`` chunks: under CP the global sequence and ``2W``), when Triton, asked for or picked by ``"auto"``,
    cannot hold a selection tile: more than :data:`~megatron_lighthouse.config.MAX_TILE_ENTRIES` coarsest-level
    entries."""
    if backend not in _BACKENDS:
        raise ValueError(f"backend={backend!r}: must be one of {_BACKENDS}")
    if backend == "triton":
        if not q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(f"backend='triton' on {q.device.type} tensors: the Triton kernels run on CUDA (or under "
                             f"the CPU interpreter, TRITON_INTERPRET=1 set before triton is imported); use "
                             f"backend='torch' or 'auto'")
        if not _triton_kernels_available():
            raise ValueError("backend='triton': the lighthouse_kernels package (Triton) is not importable; install "
                             "triton, or use backend='torch'")
        if q.dtype == torch.float64:
            raise ValueError("backend='triton' with torch.float64 inputs: the fused kernels compute in fp32; use "
                             "backend='torch'")
    use = backend
    if backend == "auto":
        use = "triton" if q.is_cuda and q.dtype != torch.float64 and _triton_kernels_available() else "torch"
    per_tile = config.tile_entries(seq_len, chunks) if use == "triton" and config is not None else 0
    if per_tile > MAX_TILE_ENTRIES:
        raise ValueError(
            f"backend={backend!r}: levels={config.levels}, pooling_factor={config.pooling_factor}, "
            f"topk={config.topk} give {per_tile} coarsest-level entries per selection tile ({seq_len // chunks} "
            f"tokens{' per chunk' if chunks > 1 else ''} / pooling_factor**(levels-1) / {config.tiles(chunks)} "
            f"tiles), more than the {MAX_TILE_ENTRIES} of Triton's largest block, which holds a tile in the fused "
            f"selection; use backend='torch', or more levels or a larger topk"
        )
    return use


def _steps(backend: str) -> ModuleType:
    """The module whose ``pool_scores``, ``select_entries``, ``gather_entries`` and ``scatter_to_tokens`` run the
    op: the fused kernels for ``"triton"``, the naive oracle for ``"torch"``."""
    if backend == "triton":
        import lighthouse_kernels

        return lighthouse_kernels
    from . import naive

    return naive


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Raise ``ValueError`` unless q/k/v follow the layout contract of this module."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D [B, N, H, D], got shape {tuple(t.shape)}")
        if t.dtype not in _DTYPES:
            raise ValueError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
        if t.numel() == 0:
            raise ValueError(f"{name} has a zero-sized dimension, shape {tuple(t.shape)} ([B, N, H, D]): every "
                             f"dimension must be >= 1")
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
    if q.device.type == "meta":
        raise ValueError("q, k, v are on the meta device: the selection reads the values of q and k")


def expand_kv_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Key/value heads repeated for their query groups along the heads dim, the second last: ``[B, N, H_kv, D]``
    -> ``[B, N, num_heads, D]`` (Megatron's ``[s, b, g, d]`` and packed ``[t, g, d]`` alike). Head ``j`` serves
    query heads ``j * num_heads / H_kv`` to ``(j + 1) * num_heads / H_kv - 1``, Megatron's GQA grouping. For dense
    kernels built with one kv head per query head; the op itself never expands k or v."""
    groups = num_heads // x.shape[-2]
    return x if groups == 1 else x.repeat_interleave(groups, dim=-2)


def resolve_config(config: Optional[LighthouseConfig], levels: Optional[int], pooling_factor: Optional[int],
                   topk: Optional[int]) -> LighthouseConfig:
    """The call's settings: ``config``, or a :class:`LighthouseConfig` of the keywords given (its defaults for the
    others). ``ValueError`` for both at once, or a ``config`` that is not a ``LighthouseConfig``."""
    keywords = {name: value for name, value in (("levels", levels), ("pooling_factor", pooling_factor),
                                                ("topk", topk)) if value is not None}
    if config is None:
        return LighthouseConfig(**keywords)
    if not isinstance(config, LighthouseConfig):
        raise ValueError(f"config={config!r}: must be a LighthouseConfig")
    if keywords:
        raise ValueError(f"config= and {', '.join(keywords)}=: give the settings one way, not both")
    return config


def resolve_softmax_scale(softmax_scale: Optional[float], head_dim: int) -> float:
    """``softmax_scale`` as a float, or ``1/sqrt(head_dim)`` for ``None``; ``ValueError`` unless a real number
    (``numbers.Real``, numpy's too; not a bool), finite and > 0."""
    if softmax_scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, numbers.Real) or not (
            math.isfinite(softmax_scale) and softmax_scale > 0):
        raise ValueError(f"softmax_scale={softmax_scale!r}: must be a finite number > 0 (None: 1/sqrt(D))")
    return float(softmax_scale)


#: Given a rank's error message for a contract the call broke after the settings exchange (``None``: kept), every
#: rank of the CP group raises together when any rank's did (:func:`check_cp_call` again); ``None`` without CP.
Agree = Optional[Callable[[Optional[str]], None]]


def check_callback(name: str, fn: object, params: Sequence[str]) -> None:
    """``ValueError`` unless ``fn``, the ``name=`` argument, is callable with the positional arguments ``params``
    (a signature that cannot take them: too few or too many parameters). Callables without a signature to read
    (some builtins) pass."""
    if not callable(fn):
        raise ValueError(f"{name} must be a callable ({', '.join(params)}) -> out, or None, got {type(fn).__name__}")
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return
    try:
        signature.bind(*params)
    except TypeError as err:
        raise ValueError(f"{name}={getattr(fn, '__qualname__', type(fn).__name__)}: must take the "
                         f"{len(params)} positional arguments ({', '.join(params)}); {err}") from None


def _checked(name: str, out: object, like: torch.Tensor, rule: str, agree: Agree) -> torch.Tensor:
    """``out``, what the ``name=`` callable returned, if it has ``like``'s shape, dtype and device; else
    ``ValueError`` stating ``rule``, on every rank of the CP group at once when ``agree`` is given."""
    error = None
    if not isinstance(out, torch.Tensor) or (out.shape, out.dtype, out.device) != (like.shape, like.dtype,
                                                                                  like.device):
        got = (f"{tuple(out.shape)} {out.dtype} on {out.device}" if isinstance(out, torch.Tensor)
               else type(out).__name__)
        error = (f"{name}= returned {got}; {rule} shape, dtype and device, {tuple(like.shape)} {like.dtype} on "
                 f"{like.device} ([B, H, S, D])")
    if agree is not None:
        agree(error)
    if error is not None:
        raise ValueError(error)
    return out


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


def _select(steps: ModuleType, q: torch.Tensor, k: torch.Tensor, config: LighthouseConfig, chunks: int,
            chunk_topk: int) -> torch.Tensor:
    """Scores and selection of each of ``chunks`` chunks alone, with budget ``chunk_topk`` each: q ``[B, N, H, D]``,
    k ``[B, N, H_kv, D]`` -> chunk-local pyramid positions ``[B*chunks, H, S_c]`` int64."""
    n_chunk = q.shape[1] // chunks
    score_q, score_k = steps.pool_scores(_split_chunks(q, chunks), _split_chunks(k, chunks), config.levels,
                                         config.pooling_factor)
    return steps.select_entries(score_q, score_k, n_chunk, config.levels, config.pooling_factor, chunk_topk)


def entry_positions(indices: torch.Tensor, seq_len: int, levels: int, pooling_factor: int,
                    chunks: int = 1) -> torch.Tensor:
    """Token index (in the ``seq_len`` sequence) of the last token of each selected entry: chunk-local pyramid
    ``indices`` ``[B*chunks, H, S_c]`` -> int64 ``[B, H, chunks*S_c]``, in subsequence order."""
    n_chunk = seq_len // chunks
    last = pyramid_last_tokens(n_chunk, levels, pooling_factor, indices.device)[indices.long()]
    offset = torch.arange(chunks, device=indices.device).repeat(last.shape[0] // chunks) * n_chunk
    return _chunks_to_sequence((last + offset.view(-1, 1, 1)).unsqueeze(-1), chunks).squeeze(-1)


def _attend_selected(steps: ModuleType, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, indices: torch.Tensor,
                     config: LighthouseConfig, chunks: int, scale: float, attention: DenseAttention,
                     rotary: Optional[EntryRotary], agree_attention: Agree = None,
                     agree_rotary: Agree = None) -> torch.Tensor:
    """Gather the selected entries, attend causally over them, scatter back (spec sections 4-6).

    Differentiable in q (``[B, N, H, D]``) and k/v (``[B, N, H_kv, D]``); ``indices`` (``[B*chunks, H, S_c]``, from
    the selection) are constants. The dense attention gets ``[B, H, S, D]`` q, k and v: each query head attends
    over its own entries. ``rotary`` rotates the gathered q and k entries at their last tokens' positions
    before the attention. ``agree_attention`` / ``agree_rotary``: how the ranks of a CP group agree on whether
    ``attention`` / ``rotary`` kept their contract (see :func:`_checked`). Returns ``[B, N, H, D]``.
    """
    b, n, h, d = q.shape
    levels, p = config.levels, config.pooling_factor
    picked = steps.gather_entries(*(_split_chunks(x, chunks) for x in (q, k, v)), indices, levels, p)
    sub_q, sub_k, sub_v = (_chunks_to_sequence(x, chunks) for x in picked)
    if rotary is not None:
        positions = entry_positions(indices, n, levels, p, chunks)
        sub_q, sub_k = (_checked("rotary", rotary(x, positions), x, "an entry rotary must return its x's",
                                 agree_rotary) for x in (sub_q, sub_k))
    out_sub = _checked("attention", attention(sub_q, sub_k, sub_v, scale), sub_q, "a dense kernel must return its q's",
                       agree_attention)
    out = steps.scatter_to_tokens(_sequence_to_chunks(out_sub, chunks), indices, n // chunks, levels, p)
    return out.view(b, chunks, n // chunks, h, d).reshape(b, n, h, d)


def select_indices(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    config: Optional[LighthouseConfig] = None,
    levels: Optional[int] = None,
    pooling_factor: Optional[int] = None,
    topk: Optional[int] = None,
    chunks: int = 1,
    backend: str = "auto",
) -> torch.Tensor:
    """Selected pyramid positions per (batch, head).

    Args:
        q: ``[B, N, H, D]``; k: ``[B, N, H_kv, D]``.
        config, levels, pooling_factor, topk, chunks, backend: as :func:`lighthouse_attention`.
    Returns:
        int64 ``[B, H, S]`` positions into the concatenated pyramid in causal order (``chunks == 1``), or
        ``[B, chunks, H, S_c]`` with chunk-local positions when ``chunks > 1``.
    """
    config = resolve_config(config, levels, pooling_factor, topk)
    check_qkv(q, k, k)
    check_int("chunks", chunks)
    config.validate(q.shape[1], chunks)
    steps = _steps(resolve_backend(backend, q, config, q.shape[1], chunks))
    indices = _select(steps, q, k, config, chunks, config.topk // chunks)
    return indices if chunks == 1 else indices.view(q.shape[0], chunks, *indices.shape[1:])


def lighthouse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    config: Optional[LighthouseConfig] = None,
    levels: Optional[int] = None,
    pooling_factor: Optional[int] = None,
    topk: Optional[int] = None,
    chunks: int = 1,
    softmax_scale: Optional[float] = None,
    attention: Optional[DenseAttention] = None,
    backend: str = "auto",
    cp_group: Optional[dist.ProcessGroup] = None,
    rotary: Optional[EntryRotary] = None,
) -> torch.Tensor:
    """Lighthouse attention: select a short causal subsequence of a q/k/v pyramid, attend densely, scatter back.

    Args:
        q: ``[B, N, H, D]``; k, v: ``[B, N, H_kv, D]``, ``H % H_kv == 0``; one dtype (float16, bfloat16,
            float32 or float64), one device.
        config: the settings as one :class:`LighthouseConfig`; or give ``levels``, ``pooling_factor`` and ``topk``
            (any not given take the config's defaults), not both. ``topk`` is the budget of the whole sequence;
            with ``chunks > 1`` each chunk gets ``topk // chunks``.
        chunks: split the sequence into this many equal chunks, each selected independently; one causal
            attention runs over the chunk subsequences concatenated in order (the context-parallel semantics).
        softmax_scale: a finite real number > 0 (numpy's too); defaults to ``1/sqrt(D)``.
        attention: dense kernel ``(q, k, v, softmax_scale) -> out`` on ``[B, H, S, D]``, causal, returning q's
            shape, dtype and device (its signature is checked before any work, its result after it returns);
            defaults to :func:`~megatron_lighthouse.dense.dense_attention` ``("auto")``: on CUDA the fastest
            available stock kernel for the shape, timed once; torch SDPA elsewhere.
        backend: ``"torch"`` runs the pure-PyTorch reference steps; ``"triton"`` the fused kernels of
            ``lighthouse_kernels`` (CUDA tensors, or the CPU interpreter); ``"auto"`` is ``"triton"`` for CUDA
            tensors when Triton imports, else ``"torch"`` (float64 always: the fused kernels compute in fp32, and
            ``"triton"`` refuses it). The Triton selection holds a tile of at most
            :data:`~megatron_lighthouse.config.MAX_TILE_ENTRIES` coarsest-level entries; a call past that is refused
            (:func:`resolve_backend`). The dense attention is ``attention`` either way.
        cp_group: context parallelism over this group of ``W`` ranks: q/k/v are the rank's load-balanced shard
            (global chunks ``r`` and ``2W-1-r`` of ``2W``, concatenated, as Megatron lays them out) and ``topk``
            is the global budget. Each local chunk is selected alone with ``topk // (2W)``; ``attention``
            defaults to :func:`cp_causal_attention` over the group. ``chunks`` must stay 1. All ranks check the
            call together (:func:`~megatron_lighthouse.context_parallel.check_cp_call`): a bad argument on any rank
            is one ``ValueError`` on every rank, naming the rank(s). The results of a caller's ``attention`` and
            ``rotary`` are checked the same way (one more such exchange per call and callable), so a wrong shape
            on one rank also raises on every rank. Local to the rank that raises them, with the other ranks then
            waiting in the next collective until the process group's timeout: exceptions raised *inside*
            ``attention`` or ``rotary`` (or the default kernel), kernel failures such as running out of memory,
            and errors of the backward pass (``docs/CONTEXT_PARALLEL.md``).
        rotary: rotary position embedding of the selected entries (:data:`~megatron_lighthouse.rotary.EntryRotary`,
            e.g. :func:`~megatron_lighthouse.rotary.entry_rotary` of Megatron's table): q and k are then given
            *un-rotated*, pooled and selected as they are, and each selected entry is rotated at the position of
            the last token it covers, as the published model does. ``None``: no rotation here (q/k already carry
            their positions, or the model has none). A table of :func:`~megatron_lighthouse.rotary.entry_rotary` must
            cover q's ``N`` positions and at most its ``D`` dims, on q's device; the result must keep x's shape,
            dtype and device (checked).
    Returns:
        ``[B, N, H, D]`` in q's dtype.

    Every bad argument is a ``ValueError`` naming it, raised before any kernel runs (a wrong ``rotary`` or
    ``attention`` result, once it returns). Non-finite values are not checked (that would cost a pass over the
    inputs and a host synchronisation): NaN or infinity in q, k or v, or a ``softmax_scale`` so large that the
    scores overflow, propagate into the output and the gradients as in stock attention, and may also change which
    entries are selected.
    """
    world = None if cp_group is None else cp_world_size(cp_group)
    try:  # the checks that need no communication
        config = resolve_config(config, levels, pooling_factor, topk)
        check_qkv(q, k, v)
        check_int("chunks", chunks)
        scale = resolve_softmax_scale(softmax_scale, q.shape[3])
        if attention is not None:
            check_callback("attention", attention, ("q", "k", "v", "softmax_scale"))
        check_rotary(rotary, q)
        if rotary is not None:
            check_callback("rotary", rotary, ("x", "positions"))
        if world is None:
            config.validate(q.shape[1], chunks)
            steps = _steps(resolve_backend(backend, q, config, q.shape[1], chunks))
        elif chunks != 1:
            raise ValueError(f"chunks={chunks}: must stay 1 with cp_group (each CP rank selects its 2 chunks)")
        else:
            check_cp_shard(config, q.shape[1], world)
            steps = _steps(resolve_backend(backend, q, config, world * q.shape[1], 2 * world))
    except ValueError as err:
        if world is None:
            raise
        check_cp_call(cp_group, None, q, k, None, str(err))  # every rank raises, naming this one
        raise  # not reached: check_cp_call raises for the error it was given
    agree_attention = agree_rotary = None
    if world is None:
        chunk_topk = config.topk // chunks
    else:
        check_cp_call(cp_group, config, q, k, scale)
        chunks, chunk_topk = 2, config.topk // (2 * world)  # the rank's two of 2W chunks
        # The caller's callables may break their contract on one rank only: the ranks agree on their results
        # (the package's own kernel and entry_rotary tables keep it by construction).
        agree = functools.partial(check_cp_call, cp_group, config, q, k, scale)
        agree_attention = None if attention is None else agree
        agree_rotary = None if rotary is None or is_table_rotary(rotary) else agree
        if attention is None:
            attention = functools.partial(cp_causal_attention, group=cp_group)
    if attention is None:
        attention = dense_attention("auto", q.device.type)
    indices = _select(steps, q, k, config, chunks, chunk_topk)
    return _attend_selected(steps, q, k, v, indices, config, chunks, scale, attention, rotary, agree_attention,
                            agree_rotary)
