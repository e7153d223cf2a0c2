"""Each fused kernel alone against the memory bandwidth, one GPU: where the op's time above its floor goes.

For one head layout (``--heads``, query/kv), length (``--lengths``) and pyramid (``--pyramid``, as in
``bench_op.py``), B=1, D=128, bf16, topk=2048, p=4, each step of the op runs alone on the same inputs: the
scoring pass, the selection, the inverse map, the coarsest level pooled from q and from k and v (q's and k's are
what a scoring pass that also pooled would save), the gather (which includes that pooling), the scatter, and the
scatter's and the gather's backward. A kernel's **compulsory bytes** are its inputs read once and its outputs
written once (the scatter reads the subsequence and writes all ``N`` tokens, say);
``GB/s`` is those bytes over its time, and ``of copy`` the fraction of a device copy's bandwidth measured in the same
run. A kernel far below the copy's bandwidth is where time is lost; the selection moves too few bytes to count.

``--geometries 16x8,32x4`` also times every kernel with a launch geometry (rows x warps per program) at each listed
geometry besides its own (the kernels' geometry constants, set for the call and restored): the data behind the
choice of the constants in ``lighthouse_kernels``. Prints a table; writes ``kernels_<gpu>.json`` under
``--out-dir``:

    PYTHONPATH=$PWD:$PWD/kernels python3 benchmarks/bench_kernels.py --heads 32/4 --lengths 1048576 \\
        --pyramid growing --geometries 16x4,16x8,32x4,32x8,64x4 --out-dir $OUT
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from bench_op import B, COPY_BYTES, D, DTYPE, P, PYRAMIDS, median_ms, parse_heads, pyramid
from megatron_lighthouse import LighthouseConfig

#: Kernels with a launch geometry: the module and the name of the constant that holds it.
GEOMETRY_CONSTANTS = {
    "pool_coarsest_q": ("gather", "POOL_COARSEST_GEOMETRY"),
    "pool_coarsest_kv": ("gather", "POOL_COARSEST_GEOMETRY"),
    "gather": ("gather", "GATHER_FORWARD_GEOMETRY"),
    "scatter": ("scatter", "SCATTER_FORWARD_GEOMETRY"),
    "scatter_bwd": ("scatter", "SCATTER_BACKWARD_GEOMETRY"),
    "gather_bwd": ("gather", "GATHER_BACKWARD_GEOMETRY"),
    "pool_score": ("pool_score", "POOL_SCORE_GEOMETRY"),
}


def compulsory_bytes(n: int, heads: int, kv_heads: int, levels: int, s: int) -> Dict[str, Optional[int]]:
    """Bytes each step must move at least (inputs read once, outputs written once), bf16 tensors of ``D`` dims,
    float32 scores, int64 indices, an int32 inverse map; ``None`` for the selection (it reads a few scores)."""
    e = DTYPE.itemsize * B * D  # one row of one head
    total = sum(n // P**level for level in range(levels))  # pyramid entries
    coarsest = n // P ** (levels - 1)
    tokens_qkv = n * (heads + 2 * kv_heads) * e

    def pooled(x_heads: int) -> int:  # the coarsest level of x_heads heads: the tokens read, the means written
        return (n + coarsest) * x_heads * e

    subsequence = heads * s * e  # one [B, H, S, D] tensor
    return {
        "pool_score": n * (heads + kv_heads) * e + 4 * B * (heads + kv_heads) * total,
        "select": None,
        "inverse_map": 4 * B * heads * total + 8 * B * heads * s,
        "pool_coarsest_q": pooled(heads),
        "pool_coarsest_kv": pooled(2 * kv_heads),
        "gather": tokens_qkv + 3 * subsequence + 8 * B * heads * s,
        "scatter": subsequence + n * heads * e + 4 * B * heads * total,
        "scatter_bwd": n * heads * e + subsequence + 8 * B * heads * s,
        "gather_bwd": 3 * subsequence + 4 * B * heads * total + tokens_qkv,
    }


def parse_geometries(text: str) -> List[Tuple[int, int]]:
    """``"16x8,32x4"`` -> ``[(16, 8), (32, 4)]``: rows (a power of two >= 16) x warps (1, 2, 4, 8, 16 or 32);
    ``ValueError`` naming the bad item. Empty text: none."""
    out = []
    for item in filter(None, (x.strip() for x in text.split(","))):
        parts = item.split("x")
        ok = len(parts) == 2 and all(p.isdigit() for p in parts)
        rows, warps = (int(p) for p in parts) if ok else (0, 0)
        if not ok or rows < 16 or rows & (rows - 1) or warps not in (1, 2, 4, 8, 16, 32):
            raise ValueError(f"--geometries item {item!r}: must be ROWSxWARPS with ROWS a power of two >= 16 and "
                             f"WARPS one of 1, 2, 4, 8, 16, 32")
        out.append((rows, warps))
    return out


def kernel_steps(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 config: LighthouseConfig) -> Dict[str, Callable[[], object]]:
    """One callable per step of the op on ``q`` ``[B, N, H, D]``, ``k``/``v`` ``[B, N, H_kv, D]`` (bf16) with the
    settings of ``config``, each with its inputs made once beforehand: the forward steps, then the scatter's and the
    gather's backward (their kernels called directly, with the inverse map built outside the gather's)."""
    from lighthouse_kernels import gather, pool_score, scatter, select
    from lighthouse_kernels.pyramid_index import inverse_map, pyramid_size

    n, kv_heads = q.shape[1], k.shape[2]
    levels, p, topk = config.levels, config.pooling_factor, config.topk
    sq, sk = pool_score.pool_scores(q, k, levels, p)
    idx = select.select_entries(sq, sk, n, levels, p, topk).contiguous()
    inv = inverse_map(idx, pyramid_size(n, levels, p))
    picked = gather.gather_forward(q, k, v, idx, levels, p)
    dout = torch.randn_like(q)
    return {
        "pool_score": lambda: pool_score.pool_scores(q, k, levels, p),
        "select": lambda: select.select_entries(sq, sk, n, levels, p, topk),
        "inverse_map": lambda: inverse_map(idx, pyramid_size(n, levels, p)),
        "pool_coarsest_q": lambda: gather.pool_coarsest(q, levels, p),
        "pool_coarsest_kv": lambda: [gather.pool_coarsest(x, levels, p) for x in (k, v)],
        "gather": lambda: gather.gather_forward(q, k, v, idx, levels, p),
        "scatter": lambda: scatter.scatter_forward(picked[0], inv, n, levels, p),
        "scatter_bwd": lambda: scatter.scatter_backward(dout, idx, levels, p, q.dtype),
        "gather_bwd": lambda: gather.gather_backward(*picked, inv, n, kv_heads, levels, p),
    }


def copy_bandwidth_gbs(device: torch.device) -> float:
    """GB/s of a device copy of ``COPY_BYTES`` (read and written once each), timed as the kernels are."""
    src, dst = (torch.empty(COPY_BYTES, dtype=torch.uint8, device=device) for _ in range(2))
    return 2 * COPY_BYTES / median_ms(lambda: dst.copy_(src)) / 1e6


def time_steps(steps: Dict[str, Callable[[], object]], geometries: Sequence[Tuple[int, int]],
               timer: Callable[[Callable[[], object]], float]) -> Dict[str, Dict[str, float]]:
    """``{step: {"own": ms, "RxW": ms, ...}}``: each step at its own launch geometry and, for the kernels that have
    one, at each of ``geometries`` (set on its module for the call, restored after)."""
    import importlib

    from lighthouse_kernels.launch import Geometry

    times: Dict[str, Dict[str, float]] = {}
    for name, fn in steps.items():
        times[name] = {"own": timer(fn)}
        if name not in GEOMETRY_CONSTANTS:
            continue
        module_name, constant = GEOMETRY_CONSTANTS[name]
        module = importlib.import_module(f"lighthouse_kernels.{module_name}")
        own = getattr(module, constant)
        try:
            for rows, warps in geometries:
                setattr(module, constant, Geometry(rows, warps))
                times[name][f"{rows}x{warps}"] = timer(fn)
        finally:
            setattr(module, constant, own)
    return times


def summarize(times: Dict[str, Dict[str, float]], moved: Dict[str, Optional[int]],
              copy_gbs: float) -> List[Dict[str, object]]:
    """A row per step: its time, compulsory bytes, GB/s and fraction of the copy's bandwidth, and the fastest of the
    geometries timed (``own`` when none beats it)."""
    rows = []
    for name, by_geometry in times.items():
        ms = by_geometry["own"]
        row: Dict[str, object] = {"step": name, "ms": ms, "bytes": moved[name], "geometries": by_geometry}
        if moved[name] is not None:
            row["gbs"] = moved[name] / ms / 1e6
            row["of_copy"] = row["gbs"] / copy_gbs
        row["fastest"] = min(by_geometry, key=by_geometry.get)
        rows.append(row)
    return rows


def print_table(title: str, rows: Sequence[Dict[str, object]], copy_gbs: float) -> None:
    print(f"\n{title} (device copy: {copy_gbs:.0f} GB/s)")
    print(f"{'step':<14} {'ms':>8} {'GB':>8} {'GB/s':>7} {'of copy':>8}  fastest geometry")
    for row in rows:
        gb = "" if row["bytes"] is None else f"{row['bytes'] / 1e9:.2f}"
        gbs = f"{row['gbs']:.0f}" if "gbs" in row else ""
        of_copy = f"{row['of_copy']:.2f}" if "of_copy" in row else ""
        fastest = row["fastest"]
        if fastest != "own":
            fastest += f" ({row['geometries'][fastest]:.3f} ms)"
        print(f"{row['step']:<14} {row['ms']:>8.3f} {gb:>8} {gbs:>7} {of_copy:>8}  {fastest}")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heads", default="32/4,16/1", help="comma-separated query/kv heads, e.g. 32/8,8/8")
    parser.add_argument("--lengths", default="131072,1048576", help="comma-separated sequence lengths")
    parser.add_argument("--pyramid", default="growing", choices=PYRAMIDS)
    parser.add_argument("--geometries", default="", help="launch geometries to try, ROWSxWARPS, comma-separated")
    parser.add_argument("--out-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args(argv)
    try:
        args.layouts = parse_heads(args.heads)
        args.length_list = [int(x) for x in args.lengths.split(",")]
        args.geometry_list = parse_geometries(args.geometries)
    except ValueError as err:
        parser.error(str(err))
    return args


def measure(heads: int, kv_heads: int, n: int, kind: str, geometries: Sequence[Tuple[int, int]],
            device: torch.device, timer: Callable[[Callable[[], object]], float],
            copy_gbs: float) -> Dict[str, object]:
    """One series: random bf16 q ``[B, n, heads, D]`` and k/v ``[B, n, kv_heads, D]`` on ``device``, each step
    timed by ``timer`` (at its own geometry and at ``geometries``); prints its table and returns its record."""
    config = pyramid(n, kind)
    gen = torch.Generator(device=device).manual_seed(n)
    q, k, v = (torch.randn(B, n, h, D, device=device, generator=gen).to(DTYPE) for h in (heads, kv_heads, kv_heads))
    s = config.subsequence_length(n)
    times = time_steps(kernel_steps(q, k, v, config), geometries, timer)
    rows = summarize(times, compulsory_bytes(n, heads, kv_heads, config.levels, s), copy_gbs)
    print_table(f"{heads}/{kv_heads} heads, N={n}, L={config.levels}, S={s}", rows, copy_gbs)
    return {"H": heads, "H_kv": kv_heads, "N": n, "levels": config.levels, "S": s, "rows": rows}


def main() -> None:
    args = parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_kernels.py needs a CUDA GPU (the fused kernels); none is visible")
    import triton

    device = torch.device("cuda")
    copy_gbs = copy_bandwidth_gbs(device)
    gpu = torch.cuda.get_device_name()
    report = {"date": datetime.date.today().isoformat(), "gpu": gpu, "torch": torch.__version__,
              "triton": triton.__version__, "copy_gbs": copy_gbs, "pyramid": args.pyramid, "series": []}
    for heads, kv_heads in args.layouts:
        for n in args.length_list:
            report["series"].append(measure(heads, kv_heads, n, args.pyramid, args.geometry_list, device,
                                            median_ms, copy_gbs))
            torch.cuda.empty_cache()
    os.makedirs(args.out_dir, exist_ok=True)
    path = os.path.join(args.out_dir, f"kernels_{gpu.replace(' ', '_').replace('/', '_')}.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
