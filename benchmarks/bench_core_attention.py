"""The Lighthouse core attention with TransformerEngine's dense kernel inside against the local one, one GPU.

Megatron-Core ``LighthouseCoreAttention`` modules, built by this package's layer specs, on the same inputs:

- ``te``: ``TEDotProductAttention`` inside (the TE spec); TE's fused (cuDNN) backend, ``NVTE_FLASH_ATTN=0`` unless
  set; the backend TE picked is recorded from TE's own selection state after the first call;
- ``sdpa``: ``SDPACoreAttention`` inside, ``LIGHTHOUSE_DENSE_KERNEL=sdpa`` (torch SDPA's own kernel choice, the
  behaviour before the dense-kernel policy);
- ``auto``: ``SDPACoreAttention`` inside, ``LIGHTHOUSE_DENSE_KERNEL=auto`` (the fastest stock kernel per shape,
  timed once; the kernel it picked is recorded);
- ``op``: ``lighthouse_attention`` alone with cuDNN SDPA as its dense kernel (no module around it).

Rows: 32K, 128K, 512K and 1M tokens (``--lengths``); heads ``q/kv`` 8/8 (the paper's layer, hidden 1024), 16/2 and
32/8 (``--heads``), head dim 128, bf16, batch 1, topk 2048, pooling factor 4; the paper's fixed pyramid ``L=3`` at
every length, and from 256K also the growing one of ``LighthouseConfig.for_sequence(N)`` (as the README advises).
Per row and variant: forward+backward time (median of CUDA-event timings after warm-up), peak memory, the ratio
to ``te``, and forward and backward equality against ``te`` (``op`` when TE is missing): rel-L2 of the output and of
dq, dk, dv, within ``TOLERANCE``. Why it holds: every variant selects with the same fused kernels from the same
q/k in fp32, so the selected positions are identical; the variants differ only in the dense kernel run on the
subsequence, whose bf16 output and gradients round differently (observed 2e-3 / 3.5e-3 on an H100).

Also recorded: SDPA's own kernel choice for the subsequence (``torch._fused_sdp_choice``) on the layout the local
layer hands over now (contiguous ``[B, H, S, D]``) and the one it used to (a view of contiguous ``[S, B, H, D]``),
without and with dropout 0.1 (Megatron's default ``attention_dropout``), torch's SDPA backend priority order
before the first SDPA call and after the run, the runtime cuDNN version and deterministic mode: what decides
whether SDPA runs cuDNN or FlashAttention 2 in this process.

A row that runs out of memory is recorded so, and the run goes on. Prints a table and writes
``core_attention_<gpu>.json`` under ``--out-dir``. About 4 minutes on one H100 for the default grid.

    PYTHONPATH=$PWD:$PWD/kernels python3 benchmarks/bench_core_attention.py --out-dir $OUT
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import statistics
import sys
import time
from typing import Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # before torch touches CUDA

import torch  # noqa: E402
from torch.nn.attention import SDPBackend  # noqa: E402

from megatron_lighthouse import LighthouseConfig, lighthouse_attention  # noqa: E402
from megatron_lighthouse.dense import DENSE_KERNEL_ENV, dense_attention  # noqa: E402
from te_selection import te_backend  # noqa: E402  (benchmarks/, beside this script)

#: The variants, in the order they run and are reported; the first one that runs is the equality reference
#: (``te``, or ``op`` when TransformerEngine is missing).
VARIANTS = ("te", "sdpa", "auto", "op")
#: What each variant is, for the table's legend and the JSON.
VARIANT_TEXT = {
    "te": "LighthouseCoreAttention, TEDotProductAttention inside",
    "sdpa": f"LighthouseCoreAttention, SDPACoreAttention inside, {DENSE_KERNEL_ENV}=sdpa (SDPA's own choice)",
    "auto": f"LighthouseCoreAttention, SDPACoreAttention inside, {DENSE_KERNEL_ENV}=auto (the policy)",
    "op": "lighthouse_attention alone, cuDNN SDPA dense kernel",
}
DEFAULT_LENGTHS = (32768, 131072, 524288, 1048576)
DEFAULT_HEADS = ((8, 8), (16, 2), (32, 8))
HEAD_DIM, TOPK, POOLING_FACTOR, FIXED_LEVELS = 128, 2048, 4, 3
#: From this length on a row is also run with the growing pyramid (the README's advice).
GROWING_FROM = 262144
#: Largest rel-L2 of the output and of each gradient against the reference, in bf16 (see the module docstring).
TOLERANCE = 1e-2
#: Timing: at least this many timed calls, at most ``MAX_CALLS``, about ``TIME_BUDGET_MS`` of calls in all.
MIN_CALLS, MAX_CALLS, TIME_BUDGET_MS = 3, 20, 300.0


class Case(NamedTuple):
    """One row: ``tokens`` of one sequence (batch 1), ``heads`` query and ``kv_heads`` key/value heads of
    ``head_dim``, and the Lighthouse settings (``pyramid``: ``"fixed"`` or ``"growing"``)."""

    tokens: int
    heads: int
    kv_heads: int
    head_dim: int
    pyramid: str
    lighthouse: LighthouseConfig

    @property
    def subsequence(self) -> int:
        return self.lighthouse.subsequence_length(self.tokens)


def cases(lengths: Sequence[int], heads: Sequence[Tuple[int, int]], head_dim: int = HEAD_DIM) -> List[Case]:
    """The rows for ``lengths`` x ``heads``: the fixed pyramid at every length, the growing one from
    :data:`GROWING_FROM` tokens (``ValueError`` for a length the settings cannot select from). No dense layers, and
    q/k taken as they come (``rope="tokens"``: a core attention alone has no rotary table)."""
    out = []
    for n in lengths:
        for h, g in heads:
            settings = dict(pooling_factor=POOLING_FACTOR, topk=TOPK, dense_layers=(), rope="tokens")
            pyramids = {"fixed": LighthouseConfig(levels=FIXED_LEVELS, **settings)}
            if n >= GROWING_FROM:
                pyramids["growing"] = LighthouseConfig.for_sequence(n, **settings)
            for name, config in pyramids.items():
                try:
                    config.validate(n)
                except ValueError as err:
                    raise ValueError(f"--lengths {n}: {err}") from None
                out.append(Case(n, h, g, head_dim, name, config))
    return out


def parse_heads(text: str) -> List[Tuple[int, int]]:
    """``"8/8,16/2"`` -> ``[(8, 8), (16, 2)]``; ``ValueError`` unless each is ``q/kv`` with ``q % kv == 0``."""
    out = []
    for item in text.split(","):
        try:
            h, g = (int(x) for x in item.split("/"))
        except ValueError:
            raise ValueError(f"--heads {text}: {item!r} must be q/kv, two positive ints (e.g. 16/2)") from None
        if h < 1 or g < 1 or h % g:
            raise ValueError(f"--heads {text}: {item!r}: the query heads must be a positive multiple of the "
                             f"key/value heads")
        out.append((h, g))
    return out


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """The command line; every bad value is one ``argparse`` error line (exit code 2)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default=",".join(map(str, DEFAULT_LENGTHS)),
                        help="comma-separated tokens per row (default: 32K, 128K, 512K, 1M)")
    parser.add_argument("--heads", default=",".join(f"{h}/{g}" for h, g in DEFAULT_HEADS),
                        help="comma-separated query/key-value heads (default: 8/8,16/2,32/8)")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated subset of {','.join(VARIANTS)}")
    parser.add_argument("--out-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args(argv)
    try:
        args.lengths = [int(x) for x in args.lengths.split(",")]
    except ValueError:
        parser.error(f"--lengths {args.lengths}: must be comma-separated ints")
    try:
        args.heads = parse_heads(args.heads)
        args.cases = cases(args.lengths, args.heads)
    except ValueError as err:
        parser.error(str(err))
    args.variants = [x for x in args.variants.split(",") if x]
    unknown = [x for x in args.variants if x not in VARIANTS]
    if unknown or not args.variants:
        parser.error(f"--variants {','.join(args.variants)}: each must be one of {','.join(VARIANTS)}")
    args.variants = [x for x in VARIANTS if x in args.variants]
    return args


# ----------------------------------------------------------------------------------------------- the modules
@contextlib.contextmanager
def dense_kernel_setting(name: Optional[str]) -> Iterator[None]:
    """``LIGHTHOUSE_DENSE_KERNEL=name`` while a module is built (``None``: unset), the user's setting restored."""
    before = os.environ.get(DENSE_KERNEL_ENV)
    if name is None:
        os.environ.pop(DENSE_KERNEL_ENV, None)
    else:
        os.environ[DENSE_KERNEL_ENV] = name
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(DENSE_KERNEL_ENV, None)
        else:
            os.environ[DENSE_KERNEL_ENV] = before


def transformer_config(case: Case, dtype: torch.dtype):
    """The layer's ``LighthouseTransformerConfig``: ``heads`` x ``head_dim`` hidden, no dropout, one layer."""
    from megatron_lighthouse.transformer_config import LighthouseTransformerConfig

    return LighthouseTransformerConfig(
        num_layers=1, hidden_size=case.heads * case.head_dim, num_attention_heads=case.heads,
        num_query_groups=case.kv_heads, kv_channels=case.head_dim, attention_dropout=0.0, hidden_dropout=0.0,
        bf16=dtype == torch.bfloat16, params_dtype=dtype, lighthouse=case.lighthouse)


def build(variant: str, case: Case, dtype: torch.dtype, device: torch.device) -> Callable:
    """``attend(query, key, value) -> [s, b, h*d]`` of ``variant`` (``[s, b, h|g, d]`` inputs); ``RuntimeError``
    naming what is missing when it cannot be built here."""
    if variant == "op":
        kernel = dense_attention("cudnn" if device.type == "cuda" else "sdpa", device.type)

        def attend(query, key, value):
            s, b, h, d = query.shape
            out = lighthouse_attention(*(x.transpose(0, 1) for x in (query, key, value)), config=case.lighthouse,
                                       attention=kernel)
            return out.transpose(0, 1).reshape(s, b, h * d)

        return attend
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.spec_utils import build_module

    from megatron_lighthouse.spec import get_gpt_layer_with_lighthouse_spec, have_transformer_engine

    use_te = variant == "te"
    if use_te and not have_transformer_engine():
        raise RuntimeError("TransformerEngine is not importable here")
    spec = get_gpt_layer_with_lighthouse_spec(lighthouse=case.lighthouse, use_transformer_engine=use_te)
    with dense_kernel_setting(None if use_te else variant):
        module = build_module(spec.submodules.self_attention.submodules.core_attention,
                              config=transformer_config(case, dtype), layer_number=1,
                              attn_mask_type=AttnMaskType.causal, attention_type="self", softmax_scale=None,
                              cp_comm_type=None, pg_collection=None)
    module = module.to(device)

    def attend(query, key, value):
        return module(query, key, value, None, attn_mask_type=AttnMaskType.causal)

    return attend


def auto_choice(case: Case, device: torch.device) -> str:
    """The kernel the ``"auto"`` policy picked for this row's subsequence (``[1, H, S, D]``)."""
    choices = getattr(dense_attention("auto", device.type), "choices", {})
    picked = {name for (q_shape, *_), name in choices.items()
              if q_shape == (1, case.heads, case.subsequence, case.head_dim)}
    return ", ".join(sorted(picked)) or "SDPA's own choice (no fused kernel applies)"


def sdpa_choices(case: Case, dtype: torch.dtype, device: torch.device) -> Dict[str, str]:
    """SDPA's own kernel for the row's square causal subsequence attention, on the layout the local layer hands
    over (``bhsd``: contiguous ``[B, H, S, D]``) and the one it used to (``sbhd_view``: a view of contiguous
    ``[S, B, H, D]``), without dropout and with Megatron's default 0.1."""
    s, h, d = case.subsequence, case.heads, case.head_dim
    layouts = {"bhsd": torch.empty(1, h, s, d, dtype=dtype, device=device),
               "sbhd_view": torch.empty(s, 1, h, d, dtype=dtype, device=device).permute(1, 2, 0, 3)}
    out = {}
    for layout, x in layouts.items():
        x.requires_grad_(True)
        for dropout in (0.0, 0.1):
            choice = torch._fused_sdp_choice(x, x, x, dropout_p=dropout, is_causal=True, scale=d**-0.5)
            out[f"{layout}, dropout {dropout}"] = SDPBackend(choice).name
    return out


def _cudnn_version() -> object:
    """torch's runtime cuDNN version, or the error torch raises for it (a cuDNN that another library loaded first,
    e.g. TransformerEngine's, older than the one torch was built with)."""
    try:
        return torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    except RuntimeError as err:
        return f"error: {err}"


def sdpa_state() -> Dict[str, object]:
    """What steers SDPA's own choice in this process: the backend priority order, the enabled backends, the
    runtime cuDNN version and deterministic mode."""
    return {
        "priority_order": [SDPBackend(i).name for i in torch._C._get_sdp_priority_order()],
        "enabled": {name: getattr(torch.backends.cuda, f"{name}_sdp_enabled")()
                    for name in ("cudnn", "flash", "mem_efficient", "math")},
        "cudnn_version": _cudnn_version(),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "TORCH_CUDNN_SDPA_DEPRIORITIZED": os.environ.get("TORCH_CUDNN_SDPA_DEPRIORITIZED"),
    }


# ----------------------------------------------------------------------------------------------- measuring
def median_ms(fn: Callable[[], object], device: torch.device) -> float:
    """Median time of ``fn`` in ms over :data:`MIN_CALLS` to :data:`MAX_CALLS` calls (about
    :data:`TIME_BUDGET_MS` in all; the caller has warmed ``fn`` up); CUDA events on a GPU."""
    def once() -> float:
        if device.type != "cuda":
            start = time.perf_counter()
            fn()
            return (time.perf_counter() - start) * 1e3
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)

    times = [once()]
    calls = min(MAX_CALLS, max(MIN_CALLS, int(TIME_BUDGET_MS / max(times[0], 1e-3))))
    times += [once() for _ in range(calls - 1)]
    return statistics.median(times)


def peak_gib(fn: Callable[[], object], device: torch.device) -> Optional[float]:
    """Peak allocated GPU memory during ``fn`` (inputs included), GiB; ``None`` off the GPU."""
    if device.type != "cuda":
        fn()
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**30


def rel_l2(x: torch.Tensor, ref: torch.Tensor, rows: int = 16384) -> float:
    """``||x - ref|| / ||ref||`` in float64, ``rows`` of the first dim at a time (``ref`` may live on the CPU)."""
    num = den = 0.0
    for i in range(0, x.shape[0], rows):
        a, b = x[i:i + rows].double(), ref[i:i + rows].to(x.device).double()
        num += (a - b).square().sum().item()
        den += b.square().sum().item()
    return math.sqrt(num / den) if den else float("nan")


def inputs(case: Case, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """``q [s, 1, h, d]``, ``k``/``v`` ``[s, 1, g, d]`` leaves needing gradients, and ``dout [s, 1, h*d]``."""
    gen = torch.Generator(device=device).manual_seed(seed)
    s, h, g, d = case.tokens, case.heads, case.kv_heads, case.head_dim
    q, k, v = (torch.randn(s, 1, n, d, generator=gen, dtype=dtype, device=device).requires_grad_(True)
               for n in (h, g, g))
    return q, k, v, torch.randn(s, 1, h * d, generator=gen, dtype=dtype, device=device)


def _out_of_memory(err: BaseException) -> str:
    return "out of memory: " + str(err).splitlines()[0]


def run_case(case: Case, variants: Sequence[str], dtype: torch.dtype, device: torch.device) -> List[Dict]:
    """One row per variant: time, peak memory, and (second pass) equality against the first variant that ran."""
    q, k, v, dout = inputs(case, dtype, device)
    rows, steps = [], {}
    for variant in variants:
        row = {"tokens": case.tokens, "heads": case.heads, "kv_heads": case.kv_heads, "head_dim": case.head_dim,
               "pyramid": case.pyramid, "levels": case.lighthouse.levels, "S": case.subsequence, "variant": variant}
        rows.append(row)
        try:
            attend = build(variant, case, dtype, device)
        except RuntimeError as err:
            row["skipped"] = str(err)
            continue

        def step(attend=attend):
            return torch.autograd.grad(attend(q, k, v), (q, k, v), dout)

        def forward_backward(attend=attend):
            out = attend(q, k, v)
            return (out.detach(), *torch.autograd.grad(out, (q, k, v), dout))

        try:
            step()  # the warm-up: kernel compilation, cuDNN graphs, the "auto" timing
            if variant == "te":
                row["te_backend"] = te_backend()
            elif variant == "sdpa":
                row["kernel"] = "SDPA's own choice: " + sdpa_choices(case, dtype, device)["bhsd, dropout 0.0"]
            elif variant == "auto":
                row["kernel"] = auto_choice(case, device)
            else:
                row["kernel"] = "cudnn" if device.type == "cuda" else "SDPA's own choice"
            row["peak_gib"] = peak_gib(step, device)
            row["fwd_bwd_ms"] = median_ms(step, device)
            steps[variant] = forward_backward
        except torch.cuda.OutOfMemoryError as err:
            row["skipped"] = _out_of_memory(err)
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
        print(json.dumps(row), flush=True)
    compare(rows, steps, device)
    return rows


def compare(rows: List[Dict], steps: Dict[str, Callable], device: torch.device) -> None:
    """Adds ``rel_l2`` (output, dq, dk, dv) against the reference (``te``, else ``op``, else the first variant of
    ``steps``) and ``equal`` (all within :data:`TOLERANCE`) to ``rows``; the reference waits on the CPU when the
    GPU cannot hold it beside a run. A run out of memory leaves ``equality_skipped`` on its row."""
    if not steps:
        return
    reference = next((v for v in ("te", "op") if v in steps), next(iter(steps)))
    try:
        ref = steps[reference]()
    except torch.cuda.OutOfMemoryError as err:
        for row in rows:
            if row["variant"] in steps:
                row["equality_skipped"] = f"the reference {reference}: {_out_of_memory(err)}"
        return
    if device.type == "cuda":
        held = sum(t.numel() * t.element_size() for t in ref)
        peak = max(r.get("peak_gib") or 0.0 for r in rows) * 2**30
        if held + peak > 0.95 * torch.cuda.mem_get_info()[1]:
            ref = tuple(t.cpu() for t in ref)
    for row in rows:
        if row["variant"] not in steps:
            continue
        row["reference"] = reference
        try:
            got = ref if row["variant"] == reference else steps[row["variant"]]()
        except torch.cuda.OutOfMemoryError as err:
            row["equality_skipped"] = _out_of_memory(err)
            continue
        row["rel_l2"] = dict(zip(("out", "dq", "dk", "dv"), (rel_l2(a, b) for a, b in zip(got, ref))))
        row["equal"] = max(row["rel_l2"].values()) <= TOLERANCE
        del got
        if device.type == "cuda":
            torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------- report
def ratios(rows: List[Dict]) -> None:
    """``vs_te``: each variant's time over ``te``'s in the same row (when both ran)."""
    te = {_row_key(r): r["fwd_bwd_ms"] for r in rows if r["variant"] == "te" and "fwd_bwd_ms" in r}
    for row in rows:
        base = te.get(_row_key(row))
        if base and "fwd_bwd_ms" in row:
            row["vs_te"] = row["fwd_bwd_ms"] / base


def _row_key(row: Dict) -> tuple:
    return row["tokens"], row["heads"], row["kv_heads"], row["pyramid"]


def print_table(rows: List[Dict]) -> None:
    """The markdown table of ``rows`` (one line per row and variant), then the legend."""
    print("| tokens | heads q/kv | pyramid | S | variant | fwd+bwd ms | peak GiB | vs te | rel-L2 out | dq | dk | dv "
          "| kernel |")
    print("|" + " --- |" * 13)
    for r in rows:
        head = [f"{r['tokens']:,}", f"{r['heads']}/{r['kv_heads']}", f"{r['pyramid']} L={r['levels']}",
                f"{r['S']:,}", r["variant"]]
        if "skipped" in r:
            print("| " + " | ".join(head + [r["skipped"]] + [""] * 7) + " |")
            continue
        errs = r.get("rel_l2", {})
        cells = ["%.2f" % r["fwd_bwd_ms"], "-" if r.get("peak_gib") is None else "%.2f" % r["peak_gib"],
                 "%.2fx" % r["vs_te"] if "vs_te" in r else "-"]
        cells += ["%.1e" % errs[key] if key in errs else "-" for key in ("out", "dq", "dk", "dv")]
        cells.append(r.get("te_backend") or r.get("kernel") or "")
        print("| " + " | ".join(head + cells) + " |")
    print("variants: " + "; ".join(f"{name}: {VARIANT_TEXT[name]}" for name in VARIANTS))
    bad = [r for r in rows if r.get("equal") is False]
    print(f"equality (rel-L2 <= {TOLERANCE:g} against the reference): "
          + ("all within" if not bad else f"{len(bad)} rows outside: " + ", ".join(
              f"{r['tokens']} {r['heads']}/{r['kv_heads']} {r['variant']}" for r in bad)))


def write_json(report: Dict, out_dir: str, gpu: str) -> str:
    """``report`` as ``<out_dir>/core_attention_<gpu>.json``; returns the path."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"core_attention_{gpu.replace(' ', '_').replace('/', '_')}.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
    return path


def environment(variants: Sequence[str]) -> Dict[str, object]:
    """Versions and settings of the run."""
    import megatron.core

    info = {"date": datetime.date.today().isoformat(), "torch": torch.__version__,
            "megatron_core": getattr(megatron.core, "__version__", "unknown"),
            "allocator": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
            "nvte": {key: value for key, value in os.environ.items() if key.startswith("NVTE_")}}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if "te" in variants:
        try:
            import transformer_engine

            info["transformer_engine"] = getattr(transformer_engine, "__version__", "unknown")
        except ImportError as err:
            info["transformer_engine"] = f"not importable: {err}"
    return info


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_core_attention.py needs a CUDA GPU (cuDNN, the fused kernels); none is visible")
    os.environ.setdefault("NVTE_FLASH_ATTN", "0")  # TE's inner attention: its fused (cuDNN) backend
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_lighthouse.process_group import init_single_process_megatron

    torch.cuda.set_device(0)
    init_single_process_megatron("nccl", prefix="bench_core_attention_")  # Megatron's state, as TE modules need
    model_parallel_cuda_manual_seed(0)  # the RNG tracker a training run has (no dropout here)
    device, dtype = torch.device("cuda"), torch.bfloat16
    gpu = torch.cuda.get_device_name()
    report = {"gpu": gpu, **environment(args.variants), "variants": {v: VARIANT_TEXT[v] for v in args.variants},
              "tolerance": TOLERANCE, "settings": dict(batch=1, head_dim=HEAD_DIM, topk=TOPK,
                                                       pooling_factor=POOLING_FACTOR, dtype="bf16"),
              "sdpa_before": sdpa_state(), "rows": [], "sdpa_choices": []}
    start = time.perf_counter()
    for i, case in enumerate(args.cases, 1):
        print(f"[bench_core_attention] {i}/{len(args.cases)}: {case.tokens} tokens, heads {case.heads}/"
              f"{case.kv_heads}, {case.pyramid} L={case.lighthouse.levels}, S={case.subsequence} "
              f"({time.perf_counter() - start:.0f} s)", flush=True)
        report["sdpa_choices"].append({"tokens": case.tokens, "heads": case.heads, "S": case.subsequence,
                                       **sdpa_choices(case, dtype, device)})
        report["rows"] += run_case(case, args.variants, dtype, device)
    report["sdpa_after"] = sdpa_state()
    report["seconds"] = time.perf_counter() - start
    ratios(report["rows"])
    print_table(report["rows"])
    print("SDPA state before the first call: " + json.dumps(report["sdpa_before"]))
    print("SDPA state after the run: " + json.dumps(report["sdpa_after"]))
    print("SDPA's own choice per subsequence: " + json.dumps(report["sdpa_choices"][:1]) + " ...")
    print(f"wrote {write_json(report, args.out_dir, gpu)} ({report['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
