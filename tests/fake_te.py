"""A strict stand-in for TransformerEngine (not installable here), written from TE's own source.

:func:`install` (before anything imports ``megatron.core.extensions.transformer_engine``; use a fresh process)
makes ``import transformer_engine`` and every submodule succeed. What Megatron's TE layer spec builds and runs
is modelled by real classes that take exactly TE's parameters (TE v2.9, :data:`SNAPSHOT_TAG` of
tests/te_api/te_api.json; tests/test_te_fake.py holds the signatures to it):

* ``transformer_engine.pytorch.DotProductAttention``: :class:`DotProductAttention`, with TE's forward
  preconditions and, under a context-parallel group, TE's own CP algorithms computed here in plain torch:
  the ``"p2p"`` ring of ``AttnFuncWithCPAndKVP2P``, the KV all-gather of ``AttnFuncWithCPAndKVAllGather`` and
  the head all-to-all of ``AttnFuncWithCPAndQKVOA2A`` (TE's
  ``transformer_engine/pytorch/attention/dot_product_attention/context_parallel.py``). This module imports
  nothing of megatron_lighthouse, so the CP tests compare the package against TE's schedule, not itself.
* ``Linear``, ``LayerNormLinear``, ``LayerNorm``, ``RMSNorm`` (real parameters under TE's names, tensor
  parallel size 1 only), ``_SplitAlongDim``, ``get_cpu_offload_context`` (offloading off) and the FP8 state
  manager (FP8 never on): what building and running a GPTModel from Megatron's TE spec calls.
* every module keeps TE's ``_extra_state`` state-dict entry (:class:`_ExtraState`).

Anything else of TE resolves to a placeholder class: Megatron can import it, subclass it and refer to its
attributes, but calling or instantiating it raises ``NotImplementedError`` naming it, so nothing unmodelled
is ever computed silently. Tensor parallelism, FP8, dropout, packed (THD) sequences, attention bias,
sliding windows and hierarchical ``"a2a+p2p"`` with both levels > 1 raise ``NotImplementedError`` too.

TE has no CP backend for fp32 (FusedAttention, the only CP backend for sbhd, needs fp16/bf16): the fake
refuses it as TE does, unless a test sets :attr:`DotProductAttention.allow_fp32_context_parallel` to check
the CP math at fp32 precision (not TE behaviour; said wherever it is used).
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import io
import math
import pickle
import sys
import types
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F

#: The TE version the fake reports and whose API it takes (``transformer_engine.__version__``).
TE_VERSION = "2.9.0"
#: The entry of tests/te_api/te_api.json the fake's signatures must equal.
SNAPSHOT_TAG = "v2.9"

#: TE's ``AttnMaskTypes`` / ``AttnTypes`` / ``GemmParallelModes`` (transformer_engine/pytorch/constants.py).
ATTN_MASK_TYPES = ("no_mask", "padding", "causal", "padding_causal", "causal_bottom_right",
                   "padding_causal_bottom_right", "arbitrary")
ATTN_TYPES = ("self", "cross")
GEMM_PARALLEL_MODES = ("row", "column", None)
#: TE's message when no attention backend fits the inputs (dot_product_attention.py).
NO_BACKEND = ("No dot product attention backend is available for the provided inputs. Please run with "
              "NVTE_DEBUG=1 NVTE_DEBUG_LEVEL=2 to find out the reasons for disabling all backends.")


def _not_modelled(what: str) -> NotImplementedError:
    return NotImplementedError(f"fake TransformerEngine (tests/fake_te.py): {what} is not modelled")


# ----------------------------------------------------------------------------------------------- extra state
class _ExtraState:
    """TE's checkpoint extra state (``TransformerEngineBaseModule`` and fusible ops): ``get_extra_state`` gives
    an empty uint8 tensor while there is no FP8 metadata, else the pickled metadata dict as a uint8 tensor;
    ``set_extra_state`` takes ``None``, such a tensor, or (TE's deprecated format) an ``io.BytesIO`` holding a
    ``torch.save``d dict. The fake never makes FP8 metadata itself; what is loaded is kept and saved again."""

    _fp8_metadata: Optional[dict] = None

    def get_extra_state(self) -> torch.Tensor:
        if not self._fp8_metadata:
            return torch.empty(0, dtype=torch.uint8)
        return torch.frombuffer(bytearray(pickle.dumps(self._fp8_metadata)), dtype=torch.uint8)

    def set_extra_state(self, state: Union[None, torch.Tensor, io.BytesIO]) -> None:
        if state is None:
            return
        if isinstance(state, torch.Tensor):
            if state.numel() == 0:
                return
            state = pickle.loads(state.detach().cpu().numpy().tobytes())
        elif isinstance(state, io.BytesIO):
            state.seek(0)
            state = torch.load(state, map_location="cpu")
        else:
            raise RuntimeError("Unsupported checkpoint format.")
        if state is None:
            return
        if not isinstance(state, dict):
            raise RuntimeError(f"fake TE: extra state must unpickle to a dict, got {type(state).__name__}")
        self._fp8_metadata = dict(state)


class _BaseModule(_ExtraState, torch.nn.Module):
    """``TransformerEngineBaseModule``: parameters registered with their init function, tensor-parallel group."""

    def __init__(self) -> None:
        torch.nn.Module.__init__(self)
        self.param_init_meta: Dict[str, dict] = {}
        self.tp_group = None
        self.tp_group_initialized = False
        self.fp8 = False

    def register_parameter(self, name: str, param: Optional[torch.nn.Parameter], **kwargs: Any) -> None:
        torch.nn.Module.register_parameter(self, name, param)
        self.param_init_meta[name] = dict(init_fn=kwargs.get("init_fn"),
                                          get_rng_state_tracker=kwargs.get("get_rng_state_tracker"))

    def set_tensor_parallel_group(self, tp_group: Optional[Any]) -> None:
        self.tp_group = tp_group
        self.tp_group_initialized = True

    def reset_parameters(self, defer_init: Optional[bool] = False) -> None:
        """Each parameter through its init function (TE's default: normal, std 0.023), under the RNG
        tracker's fork when one was given."""
        if defer_init:
            return
        for name, param in self.named_parameters(recurse=False):
            meta = self.param_init_meta.get(name, {})
            init_fn = meta.get("init_fn") or (lambda w: torch.nn.init.normal_(w, mean=0.0, std=0.023))
            tracker = meta.get("get_rng_state_tracker")
            name_ = getattr(self, "rng_tracker_name", None)
            context = (contextlib.nullcontext() if tracker is None
                       else tracker().fork(name_) if name_ else tracker().fork())
            with context, torch.no_grad():
                init_fn(param)


def _tp_size(tp_group: Optional[Any], tp_size: int) -> int:
    size = dist.get_world_size(tp_group) if tp_group is not None else tp_size
    if size != 1:
        raise _not_modelled(f"tensor parallelism (tp size {size})")
    return size


def _mark_parallel(param: torch.Tensor, parallel: bool, dim: int) -> None:
    """TE's ``set_tensor_model_parallel_attributes`` (the attributes Megatron's optimizer and DDP read)."""
    param.tensor_model_parallel = parallel
    param.partition_dim = dim
    param.partition_stride = 1


# --------------------------------------------------------------------------------------------------- linear
class _GemmModule(_BaseModule):
    """What TE's ``Linear`` and ``LayerNormLinear`` share: the GEMM's ``weight`` ``[out_features, in_features]``
    (``init_method``) and ``bias`` ``[out_features]`` (zeros), and the forward signature. ``y = x W^T (+ b)`` in
    ``x``'s dtype (TE casts its weights to the activation dtype); with ``return_bias`` the bias is returned."""

    def _init_gemm(self, in_features: int, out_features: int, tp_group, tp_size: int, get_rng_state_tracker,
                   init_method, bias: bool, return_bias: bool, params_dtype, parallel_mode, parameters_split, device,
                   fuse_wgrad_accumulation: bool, delay_wgrad_compute: bool, sequence_parallel: bool,
                   ub_name: Optional[str], symmetric_ar_type: Optional[str], name: Optional[str]) -> None:
        if parallel_mode not in GEMM_PARALLEL_MODES:
            raise AssertionError(f"parallel_mode {parallel_mode} not supported")
        if parameters_split is not None:
            raise _not_modelled("parameters_split")
        if fuse_wgrad_accumulation:
            raise _not_modelled("fuse_wgrad_accumulation (main_grad buffers)")
        if delay_wgrad_compute:
            raise _not_modelled("delay_wgrad_compute")
        params_dtype = torch.get_default_dtype() if params_dtype is None else params_dtype
        self.tp_size = _tp_size(tp_group, tp_size)
        self.set_tensor_parallel_group(tp_group)
        self.in_features, self.out_features = in_features, out_features
        self.use_bias, self.return_bias = bias, return_bias
        self.apply_bias = bias and not return_bias
        self.parallel_mode = parallel_mode
        self.sequence_parallel = self.tp_size > 1 and sequence_parallel
        self.get_rng_state_tracker = get_rng_state_tracker
        self.ub_name, self.symmetric_ar_type, self.name = ub_name, symmetric_ar_type, name
        self.weight_names, self.bias_names = ["weight"], ["bias"]
        self.register_parameter(
            "weight", torch.nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=params_dtype)),
            init_fn=init_method, get_rng_state_tracker=get_rng_state_tracker)
        if bias:
            self.register_parameter(
                "bias", torch.nn.Parameter(torch.empty(out_features, device=device, dtype=params_dtype)),
                init_fn=torch.nn.init.zeros_)
        else:
            self.bias = torch.Tensor().to(dtype=params_dtype, device=device)
        self.reset_parameters(defer_init=device == "meta")

    def reset_parameters(self, defer_init: Optional[bool] = False) -> None:
        super().reset_parameters(defer_init)
        if defer_init:
            return
        _mark_parallel(self.weight, True, 1 if self.parallel_mode == "row" else 0)
        if self.use_bias:
            if self.parallel_mode == "row":
                self.bias.sequence_parallel = self.sequence_parallel
            elif self.parallel_mode == "column":
                _mark_parallel(self.bias, True, 0)

    def forward(
        self,
        inp: torch.Tensor,
        is_first_microbatch: Optional[bool] = None,
        fp8_output: Optional[bool] = False,
        fp8_grad: Optional[bool] = False,
    ) -> Union[torch.Tensor, Tuple[torch.Tensor, ...]]:
        """``inp`` ``[..., in_features]`` -> ``[..., out_features]`` in ``inp``'s dtype (see the subclass for
        what else is returned)."""
        if fp8_output or fp8_grad:
            raise _not_modelled("FP8 output / gradients")
        return self._compute(inp)

    def _gemm(self, x: torch.Tensor):
        """The GEMM, bias added, or returned (``(out, bias)``) with ``return_bias``."""
        if x.shape[-1] != self.in_features:
            raise AssertionError(f"fake TE: input has {x.shape[-1]} features, the layer {self.in_features}")
        bias = self.bias.to(x.dtype) if self.use_bias else None
        out = F.linear(x, self.weight.to(x.dtype), bias if self.apply_bias else None)
        if self.return_bias:
            return out, bias if bias is not None else self.bias
        return out


class Linear(_GemmModule):
    """``te.pytorch.Linear``: ``out`` (``(out, bias)`` with ``return_bias``)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        sequence_parallel: bool = False,
        fuse_wgrad_accumulation: bool = False,
        tp_group: Optional[Any] = None,
        tp_size: int = 1,
        get_rng_state_tracker: Optional[Callable] = None,
        rng_tracker_name: Optional[str] = None,
        init_method: Optional[Callable] = None,
        bias: bool = True,
        return_bias: bool = False,
        params_dtype: Optional[torch.dtype] = None,
        parallel_mode: Optional[str] = None,
        parameters_split: Optional[Union[Tuple[str, ...], Dict[str, int]]] = None,
        device: Union[torch.device, str] = "cuda",
        ub_overlap_ag: bool = False,
        ub_overlap_rs: bool = False,
        ub_overlap_rs_dgrad: bool = False,
        ub_bulk_dgrad: bool = False,
        ub_bulk_wgrad: bool = False,
        ub_name: Optional[str] = None,
        delay_wgrad_compute: bool = False,
        symmetric_ar_type: Optional[str] = None,
        save_original_input: bool = False,
        name: Optional[str] = None,
    ) -> None:
        super().__init__()
        self.rng_tracker_name, self.save_original_input = rng_tracker_name, save_original_input
        self._init_gemm(in_features, out_features, tp_group, tp_size, get_rng_state_tracker, init_method, bias,
                        return_bias, params_dtype, parallel_mode, parameters_split, device, fuse_wgrad_accumulation,
                        delay_wgrad_compute, sequence_parallel, ub_name, symmetric_ar_type, name)

    def _compute(self, inp: torch.Tensor):
        return self._gemm(inp)


def _normalize(x: torch.Tensor, normalization: str, weight: torch.Tensor, bias: Optional[torch.Tensor],
               eps: float, zero_centered_gamma: bool) -> torch.Tensor:
    """LayerNorm / RMSNorm over the last dimension, computed in fp32, returned in ``x``'s dtype."""
    x32 = x.float()
    gamma = weight.float() + 1.0 if zero_centered_gamma else weight.float()
    if normalization == "RMSNorm":
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps) * gamma
    else:
        y = F.layer_norm(x32, x32.shape[-1:], gamma, bias.float(), eps)
    return y.to(x.dtype)


class LayerNormLinear(_GemmModule):
    """``te.pytorch.LayerNormLinear``: LayerNorm / RMSNorm (``layer_norm_weight``, ``layer_norm_bias`` for
    LayerNorm) then the GEMM: ``out`` (``, bias`` with ``return_bias``; ``, ln_out`` with
    ``return_layernorm_output``)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        eps: float = 1e-5,
        sequence_parallel: bool = False,
        fuse_wgrad_accumulation: bool = False,
        tp_group: Optional[Any] = None,
        tp_size: int = 1,
        get_rng_state_tracker: Optional[Callable] = None,
        init_method: Optional[Callable] = None,
        bias: bool = True,
        normalization: str = "LayerNorm",
        return_bias: bool = False,
        params_dtype: Optional[torch.dtype] = None,
        parallel_mode: Optional[str] = None,
        return_layernorm_output: bool = False,
        return_layernorm_output_gathered: bool = False,
        parameters_split: Optional[Union[Tuple[str, ...], Dict[str, int]]] = None,
        zero_centered_gamma: bool = False,
        device: Union[torch.device, str] = "cuda",
        ub_overlap_ag: bool = False,
        ub_overlap_rs: bool = False,
        ub_overlap_rs_dgrad: bool = False,
        ub_bulk_wgrad: bool = False,
        ub_bulk_dgrad: bool = False,
        ub_name: Optional[str] = None,
        delay_wgrad_compute: bool = False,
        symmetric_ar_type: Optional[str] = None,
        name: str = None,
    ) -> None:
        super().__init__()
        if normalization not in ("LayerNorm", "RMSNorm"):
            raise AssertionError("Unsupported normalization type!")
        dtype = torch.get_default_dtype() if params_dtype is None else params_dtype
        self.normalization, self.eps, self.zero_centered_gamma = normalization, eps, zero_centered_gamma
        self.return_layernorm_output = return_layernorm_output
        self.return_layernorm_output_gathered = return_layernorm_output_gathered if return_layernorm_output else False
        self.register_parameter(
            "layer_norm_weight", torch.nn.Parameter(torch.empty(in_features, device=device, dtype=dtype)),
            init_fn=torch.nn.init.zeros_ if zero_centered_gamma else torch.nn.init.ones_)
        if normalization != "RMSNorm":
            self.register_parameter(
                "layer_norm_bias", torch.nn.Parameter(torch.empty(in_features, device=device, dtype=dtype)),
                init_fn=torch.nn.init.zeros_)
        else:
            self.layer_norm_bias = None
        self._init_gemm(in_features, out_features, tp_group, tp_size, get_rng_state_tracker, init_method, bias,
                        return_bias, params_dtype, parallel_mode, parameters_split, device, fuse_wgrad_accumulation,
                        delay_wgrad_compute, sequence_parallel, ub_name, symmetric_ar_type, name)

    def _compute(self, inp: torch.Tensor):
        ln_out = _normalize(inp, self.normalization, self.layer_norm_weight, self.layer_norm_bias, self.eps,
                            self.zero_centered_gamma)
        out = self._gemm(ln_out)
        if not self.return_layernorm_output:
            return out
        return (*out, ln_out) if self.return_bias else (out, ln_out)


# ---------------------------------------------------------------------------------------------------- norms
class _NormOp(_ExtraState, torch.nn.Module):
    """TE's fusible ``ops.LayerNorm`` / ``ops.RMSNorm`` (one signature): ``weight`` (ones, zeros when
    zero-centred) and, for LayerNorm, ``bias``; normalisation over the last dimension."""

    normalization = "LayerNorm"

    def __init__(
        self,
        normalized_shape,
        *,
        eps: float = 1e-5,
        device=None,
        dtype: Optional[torch.dtype] = None,
        zero_centered_gamma: bool = False,
        sm_margin=0,
    ) -> None:
        torch.nn.Module.__init__(self)
        shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
        if len(shape) != 1:
            raise _not_modelled(f"normalisation over {len(shape)} dimensions")
        device = "cuda" if device is None else device  # TE's default device
        dtype = torch.get_default_dtype() if dtype is None else dtype
        self.eps, self.zero_centered_gamma, self.sm_margin = eps, zero_centered_gamma, sm_margin
        fill = 0.0 if zero_centered_gamma else 1.0
        self.weight = torch.nn.Parameter(torch.full(shape, fill, device=device, dtype=dtype))
        if self.normalization == "LayerNorm":
            self.bias = torch.nn.Parameter(torch.zeros(shape, device=device, dtype=dtype))
        else:
            self.bias = None

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 - TE's name
        return _normalize(input, self.normalization, self.weight, self.bias, self.eps, self.zero_centered_gamma)


class _LayerNormOp(_NormOp):
    """``te.pytorch.ops.LayerNorm``."""


class _RMSNormOp(_NormOp):
    """``te.pytorch.ops.RMSNorm``."""

    normalization = "RMSNorm"


class _NormModule:
    """TE's ``LayerNorm`` / ``RMSNorm`` modules (one signature): the deprecated ``hidden_size`` /
    ``params_dtype`` handled as TE does, ``**kwargs`` handed to the operation, which takes only its own keywords;
    ``sequence_parallel`` set on the parameters (TE's Megatron integration)."""

    def __init__(
        self,
        normalized_shape=None,
        eps: float = 1e-5,
        sequence_parallel: Optional[bool] = None,
        params_dtype: Optional[torch.dtype] = None,
        zero_centered_gamma: bool = False,
        hidden_size: Optional[int] = None,
        **kwargs,
    ) -> None:
        if normalized_shape is None:
            if hidden_size is None:
                raise RuntimeError("Neither `normalized_shape` nor `hidden_size` (deprecated) args are provided")
            warnings.warn("`hidden_size` arg has been renamed to `normalized_shape` for compatibility with "
                          "`torch.nn.LayerNorm`.", DeprecationWarning, stacklevel=2)
            normalized_shape = hidden_size
        elif hidden_size is not None:
            raise RuntimeError("Both `normalized_shape` and `hidden_size` (deprecated) args are provided")
        if params_dtype is not None:
            if "dtype" in kwargs:
                raise RuntimeError("Both `dtype` and `params_dtype` (deprecated) kwargs are provided")
            kwargs["dtype"] = params_dtype
        super().__init__(normalized_shape, eps=eps, zero_centered_gamma=zero_centered_gamma, **kwargs)
        self.sequence_parallel = sequence_parallel
        if sequence_parallel is not None:
            for param in self.parameters():
                param.sequence_parallel = sequence_parallel


class LayerNorm(_NormModule, _LayerNormOp):
    """``te.pytorch.LayerNorm``."""


class RMSNorm(_NormModule, _RMSNormOp):
    """``te.pytorch.RMSNorm``."""


# ------------------------------------------------------------------------------------ attention arithmetic
def _partial_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, mask: Optional[str]
                       ) -> Tuple[torch.Tensor, torch.Tensor]:
    """One attention tile as TE's kernels return it: ``q`` ``[B, H, Sq, D]``, ``k``/``v`` ``[B, H, Sk, D]`` ->
    ``(out [B, H, Sq, D] in q's dtype, softmax log-sum-exp [B, H, Sq] fp32)``, scores in fp32. ``mask``:
    ``None``, ``"causal"`` (top-left: query ``i`` sees keys ``<= i``) or ``"causal_bottom_right"`` (query
    ``i`` sees keys ``<= i + Sk - Sq``)."""
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if mask is not None:
        sq, sk = scores.shape[-2:]
        shift = 0 if mask == "causal" else sk - sq
        allowed = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(shift)
        scores = scores.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.matmul(torch.exp(scores - lse.unsqueeze(-1)), v.float())
    return out.to(q.dtype), lse


def _merge_partials(parts: Sequence[Tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Softmax-exact merge of partial results ``(out, lse)`` over disjoint key sets of the same queries:
    ``sum_i exp(lse_i - logsumexp_i lse_i) * out_i``, in fp32."""
    lse = torch.logsumexp(torch.stack([part_lse for _, part_lse in parts]), dim=0)
    return sum(out.float() * torch.exp(part_lse - lse).unsqueeze(-1) for out, part_lse in parts)


class _RingPass(torch.autograd.Function):
    """``x`` sent to ``send_to`` while the same-shaped tensor of ``recv_from`` arrives (global ranks);
    the gradient travels the other way."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, send_to: int, recv_from: int, group) -> torch.Tensor:
        ctx.peers, ctx.group = (send_to, recv_from), group
        return _exchange(x, send_to, recv_from, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        send_to, recv_from = ctx.peers
        return _exchange(grad, recv_from, send_to, ctx.group), None, None, None


def _exchange(x: torch.Tensor, send_to: int, recv_from: int, group) -> torch.Tensor:
    x = x.contiguous()
    out = torch.empty_like(x)
    ops = [dist.P2POp(dist.isend, x, send_to, group), dist.P2POp(dist.irecv, out, recv_from, group)]
    for req in dist.batch_isend_irecv(ops):
        req.wait()
    return out


class _AllGatherSeq(torch.autograd.Function):
    """``[S, ...]`` of every rank of ``group`` -> ``[W * S, ...]`` in group-rank order; the gradient is summed
    over the ranks and each rank keeps its slice (TE's ``gather_along_first_dim`` / reduce-scatter)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        world = dist.get_world_size(group)
        out = x.new_empty((world * x.shape[0], *x.shape[1:]))
        dist.all_gather_into_tensor(out, x.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        total = grad.contiguous().clone()
        dist.all_reduce(total, group=ctx.group)  # gloo has no reduce-scatter in every torch version
        return total.chunk(dist.get_world_size(ctx.group))[dist.get_rank(ctx.group)], None


class _AllToAll(torch.autograd.Function):
    """``x`` ``[W, ...]``: slice ``j`` goes to rank ``j``; the result's slice ``j`` came from rank ``j``. Its
    own inverse, so the gradient takes the same exchange."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        out = torch.empty_like(x.contiguous())
        dist.all_to_all_single(out, x.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out = torch.empty_like(grad.contiguous())
        dist.all_to_all_single(out, grad.contiguous(), group=ctx.group)
        return out, None


def _to_bhsd(x: torch.Tensor, heads: int) -> torch.Tensor:
    """sbhd ``[S, B, G, D]`` -> ``[B, heads, S, D]`` (kv heads repeated for their query groups)."""
    x = x.permute(1, 2, 0, 3)
    return x if x.shape[1] == heads else x.repeat_interleave(heads // x.shape[1], dim=1)


def _p2p_causal(q, k, v, scale: float, group, global_ranks: Sequence[int]) -> torch.Tensor:
    """``AttnFuncWithCPAndKVP2P`` for causal sbhd on the load-balanced layout: ``q`` ``[B, H, 2c, D]`` holds
    chunks ``r`` and ``2W-1-r``, ``k``/``v`` likewise. ``W`` steps; before step ``i`` the KV block is passed to
    rank ``r+1`` and taken from ``r-1`` (TE's ``send_dst`` / ``recv_src`` over ``cp_global_ranks``), so step
    ``i`` holds rank ``(r-i) mod W``'s KV. Step 0 ("diagonal"): causal over the 2 local chunks. ``1 <= i <= r``
    ("lower-triangle"): all local queries against the first half of that KV, no mask. ``i > r``
    ("upper-triangle"): the second half of the local queries against all of that KV, no mask. The partial
    results of each query are merged by their log-sum-exp."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    half = q.shape[2] // 2
    first, second = [], []  # partial (out, lse) of the first and second local chunk
    kv = torch.stack((k, v))
    for step in range(world):
        if step > 0:
            kv = _RingPass.apply(kv, global_ranks[(rank + 1) % world], global_ranks[(rank - 1) % world], group)
        k_i, v_i = kv[0], kv[1]
        if step == 0:
            out, lse = _partial_attention(q, k_i, v_i, scale, "causal")
            first.append((out[:, :, :half], lse[:, :, :half]))
            second.append((out[:, :, half:], lse[:, :, half:]))
        elif step <= rank:
            out, lse = _partial_attention(q, k_i[:, :, :half], v_i[:, :, :half], scale, None)
            first.append((out[:, :, :half], lse[:, :, :half]))
            second.append((out[:, :, half:], lse[:, :, half:]))
        else:
            second.append(_partial_attention(q[:, :, half:], k_i, v_i, scale, None))
    return torch.cat((_merge_partials(first), _merge_partials(second)), dim=2).to(q.dtype)


def _natural_chunk_order(x: torch.Tensor, world: int) -> torch.Tensor:
    """``[W * 2c, ...]`` of the ranks' shards in rank order (rank ``j``: chunks ``j``, ``2W-1-j``) -> the
    ``2W`` chunks in sequence order (TE's ``get_seq_chunk_ids_for_reordering_before_attn``)."""
    chunks = x.chunk(2 * world)  # shard j = chunks 2j (global j) and 2j+1 (global 2W-1-j)
    order = [2 * g if g < world else 2 * (2 * world - 1 - g) + 1 for g in range(2 * world)]
    return torch.cat([chunks[i] for i in order])


def _rank_chunk_order(x: torch.Tensor, world: int) -> torch.Tensor:
    """Inverse of :func:`_natural_chunk_order` (TE's ``get_seq_chunk_ids_for_reordering_after_attn``)."""
    chunks = x.chunk(2 * world)
    return torch.cat([chunks[g] for j in range(world) for g in (j, 2 * world - 1 - j)])


def _all_gather_causal(q, k, v, scale: float, group) -> torch.Tensor:
    """``AttnFuncWithCPAndKVAllGather``: all-gather K/V along the sequence, put the chunks in sequence order,
    then each local query chunk (global chunk ``j`` of ``2W``) attends to keys ``[0, (j+1) c)`` with a
    bottom-right causal mask. Tensors ``[B, H, S_local, D]``."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    kv = torch.stack((k, v)).permute(3, 0, 1, 2, 4)  # [S_local, 2, B, H, D]: sequence first for the gather
    kv = _natural_chunk_order(_AllGatherSeq.apply(kv, group), world).permute(1, 2, 3, 0, 4)  # [2, B, H, S, D]
    c = q.shape[2] // 2
    outs = []
    for local, chunk_id in enumerate((rank, 2 * world - 1 - rank)):
        end = (chunk_id + 1) * c
        out, _ = _partial_attention(q[:, :, local * c:(local + 1) * c], kv[0, :, :, :end], kv[1, :, :, :end],
                                    scale, "causal_bottom_right")
        outs.append(out)
    return torch.cat(outs, dim=2)


def _a2a_causal(query, key, value, scale: float, group) -> torch.Tensor:
    """``AttnFuncWithCPAndQKVOA2A`` (Ulysses): an all-to-all turns sbhd ``[S_local, B, H, D]`` (sequence
    sharded) into ``[W * S_local, B, H/W, D]`` (heads sharded, full sequence in order), causal attention runs
    there, and the reverse all-to-all brings the output back to ``[S_local, B, H, D]``."""
    world = dist.get_world_size(group)

    def scatter_heads(x: torch.Tensor) -> torch.Tensor:
        s, b, h, d = x.shape
        x = x.reshape(s, b, world, h // world, d).movedim(2, 0)  # [W, S_local, B, H/W, D]: slice j -> rank j
        x = _AllToAll.apply(x, group)  # slice j: rank j's shard of my heads
        return _natural_chunk_order(x.reshape(world * s, b, h // world, d), world)

    q, k, v = (scatter_heads(x) for x in (query, key, value))
    h_local = q.shape[2]
    out, _ = _partial_attention(_to_bhsd(q, h_local), _to_bhsd(k, h_local), _to_bhsd(v, h_local), scale, "causal")
    out = _rank_chunk_order(out.permute(2, 0, 1, 3), world)  # [W * S_local, B, H/W, D], rank j's shard j-th
    s_local = out.shape[0] // world
    out = _AllToAll.apply(out.reshape(world, s_local, *out.shape[1:]), group)  # slice j: my tokens, heads of j
    return out.movedim(0, 2).reshape(s_local, out.shape[2], world * h_local, out.shape[-1])


# ----------------------------------------------------------------------------------------- DotProductAttention
def _group_size(group) -> int:
    if group is None:
        return 1
    if isinstance(group, list):
        return math.prod(dist.get_world_size(g) for g in group)
    return dist.get_world_size(group)


class DotProductAttention(_BaseModule):
    """``te.pytorch.DotProductAttention``: sbhd ``query`` ``[S, B, H, D]``, ``key``/``value``
    ``[S, B, G, D]`` (``G = num_gqa_groups // tp_size``, ``D = kv_channels``) -> ``[S, B, H*D]``; causal or
    no mask; under a CP group, each rank's ``S`` is its load-balanced shard and the CP algorithm of
    ``cp_comm_type`` runs (see the module docstring).

    :attr:`calls` records ``("init", arguments)``, ``("set_context_parallel_group", arguments)`` and
    ``("forward", info)`` in call order, for the tests to read.
    """

    calls: List[tuple] = []
    #: Not TE behaviour: lets a CPU test run the CP math in fp32 (TE has no fp32 backend under CP).
    allow_fp32_context_parallel = False

    def __init__(
        self,
        num_attention_heads: int,
        kv_channels: Union[int, Tuple[int, int]],
        num_gqa_groups: Optional[int] = None,
        attention_dropout: float = 0.0,
        qkv_format: str = "sbhd",
        attn_mask_type: str = "causal",
        window_size: Optional[Tuple[int, int]] = None,
        sequence_parallel: bool = False,
        tp_size: int = 1,
        get_rng_state_tracker: Optional[Callable] = None,
        tp_group: Optional[Any] = None,
        layer_number: Optional[int] = None,
        attention_type: str = "self",
        cp_group: Optional[Union[Any, List[Any]]] = None,
        cp_global_ranks: List[int] = None,
        cp_stream: Any = None,
        cp_comm_type: str = "p2p",
        softmax_scale: Optional[float] = None,
        softmax_type: str = "vanilla",
        return_max_logit: Optional[bool] = False,
    ) -> None:
        arguments = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        super().__init__()
        DotProductAttention.calls.append(("init", arguments))
        self.qkv_format = qkv_format
        attn_mask_type = attn_mask_type.replace(",", "_")
        self.attn_mask_type = "padding_causal" if attn_mask_type == "causal_padding" else attn_mask_type
        if window_size is not None and tuple(window_size) not in ((-1, 0), (-1, -1)):
            raise _not_modelled(f"sliding-window attention (window_size={window_size})")
        self.window_size = window_size
        if tp_group is None:
            self.tp_size = tp_size
        else:
            self.tp_size = dist.get_world_size(tp_group)
        self.set_tensor_parallel_group(tp_group)
        self.num_attention_heads = num_attention_heads
        self.layer_number = 1 if layer_number is None else layer_number
        self.cp_group, self.cp_global_ranks, self.cp_stream = cp_group, cp_global_ranks, cp_stream
        self.cp_comm_type = cp_comm_type
        self.hidden_size_per_attention_head_k = kv_channels if isinstance(kv_channels, int) else kv_channels[0]
        self.hidden_size_per_attention_head_v = kv_channels if isinstance(kv_channels, int) else kv_channels[1]
        self.num_gqa_groups = num_attention_heads if num_gqa_groups is None else num_gqa_groups
        self.num_gqa_groups_per_partition = int(self.num_gqa_groups // self.tp_size)
        assert num_attention_heads % self.num_gqa_groups == 0, (
            "The number of attention heads must be divisible by the number of GQA groups!")
        assert attention_type in ATTN_TYPES, f"attention_type {attention_type} not supported"
        self.attention_type = attention_type
        self.attention_dropout = attention_dropout
        if softmax_type != "vanilla":
            raise _not_modelled(f"softmax_type={softmax_type!r}")
        if return_max_logit:
            raise _not_modelled("return_max_logit")
        self.softmax_type, self.return_max_logit = softmax_type, return_max_logit
        self.softmax_scale = (1.0 / math.sqrt(self.hidden_size_per_attention_head_k) if softmax_scale is None
                              else softmax_scale)

    def set_context_parallel_group(
        self,
        cp_group: Union[Any, List[Any], None],
        cp_global_ranks: List[int],
        cp_stream: Any,
        cp_comm_type: str = "p2p",
    ) -> None:
        DotProductAttention.calls.append(("set_context_parallel_group",
                                          dict(cp_group=cp_group, cp_global_ranks=cp_global_ranks,
                                               cp_stream=cp_stream, cp_comm_type=cp_comm_type)))
        self.cp_group, self.cp_global_ranks, self.cp_stream = cp_group, cp_global_ranks, cp_stream
        self.cp_comm_type = cp_comm_type

    def forward(
        self,
        query_layer: torch.Tensor,
        key_layer: torch.Tensor,
        value_layer: torch.Tensor,
        attention_mask: Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]] = None,
        qkv_format: str = None,
        cu_seqlens_q: torch.Tensor = None,
        cu_seqlens_kv: torch.Tensor = None,
        cu_seqlens_q_padded: torch.Tensor = None,
        cu_seqlens_kv_padded: torch.Tensor = None,
        max_seqlen_q: int = None,
        max_seqlen_kv: int = None,
        attn_mask_type: Optional[str] = None,
        window_size: Optional[Tuple[int, int]] = None,
        checkpoint_core_attention: bool = False,
        core_attention_bias_type: str = "no_bias",
        core_attention_bias: Optional[torch.Tensor] = None,
        alibi_slopes: Optional[torch.Tensor] = None,
        fast_zero_fill: bool = True,
        inference_params: Optional[Any] = None,
        pad_between_seqs: Optional[bool] = None,
        fp8_output: Optional[bool] = False,
    ) -> torch.Tensor:
        """sbhd q ``[S, B, H, D]``, k/v ``[S, B, G, D]`` (one dtype) -> ``[S, B, H*D]`` in that dtype."""
        query, key, value = query_layer, key_layer, value_layer
        DotProductAttention.calls.append(("forward", dict(
            query=tuple(query.shape), key=tuple(key.shape), value=tuple(value.shape), dtype=query.dtype,
            attention_mask=attention_mask, qkv_format=qkv_format, attn_mask_type=attn_mask_type,
            cp_group=self.cp_group, cp_comm_type=self.cp_comm_type)))
        for name, value_ in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_kv", cu_seqlens_kv),
                             ("cu_seqlens_q_padded", cu_seqlens_q_padded),
                             ("cu_seqlens_kv_padded", cu_seqlens_kv_padded),
                             ("core_attention_bias", core_attention_bias), ("alibi_slopes", alibi_slopes),
                             ("inference_params", inference_params)):
            if value_ is not None:
                raise _not_modelled(f"forward({name}=...)")
        if core_attention_bias_type != "no_bias" or pad_between_seqs or fp8_output:
            raise _not_modelled("attention bias, padding between sequences and FP8 output")
        # TE's checks on q/k/v (DotProductAttention.forward)
        assert query.dtype == key.dtype and query.dtype == value.dtype, (
            "Queries, keys and values must have the same data type!")
        assert key.shape[:-1] == value.shape[:-1], (
            "Keys and values must have the same batch size, sequence length and number of heads!")
        assert query.shape[-1] == key.shape[-1], "Queries and keys must have the same head dimension!"
        assert query.shape[-1] == self.hidden_size_per_attention_head_k, (
            f"Keys have head_dim = {query.shape[-1]}, but expected head_dim = "
            f"{self.hidden_size_per_attention_head_k}!")
        assert value.shape[-1] == self.hidden_size_per_attention_head_v, (
            f"Values have head_dim = {value.shape[-1]}, but expected head_dim = "
            f"{self.hidden_size_per_attention_head_v}!")
        assert key.shape[-2] == self.num_gqa_groups_per_partition, (
            f"Keys and values must have num_gqa_group = {self.num_gqa_groups_per_partition} heads! "
            f"Found {key.shape[-2]}.")
        if attn_mask_type is None:
            attn_mask_type = self.attn_mask_type
        else:
            attn_mask_type = attn_mask_type.replace(",", "_")
            attn_mask_type = "padding_causal" if attn_mask_type == "causal_padding" else attn_mask_type
        assert attn_mask_type in ATTN_MASK_TYPES, f"Attention mask type {attn_mask_type} is not supported!"
        qkv_format = self.qkv_format if qkv_format is None else qkv_format
        assert qkv_format in ("sbhd", "bshd", "thd"), (
            "DotProductAttention only supports qkv_format = {'sbhd', 'bshd', 'thd'}!")
        if qkv_format != "sbhd" or attn_mask_type not in ("causal", "no_mask"):
            raise _not_modelled(f"qkv_format={qkv_format!r} with attn_mask_type={attn_mask_type!r} (sbhd causal "
                                f"/ no_mask only)")
        assert all(x.dim() == 4 for x in (query, key, value)), (
            f"Queries, keys and values must be 4D tensors when qkv_format={qkv_format!r}!")
        window = self.window_size if window_size is None else window_size
        if window is not None and tuple(window) not in ((-1, 0), (-1, -1)):
            raise _not_modelled(f"sliding-window attention (window_size={window})")
        if self.attention_dropout > 0.0 and self.training:
            raise _not_modelled(f"attention dropout ({self.attention_dropout})")
        heads = query.shape[-2]
        if heads % key.shape[-2] != 0:
            raise ValueError(NO_BACKEND + f" (fake TE: {heads} query heads are not a multiple of {key.shape[-2]} "
                                          f"kv heads)")
        for given, actual, name in ((max_seqlen_q, query.shape[0], "max_seqlen_q"),
                                    (max_seqlen_kv, key.shape[0], "max_seqlen_kv")):
            if given is not None and given != actual:
                raise _not_modelled(f"{name}={given} other than the sequence length {actual} in sbhd")
        causal = attn_mask_type == "causal"
        s, b = query.shape[:2]
        if _group_size(self.cp_group) > 1:
            out = self._context_parallel(query, key, value, causal)
        else:
            out, _ = _partial_attention(_to_bhsd(query, heads), _to_bhsd(key, heads), _to_bhsd(value, heads),
                                        self.softmax_scale, "causal" if causal else None)
            out = out.permute(2, 0, 1, 3)
        return out.reshape(s, b, heads * value.shape[-1])

    def _context_parallel(self, query, key, value, causal: bool) -> torch.Tensor:
        """TE's backend filter under CP, then ``attn_forward_func_with_cp``'s checks and dispatch; sbhd
        ``[S_local, B, H, D]`` in and out."""
        if query.dtype not in (torch.float16, torch.bfloat16) and not self.allow_fp32_context_parallel:
            raise ValueError(NO_BACKEND + f" (fake TE: under context parallelism only FusedAttention runs sbhd, "
                                          f"and it needs fp16/bf16 inputs, got {query.dtype})")
        if causal and query.shape[0] != key.shape[0]:
            raise ValueError(NO_BACKEND + " (fake TE: causal cross-attention under context parallelism)")
        if not causal:
            raise _not_modelled("context parallelism without a causal mask")
        group, comm = self.cp_group, self.cp_comm_type
        if comm == "a2a+p2p":
            assert isinstance(group, list) and len(group) == 2, (
                "CP implementation a2a+p2p requires cp_group = [a2a_cp_group, p2p_cp_group]!")
            if dist.get_world_size(group[0]) == 1:
                group, comm = group[1], "p2p"
            elif dist.get_world_size(group[1]) == 1:
                group, comm = group[0], "a2a"
            else:
                raise _not_modelled("hierarchical a2a+p2p with both levels larger than 1")
        else:
            assert isinstance(group, dist.ProcessGroup), (
                f"cp_group must be {dist.ProcessGroup} type for cp_comm_type={comm!r}!")
        if query.shape[0] % 2 != 0 or key.shape[0] % 2 != 0:
            raise AssertionError("Sequence length per GPU needs to be divisible by 2!")
        heads = query.shape[-2]
        scale = self.softmax_scale
        if comm == "p2p":
            if self.cp_global_ranks is None or len(self.cp_global_ranks) != dist.get_world_size(group):
                raise AssertionError(f"cp_global_ranks={self.cp_global_ranks} for a CP group of "
                                     f"{dist.get_world_size(group)} ranks")
            q, k, v = (_to_bhsd(x, heads) for x in (query, key, value))
            return _p2p_causal(q, k, v, scale, group, self.cp_global_ranks).permute(2, 0, 1, 3)
        if comm == "all_gather":
            assert query.shape[-1] % 8 == 0, "Hidden size per attention head should be multiple of 8!"
            q, k, v = (_to_bhsd(x, heads) for x in (query, key, value))
            return _all_gather_causal(q, k, v, scale, group).permute(2, 0, 1, 3)
        if comm == "a2a":
            assert query.shape[-1] % 8 == 0, "Hidden size per attention head should be multiple of 8!"
            world = dist.get_world_size(group)
            assert heads % world == 0 and key.shape[-2] % world == 0, (
                "The number of attention heads needs to be divisible by CP size!")
            return _a2a_causal(query, key, value, scale, group)
        raise ValueError(f"Unsupported communication type: {comm}!")


# ----------------------------------------------------------------------------------- small TE utilities
class _SplitAlongDim:
    """``transformer_engine.pytorch.attention._SplitAlongDim``: ``apply(x, dim, sizes)`` -> views of ``x``."""

    @staticmethod
    def apply(x: torch.Tensor, split_dim: int, split_size_or_sections) -> Tuple[torch.Tensor, ...]:
        return torch.split(x, split_size_or_sections, dim=split_dim)


class FP8GlobalStateManager:
    """``transformer_engine.pytorch.fp8.FP8GlobalStateManager`` with FP8 never enabled."""

    @staticmethod
    def is_fp8_enabled() -> bool:
        return False

    @staticmethod
    def is_first_fp8_module() -> bool:
        return False

    @staticmethod
    def with_fp8_parameters() -> bool:
        return False


def fp8_autocast(enabled: bool = True, **kwargs: Any):
    """``fp8_autocast``: only ``enabled=False`` is modelled (a no-op context)."""
    if enabled:
        raise _not_modelled("fp8_autocast(enabled=True)")
    return contextlib.nullcontext()


def fp8_model_init(enabled: bool = True, **kwargs: Any):
    """``fp8_model_init``: only ``enabled=False`` is modelled (a no-op context)."""
    if enabled:
        raise _not_modelled("fp8_model_init(enabled=True)")
    return contextlib.nullcontext()


def get_cpu_offload_context(
    enabled: bool = False,
    num_layers: int = 1,
    model_layers: int = 1,
    offload_activations: bool = True,
    offload_weights: bool = False,
    double_buffering: bool = False,
):
    """``transformer_engine.pytorch.cpu_offload.get_cpu_offload_context``: off, TE returns a null context and
    the per-layer commit function (which Megatron calls only with offloading on; here it refuses)."""
    if not offload_weights and not offload_activations:
        raise ValueError("CPU Offloading is enabled while it is not mentioned what to offload (weights/activations)")
    if enabled:
        raise _not_modelled("CPU offloading")

    def group_prefetch_offload_commit_async(tensor):
        raise _not_modelled("the CPU-offload commit function")

    return contextlib.nullcontext(), group_prefetch_offload_commit_async


# ------------------------------------------------------------------------------------------ module tree
class _MissingMeta(type):
    """Metaclass of placeholders for the unmodelled parts of TE: attribute access gives more placeholders,
    calling or instantiating raises ``NotImplementedError`` naming the TE object."""

    def __getattr__(cls, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return _placeholder(f"{cls.__qualname__}.{name}")

    def __call__(cls, *args, **kwargs):
        missing = next(c for c in cls.__mro__ if c in _PLACEHOLDERS.values())
        raise _not_modelled(missing.__qualname__ if missing is cls
                            else f"{cls.__qualname__} (a subclass of {missing.__qualname__})")


_PLACEHOLDERS: Dict[str, type] = {}


def _placeholder(qualname: str) -> type:
    if qualname not in _PLACEHOLDERS:
        cls = _MissingMeta(qualname.rsplit(".", 1)[-1], (), {"__module__": "fake_te"})
        cls.__qualname__ = qualname
        _PLACEHOLDERS[qualname] = cls
    return _PLACEHOLDERS[qualname]


#: The modelled members of each fake module (everything else is a placeholder).
MEMBERS: Dict[str, Dict[str, Any]] = {
    "transformer_engine": {"__version__": TE_VERSION},
    "transformer_engine.pytorch": {"DotProductAttention": DotProductAttention, "Linear": Linear,
                                   "LayerNormLinear": LayerNormLinear, "LayerNorm": LayerNorm, "RMSNorm": RMSNorm,
                                   "fp8_autocast": fp8_autocast, "fp8_model_init": fp8_model_init},
    "transformer_engine.pytorch.ops": {"LayerNorm": _LayerNormOp, "RMSNorm": _RMSNormOp},
    "transformer_engine.pytorch.fp8": {"FP8GlobalStateManager": FP8GlobalStateManager,
                                       "fp8_autocast": fp8_autocast, "fp8_model_init": fp8_model_init},
    "transformer_engine.pytorch.attention": {"_SplitAlongDim": _SplitAlongDim},
    "transformer_engine.pytorch.cpu_offload": {"get_cpu_offload_context": get_cpu_offload_context},
}


class _FakeModule(types.ModuleType):
    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        sub = sys.modules.get(f"{self.__name__}.{name}")
        return sub if sub is not None else _placeholder(f"{self.__name__}.{name}")


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolves ``transformer_engine`` and every submodule to a :class:`_FakeModule`."""

    def find_spec(self, name, path, target=None):
        if name == "transformer_engine" or name.startswith("transformer_engine."):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _FakeModule(spec.name)
        module.__path__ = []
        module.__dict__.update(MEMBERS.get(spec.name, {}))
        return module

    def exec_module(self, module) -> None:
        parent, _, child = module.__name__.rpartition(".")
        if parent in sys.modules:
            setattr(sys.modules[parent], child, module)


def install() -> type:
    """Make ``import transformer_engine`` resolve to the fake (once per process); returns
    :class:`DotProductAttention`."""
    if not any(isinstance(finder, _Finder) for finder in sys.meta_path):
        if "megatron.core.extensions.transformer_engine" in sys.modules:
            raise RuntimeError("fake TE must be installed before megatron.core.extensions.transformer_engine is "
                               "imported")
        sys.meta_path.insert(0, _Finder())
        # attribute access (te.pytorch.X) must work without an explicit import of each submodule
        import transformer_engine.pytorch  # noqa: F401
        import transformer_engine.pytorch.ops  # noqa: F401
    return DotProductAttention
