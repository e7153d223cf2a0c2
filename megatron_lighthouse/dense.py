"""Stock dense causal attention: torch SDPA (cuDNN / flash backends), FlashAttention 2 / 3, and the policy that
picks one.

Every kernel here follows the contract ``attention(q, k, v, softmax_scale) -> out``, all ``[B, H, S, D]``,
causal over ``S``. ``"auto"`` times the kernels available for a shape once and keeps the fastest. The same names
are the dense-kernel policy of the package's core attention
(:class:`~megatron_lighthouse.sdpa_core_attention.SDPACoreAttention`, in dense layers and inside Lighthouse
layers): :data:`DENSE_KERNEL_ENV` names one (default ``"auto"``), and it runs wherever a fused kernel applies
(:func:`fused_kernel_applies`); elsewhere SDPA makes its own choice.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
import os
import statistics
import time
from typing import Callable, Dict, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

logger = logging.getLogger(__name__)

#: ``attention(q, k, v, softmax_scale) -> out``, all ``[B, H, S, D]`` of one dtype, causal over ``S``.
DenseAttention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]

#: Accepted ``dense`` names: ``"auto"`` (on CUDA the fastest of the kernels available, timed once per shape; plain
#: SDPA elsewhere), ``"cudnn"``, ``"flash"`` (SDPA's backends alone), ``"sdpa"`` (torch's own choice), ``"fa2"``
#: (``flash_attn``), ``"fa3"`` (``flash_attn_interface``).
DENSE_KERNELS: Tuple[str, ...] = ("auto", "cudnn", "flash", "sdpa", "fa2", "fa3")
_FLASH_MODULES = {"fa2": "flash_attn", "fa3": "flash_attn_interface"}
#: The environment variable that names the dense kernel of the package's core attention (one of
#: :data:`DENSE_KERNELS`; unset: ``"auto"``), read when a core attention is built.
DENSE_KERNEL_ENV = "LIGHTHOUSE_DENSE_KERNEL"
#: The dtypes that have fused kernels (cuDNN, flash); others run SDPA's own choice.
FUSED_DTYPES = (torch.float16, torch.bfloat16)
#: ``"auto"`` times a shape on at most this many positions (same batch, heads and head dim): the kernels' ranking
#: is settled long before, and a dense layer's full length (1M tokens) would take minutes and gigabytes to time.
TIMING_MAX_LEN = 65536


def _sdpa_with(backend: SDPBackend) -> DenseAttention:
    def attention(q, k, v, softmax_scale):
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=softmax_scale)

    return attention


def sdpa_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float) -> torch.Tensor:
    """Stock causal attention on ``[B, H, S, D]`` tensors (torch SDPA picks cuDNN / flash / efficient / math)."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=softmax_scale)


def _flash_attn(module_name: str) -> DenseAttention:
    func = importlib.import_module(module_name).flash_attn_func

    def attention(q, k, v, softmax_scale):
        out = func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=softmax_scale, causal=True)
        out = out[0] if isinstance(out, tuple) else out
        return out.transpose(1, 2)

    return attention


def median_ms(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median over ``repeats`` calls of one call's time in ms: CUDA events on a GPU, the wall clock elsewhere (no
    warm-up: the caller's)."""
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _time_ms(fn: Callable[[], object], device: torch.device, repeats: int = 3) -> float:
    """Median time of ``fn`` in ms after one warm-up call (:func:`median_ms`)."""
    fn()
    return median_ms(fn, device, repeats)


def pick_fastest(kernels: Mapping[str, DenseAttention], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 softmax_scale: float) -> str:
    """Name of the kernel of ``kernels`` with the fastest forward+backward on random tensors shaped like q/k/v
    (sequences cut to :data:`TIMING_MAX_LEN` positions).

    A kernel that raises ``RuntimeError`` (shape, dtype or GPU it does not support) is skipped. Uses its own
    random generator, so the caller's random streams are untouched.
    """
    gen = torch.Generator(device=q.device).manual_seed(0)
    inputs = [torch.randn(*x.shape[:2], min(x.shape[2], TIMING_MAX_LEN), x.shape[3], generator=gen, dtype=x.dtype,
                          device=x.device, requires_grad=True) for x in (q, k, v)]
    dout = torch.randn(inputs[0].shape, generator=gen, dtype=q.dtype, device=q.device)
    times: Dict[str, float] = {}
    for name, kernel in kernels.items():
        def step():
            with torch.enable_grad():
                torch.autograd.grad(kernel(*inputs, softmax_scale), inputs, dout)

        try:
            times[name] = _time_ms(step, q.device)
        except RuntimeError as err:
            logger.info("dense kernel %s skipped for %s: %s", name, tuple(q.shape), err)
    if not times:
        raise RuntimeError(f"no dense kernel among {sorted(kernels)} runs on {tuple(q.shape)} {q.dtype} {q.device}")
    return min(times, key=times.get)


@functools.lru_cache(maxsize=None)
def available_kernels(dtype: torch.dtype) -> Dict[str, DenseAttention]:
    """Dense kernels to time on CUDA for ``dtype``: SDPA's cuDNN and flash backends and FA2/FA3 when installed
    (fp16/bf16), and SDPA's own choice, which runs for every dtype (fp32 has no cuDNN or flash kernel)."""
    kernels: Dict[str, DenseAttention] = {}
    if dtype in FUSED_DTYPES:
        kernels.update(cudnn=_sdpa_with(SDPBackend.CUDNN_ATTENTION), flash=_sdpa_with(SDPBackend.FLASH_ATTENTION))
        for name, module in _FLASH_MODULES.items():
            if importlib.util.find_spec(module) is not None:
                kernels[name] = _flash_attn(module)
    kernels["sdpa"] = sdpa_causal
    return kernels


def fused_kernel_applies(device_type: str, dtype: torch.dtype, dropout_p: float = 0.0,
                         capturing: bool = False) -> bool:
    """Whether a call on tensors of ``device_type`` and ``dtype`` runs the named dense kernel (the policy): on CUDA,
    in fp16/bf16, without dropout and outside CUDA-graph capture. Elsewhere SDPA's own choice serves it (the math
    kernel on CPU and in fp32, dropout under Megatron's RNG tracker, capture without timing)."""
    return device_type == "cuda" and dtype in FUSED_DTYPES and dropout_p == 0 and not capturing


class FastestDense:
    """``"auto"``: on CUDA, the available kernel with the fastest forward+backward for each (shapes, dtype, device)
    seen, timed once and logged at INFO (one choice per shape, so a recomputed forward uses the same kernel);
    plain SDPA where no fused kernel applies (:func:`fused_kernel_applies`). :attr:`choices` maps
    ``(q shape, k shape, dtype, device)`` to the kernel name picked."""

    def __init__(self) -> None:
        self.choices: Dict[tuple, str] = {}

    def __call__(self, q, k, v, softmax_scale):
        capturing = q.is_cuda and torch.cuda.is_current_stream_capturing()
        if not fused_kernel_applies(q.device.type, q.dtype, 0.0, capturing):
            return sdpa_causal(q, k, v, softmax_scale)
        kernels = available_kernels(q.dtype)
        key = (tuple(q.shape), tuple(k.shape), q.dtype, q.device)
        if key not in self.choices:
            self.choices[key] = pick_fastest(kernels, q, k, v, softmax_scale)
            logger.info("dense kernel for %s %s: %s", tuple(q.shape), q.dtype, self.choices[key])
        return kernels[self.choices[key]](q, k, v, softmax_scale)


_AUTO = FastestDense()


def check_dense_kernel(name: object, setting: str = "dense") -> str:
    """``name`` if it is one of :data:`DENSE_KERNELS` that can run here; else a one-line ``ValueError`` naming
    ``setting`` (``fa2`` / ``fa3`` need their FlashAttention package installed)."""
    if name not in DENSE_KERNELS:
        raise ValueError(f"{setting}={name!r}: must be one of {', '.join(DENSE_KERNELS)}")
    module = _FLASH_MODULES.get(name)
    if module is not None and importlib.util.find_spec(module) is None:
        raise ValueError(f"{setting}={name!r}: needs the {module} package, which is not installed (choose another "
                         f"of {', '.join(DENSE_KERNELS)})")
    return name


def dense_kernel_from_env(environ: Optional[Mapping[str, str]] = None) -> str:
    """The dense kernel named by :data:`DENSE_KERNEL_ENV` (``"auto"`` when unset or empty), checked by
    :func:`check_dense_kernel`: ``ValueError`` ``LIGHTHOUSE_DENSE_KERNEL='x': must be one of ...``."""
    raw = (os.environ if environ is None else environ).get(DENSE_KERNEL_ENV, "")
    return check_dense_kernel(raw.strip() or "auto", DENSE_KERNEL_ENV)


def dense_attention(name: str = "auto", device_type: str = "cuda") -> DenseAttention:
    """The dense causal kernel called ``name`` (see :data:`DENSE_KERNELS`) for tensors on ``device_type``;
    ``ValueError`` for a name that is not one, or not installed (:func:`check_dense_kernel`)."""
    check_dense_kernel(name)
    if name in _FLASH_MODULES:
        return _flash_attn(_FLASH_MODULES[name])
    if name == "sdpa" or (name == "auto" and device_type != "cuda"):
        return sdpa_causal
    if name == "auto":
        return _AUTO
    return _sdpa_with(SDPBackend.CUDNN_ATTENTION if name == "cudnn" else SDPBackend.FLASH_ATTENTION)
