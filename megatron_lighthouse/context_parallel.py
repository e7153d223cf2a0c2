"""Context parallelism (spec section 7): local selection, causal attention over the gathered subsequences.

Each CP rank holds Megatron's load-balanced shard (chunks ``r`` and ``2W-1-r`` of ``2W``) and selects each of
its two chunks alone with budget ``topk / (2W)``, without communication. The two chunk subsequences, concatenated,
are themselves the load-balanced shard of one global subsequence, so any context-parallel causal attention can
run on them. :func:`cp_causal_attention` is the torch one: all-gather of the subsequence K/V over the CP group,
then per local chunk causal attention against the gathered prefix, lower-right aligned, on SDPA's own fused
kernels (:func:`lower_right_causal_attention`). That all-gather (and its gradient's
reduce-scatter) is the only CP communication of the attention; :func:`check_cp_call` adds one small all-gather per
call, so that every rank agrees on the settings or all fail together.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from .config import LighthouseConfig
from .cp_layout import cp_chunk_ids, gather_from_cp
from .lower_right_attention import lower_right_causal_attention

#: Backends whose reduce-scatter is missing in some torch versions: gradients use all-reduce + slice there.
PORTABLE_REDUCE_SCATTER_BACKENDS = ("gloo",)

_SETTING_NAMES = (
    "levels", "pooling_factor", "topk", "batch", "local_seq_len", "heads", "kv_heads", "head_dim",
    "softmax_scale", "dtype_eps",
)
#: Bytes of a rank's error message that :func:`check_cp_call` hands to the other ranks (a longer one is cut).
_MESSAGE_BYTES = 1024
#: Bytes each rank contributes to :func:`check_cp_call`'s all-gather: its settings as float64, then the message.
SETTINGS_ROW_BYTES = 8 * len(_SETTING_NAMES) + _MESSAGE_BYTES


def _collective_device(group: Optional[dist.ProcessGroup], like: object) -> torch.device:
    """Where a collective's buffers live: CPU for gloo, else the tensors' device (the current CUDA device when
    ``like`` is no tensor)."""
    if dist.get_backend(group) == "gloo":
        return torch.device("cpu")
    return like.device if isinstance(like, torch.Tensor) else torch.device("cuda", torch.cuda.current_device())


def _all_gather(x: torch.Tensor, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """``[W, *x.shape]``: ``x`` of every rank of ``group``, in group-rank order (one single-tensor all-gather)."""
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    out = x.new_empty(dist.get_world_size(group) * x.numel())
    gather(out, x.contiguous().view(-1), group=group)
    return out.view(-1, *x.shape)


class _AllGather(torch.autograd.Function):
    """``x -> [W, *x.shape]`` gathered over ``group``; backward sums the gradients and hands each rank its slice."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
        ctx.group = group
        return _all_gather(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> Tuple[torch.Tensor, None]:
        group = ctx.group
        if dist.get_backend(group) in PORTABLE_REDUCE_SCATTER_BACKENDS:
            total = grad.clone(memory_format=torch.contiguous_format)
            dist.all_reduce(total, group=group)
            return total[dist.get_rank(group)], None
        out = grad.new_empty(grad.shape[1:])
        reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
        reduce_scatter(out.view(-1), grad.contiguous().view(-1), group=group)
        return out, None


def cp_causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float, group: Optional[dist.ProcessGroup]
) -> torch.Tensor:
    """Causal attention over a sequence sharded in Megatron's load-balanced CP layout.

    Args:
        q, k, v: ``[B, H, S_local, D]``, one dtype: this rank's shard, global chunks ``r`` and ``2W-1-r`` of
            ``2W`` (``S_local`` even, equal on every rank of ``group``).
        softmax_scale: scale applied to ``q k^T``.
        group: the CP process group (``None``: the default group).
    Returns:
        ``[B, H, S_local, D]``: this rank's shard of causal attention over the global sequence. Each local chunk
        ``c`` attends to all global chunks before it and causally to itself. Differentiable in q, k, v.
    """
    if q.dim() != 4 or q.shape != k.shape or k.shape != v.shape:
        raise ValueError(
            f"cp_causal_attention: q, k, v must share one [B, H, S_local, D] shape, got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    if q.shape[2] % 2 != 0:
        raise ValueError(
            f"cp_causal_attention: local sequence length {q.shape[2]} must be even (two load-balanced chunks)"
        )
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    gathered = _AllGather.apply(torch.stack((k, v)), group)  # [W, 2, B, H, S_local, D]
    kv = gather_from_cp(gathered.unbind(0), seq_dim=3)  # [2, B, H, 2W * chunk, D], global chunk order
    chunk = q.shape[2] // 2
    outs = []
    for local, global_id in enumerate(cp_chunk_ids(rank, world)):
        end = (global_id + 1) * chunk
        q_chunk = q[:, :, local * chunk : (local + 1) * chunk]
        outs.append(lower_right_causal_attention(q_chunk, kv[0, :, :, :end], kv[1, :, :, :end], softmax_scale))
    return torch.cat(outs, dim=2)


def cp_world_size(group: Optional[dist.ProcessGroup]) -> int:
    """The size of ``group``, a Lighthouse call's CP group; ``ValueError`` when this process cannot use it
    (torch.distributed not initialized, no process group, this process not a member). Such a rank cannot join the
    group's collective, so it raises alone."""
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("cp_group is set but torch.distributed is not initialized")
    try:
        rank = dist.get_rank(group)
    except (RuntimeError, ValueError) as err:
        raise ValueError(f"cp_group={group!r}: not a torch.distributed process group ({err})") from None
    if rank < 0:
        raise ValueError("cp_group: this process is not a member of the group")
    return dist.get_world_size(group)


def check_cp_shard(config: LighthouseConfig, local_len: int, world: int) -> None:
    """``ValueError`` unless a rank's shard of ``local_len`` tokens, global chunks ``r`` and ``2W-1-r`` of a
    ``W * local_len`` sequence, fits ``config`` (:meth:`LighthouseConfig.validate` with ``chunks=2W``). A local
    check: :func:`check_cp_call` makes all ranks raise its error together."""
    where = f"context parallelism over a cp_group of size {world} ({local_len} tokens per rank)"
    if local_len % 2 != 0:
        raise ValueError(f"{where}: the global sequence of {world * local_len} tokens must split into 2*W = "
                         f"{2 * world} equal chunks, so the local length must be even (chunks r and 2W-1-r)")
    try:
        config.validate(world * local_len, 2 * world)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None


def check_cp_call(group: Optional[dist.ProcessGroup], config: Optional[LighthouseConfig], q: torch.Tensor,
                  k: torch.Tensor, softmax_scale: Optional[float], error: Optional[str] = None) -> None:
    """Check a context-parallel Lighthouse call on every rank of ``group`` at once.

    Each rank brings the outcome of its local checks: ``error``, the message of the ``ValueError`` they raised on
    this rank, or ``None`` when they passed; only then are its settings read: ``config`` (``config.topk`` the
    global budget), ``q`` ``[B, S_local, H, D]`` and ``k`` ``[B, S_local, H_kv, D]`` (the rank's load-balanced
    shard) and ``softmax_scale``. Every call, the ranks exchange these in one small all-gather (the settings and
    the first :data:`_MESSAGE_BYTES` bytes of the message); then every rank raises the same ``ValueError`` when
    any rank's local checks failed (naming those ranks and their messages) or when any rank's settings or shapes
    differ from the others' (naming the setting and each rank's value). No rank raises alone and leaves the others
    waiting in a collective. The cost is that all-gather of about 1 KB per rank and one host synchronisation per
    call.
    """
    mine = (0.0,) * len(_SETTING_NAMES) if error is not None else (
        config.levels, config.pooling_factor, config.topk, q.shape[0], q.shape[1], q.shape[2], k.shape[2],
        q.shape[3], softmax_scale, torch.finfo(q.dtype).eps)
    message = (error or "").encode()[:_MESSAGE_BYTES].ljust(_MESSAGE_BYTES, b"\0")
    row = torch.cat((torch.tensor(mine, dtype=torch.float64).view(torch.uint8),
                     torch.frombuffer(bytearray(message), dtype=torch.uint8)))
    # A failing rank's q may be the problem (on the CPU, another device): its row goes where the group's is.
    every = _all_gather(row.to(_collective_device(group, None if error is not None else q)), group).cpu()
    head = 8 * len(mine)  # the settings' float64 bytes, then the message
    failed: Dict[str, List[int]] = {}
    for rank, text in enumerate(every[:, head:].tolist()):
        if any(text):
            failed.setdefault(bytes(text).rstrip(b"\0").decode(errors="replace"), []).append(rank)
    if failed:
        raise ValueError("cp_group " + "; ".join(f"rank{'s' * (len(ranks) > 1)} {', '.join(map(str, ranks))}: {text}"
                                                 for text, ranks in failed.items()))
    settings = every[:, :head].contiguous().view(torch.float64)
    differ = [i for i in range(len(mine)) if not torch.all(settings[:, i] == settings[0, i])]
    if differ:
        table = "; ".join(
            f"{_SETTING_NAMES[i]}: " + ", ".join(f"rank {r}={x:g}" for r, x in enumerate(settings[:, i].tolist()))
            for i in differ
        )
        raise ValueError(f"cp_group ranks disagree on Lighthouse settings or shapes (all must match): {table}")
