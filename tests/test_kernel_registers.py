"""Every fused kernel, compiled for sm_90 at its launch geometry, keeps its accumulators in registers.

A kernel whose ``[rows, D]`` fp32 tiles do not fit the registers of its warps spills them to local memory (a
stack frame in the cubin), which costs far more than the loads it does on purpose. Triton and its bundled ptxas
compile for a GPU without one, so this runs on the CPU: a child process (the interpreter switched off) compiles
each kernel with the geometry its launcher uses (``Geometry`` constants, ``pool_score_geometry``) at 3, 4 and 5
levels, and reads the registers, the stack size and the global loads and stores with the bundled ``cuobjdump``.

The compile is specialized as Triton's JIT specializes a call of the op with 32 query and 4 kv heads, bf16, D=128
and ``p = 4``: pointers 16-byte aligned and every integer argument a multiple of 16 (strides, lengths, ``D``),
except the kv heads and the group size. That specialization is what lets the loads of a row be 16-byte vectors
(``LDG.E.128``); without it the code and its register use are another kernel's. Run as a script, it prints the
table.
"""

from __future__ import annotations

import collections
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile
from typing import Tuple

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
HEAD_DIM = 128
POOLING_FACTOR = 4
LEVELS = (3, 4, 5)
#: Compiling the kernels takes about 25 s on two cores.
TIMEOUT_S = 600


#: Integer arguments that are not multiples of 16 in the call specialized (4 kv heads, 8 query heads per kv head).
NOT_MULTIPLES_OF_16 = {"H_KV", "group"}


def _signature(kernel, constexprs: dict) -> Tuple[dict, dict]:
    """Triton types of ``kernel``'s arguments (bf16 tensors, int64 positions, int32 inverse maps, fp32 scores,
    int32 scalars, the given constexprs) and the JIT's divisibility attributes (see the module docstring)."""
    pointers = {"idx_ptr": "*i64", "inv_ptr": "*i32", "s_ptr": "*fp32"}
    signature, attrs = {}, {}
    for i, name in enumerate(kernel.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        signature[name] = pointers.get(name, "*bf16") if name.endswith("_ptr") else "i32"
        if name not in NOT_MULTIPLES_OF_16:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, attrs


def _kernel_cases():
    """``(name, levels, jit function, constexprs, warps)`` for every fused kernel at its CUDA launch geometry."""
    import torch
    from lighthouse_kernels import gather, pool_score, scatter

    p, d = POOLING_FACTOR, HEAD_DIM
    for levels in LEVELS:
        span = p ** (levels - 1)
        pool_rows, pool_warps = pool_score.pool_score_geometry(torch.device("cuda"), levels, p)
        walk = {"BLOCK_D": d, "P": p, "LEVELS": levels}
        yield ("pool_score", levels, pool_score._pool_score_kernel, {"BLOCK_T": pool_rows, **walk}, pool_warps)
        rows, warps = gather.POOL_COARSEST_GEOMETRY
        yield ("pool_coarsest", levels, gather._pool_coarsest_kernel,
               {"BLOCK_S": rows, "BLOCK_D": d, "SPAN": span}, warps)
        rows, warps = gather.GATHER_FORWARD_GEOMETRY
        yield "gather_forward", levels, gather._gather_fwd_kernel, {"BLOCK_S": rows, **walk}, warps
        rows, warps = gather.GATHER_BACKWARD_GEOMETRY
        yield "gather_backward", levels, gather._gather_bwd_kernel, {"BLOCK_T": rows, **walk}, warps
        rows, warps = scatter.SCATTER_FORWARD_GEOMETRY
        yield "scatter_forward", levels, scatter._scatter_fwd_kernel, {"BLOCK_T": rows, **walk}, warps
        rows, warps = scatter.SCATTER_BACKWARD_GEOMETRY
        yield ("scatter_backward", levels, scatter._scatter_bwd_kernel,
               {"BLOCK_S": rows, "MAX_SPAN": span, **walk}, warps)


def _resource_usage(cubin: bytes, cuobjdump: pathlib.Path) -> dict:
    """``{"REG": n, "STACK": bytes, ..., "memory": {"LDG.E.128": count, ...}}`` of the one function in ``cubin``:
    cuobjdump's resource usage, and the global and local loads and stores of its SASS by width."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        usage_text, sass = (subprocess.run([str(cuobjdump), flag, file.name], check=True, capture_output=True,
                                           text=True).stdout for flag in ("--dump-resource-usage", "--dump-sass"))
    usage = {}
    for line in usage_text.splitlines():
        if "REG:" in line:
            for field in line.replace("Resource usage:", "").split():
                key, _, value = field.partition(":")
                if value.isdigit():
                    usage[key] = int(value)
    usage["memory"] = dict(collections.Counter(re.findall(r"\b(?:LDG\.E|STG\.E|LDL|STL)[\w.]*", sass)))
    return usage


def resident_warps(registers: int, warps: int, shared_bytes: int = 0) -> int:
    """Warps of one kernel an sm_90 SM holds at once: 65,536 registers (allocated per warp in units of 256, i.e.
    per thread rounded up to 8), 228 KiB of shared memory (1 KiB reserved per block), at most 32 blocks and 64
    warps. A memory-bound kernel hides its load latency with these warps."""
    per_warp = -(-registers // 8) * 8 * 32
    blocks = min(32, 65536 // (per_warp * warps), 233472 // (shared_bytes + 1024))
    return min(64, blocks * warps)


def compile_all() -> list:
    """Compile every case for sm_90 and return ``[{"kernel", "levels", "rows", "warps", "REG", "STACK", ...,
    "memory", "resident_warps"}]``."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    cuobjdump = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    target = GPUTarget("cuda", 90, 32)
    table = []
    for name, levels, kernel, constexprs, warps in _kernel_cases():
        signature, attrs = _signature(kernel, constexprs)
        source = ASTSource(kernel, signature, constexprs, attrs)
        compiled = triton.compile(source, target=target, options={"num_warps": warps})
        usage = _resource_usage(compiled.asm["cubin"], cuobjdump)
        rows = next(v for k, v in constexprs.items() if k in ("BLOCK_T", "BLOCK_S"))
        table.append({"kernel": name, "levels": levels, "rows": rows, "warps": warps, **usage,
                      "resident_warps": resident_warps(usage.get("REG", 255), warps, usage.get("SHARED", 0))})
    return table


#: The oldest Triton whose compile API (``ASTSource`` with named signatures and divisibility attributes) this uses;
#: checked with 3.6 (the GPU machine's) and 3.9.
OLDEST_TRITON = (3, 6)


def _bundled_tools_missing() -> str:
    try:
        import triton
    except ImportError as err:
        return f"Triton does not import here ({err})"
    if tuple(int(x) for x in triton.__version__.split(".")[:2]) < OLDEST_TRITON:
        return f"Triton {triton.__version__} is older than {'.'.join(map(str, OLDEST_TRITON))} (another compile API)"
    tools = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    missing = [tool for tool in ("ptxas", "cuobjdump") if not (tools / tool).is_file()]
    return f"Triton's NVIDIA backend has no bundled {', '.join(missing)}" if missing else ""


@pytest.mark.skipif(bool(_bundled_tools_missing()), reason=_bundled_tools_missing() or "-")
def test_no_kernel_spills_registers_at_its_launch_geometry():
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "kernels"), env.get("PYTHONPATH", "")])
    with tempfile.TemporaryDirectory() as cache:
        env["TRITON_CACHE_DIR"] = cache  # a fresh compile, never a cached cubin of other code
        result = subprocess.run([sys.executable, __file__, "--json"], env=env, capture_output=True, text=True,
                                timeout=TIMEOUT_S)
    assert result.returncode == 0, result.stderr[-4000:]
    table = json.loads(result.stdout)
    assert len(table) == 6 * len(LEVELS)
    assert all("STACK" in row and "REG" in row for row in table), table
    spilling = [row for row in table if row["STACK"] > 0 or any(op.startswith(("LDL", "STL")) for op in row["memory"])]
    assert not spilling, f"kernels with a stack frame (registers spilled to local memory): {spilling}"
    # every kernel moves its [rows, D] bf16 tiles as 16-byte vectors (the specialization above took effect)
    scalar = [row for row in table if not any(op.endswith(".128") for op in row["memory"])]
    assert not scalar, f"kernels without a 16-byte vector load or store: {scalar}"


def test_resident_warps_follow_the_register_file():
    assert resident_warps(32, 4) == 64  # 4,096 registers a block: 16 blocks
    assert resident_warps(180, 4) == 8  # 184 * 128 = 23,552 registers a block: 2 blocks
    assert resident_warps(126, 4) == 16
    assert resident_warps(48, 8) == 40  # 12,288 a block: 5 blocks
    assert resident_warps(16, 1) == 32  # the 32-block limit
    assert resident_warps(16, 4, shared_bytes=100 * 1024) == 8  # 2 blocks of 101 KiB


if __name__ == "__main__":
    rows = compile_all()
    if "--json" in sys.argv:
        print(json.dumps(rows))
    else:
        for row in rows:
            print(f"{row['kernel']:<18} L={row['levels']} rows={row['rows']:<4} warps={row['warps']} "
                  f"REG={row.get('REG')} STACK={row.get('STACK')} warps/SM={row['resident_warps']} {row['memory']}")
