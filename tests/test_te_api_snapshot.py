"""tests/te_api: the recorded TransformerEngine API and the script that records it.

* The script reads parameters (kinds and defaults included) and CP communication types from source with ``ast``.
* ``TE_SOURCE_TREES="v2.9=/path/to/te-2.9,v2.20=/path/to/te-2.20,main=/path/to/te-main"`` (TE checkouts or ``git archive`` trees):
  regenerating from them gives the checked-in snapshot (skipped without the variable; TE is not vendored).
* Every other recorded TE version keeps what Megatron relies on in the version the fake models: each parameter,
  its kind and default (a required one may become optional), and the positions Megatron passes positionally.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

import fake_te

HERE = pathlib.Path(__file__).resolve().parent
SCRIPT = HERE / "te_api" / "snapshot_te_api.py"
SNAPSHOT = json.loads((HERE / "te_api" / "te_api.json").read_text())

#: ``(class, method) -> leading parameters (self included) Megatron passes positionally``; the rest go by keyword
#: (megatron/core/extensions/transformer_engine.py: ``super().forward(query, key, value, attention_mask, **kw)``,
#: ``super().set_context_parallel_group(group, ranks, stream, comm_type)``, ``super().forward(x, is_first_...=)``).
POSITIONAL_USE = {("DotProductAttention", "forward"): 5, ("DotProductAttention", "set_context_parallel_group"): 5,
                  ("Linear", "forward"): 2, ("LayerNormLinear", "forward"): 2}


def _run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120)


def _write(root: pathlib.Path, rel: str, source: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(source))


def test_script_records_parameters_from_source(tmp_path):
    pt = "transformer_engine/pytorch"
    _write(tmp_path, "build_tools/VERSION.txt", "9.9.0.dev0\n")
    _write(tmp_path, f"{pt}/attention/dot_product_attention/dot_product_attention.py", '''
        class DotProductAttention(Base):
            def __init__(self, heads: int, kv_channels, /, dropout: float = 0.0, *args, fmt="sbhd", eps=1e-5,
                         scale=None, **kwargs) -> None:
                pass
            def forward(self, q, k=None, *, mask_type: str = "causal"):
                pass
            def set_context_parallel_group(self, group, ranks, stream, comm="p2p"):
                pass
    ''')
    _write(tmp_path, f"{pt}/attention/dot_product_attention/context_parallel.py", '''
        def attn_forward_func_with_cp(q, cp_comm_type):
            if cp_comm_type == "a2a+p2p":
                assert cp_comm_type in ["a2a", "all_gather"] or other == "x"
            if cp_comm_type in ("p2p", "a2a+p2p"):
                pass
            elif cp_comm_type != "ignored":
                pass
    ''')
    for rel, cls in (("module/linear.py", "Linear"), ("module/layernorm_linear.py", "LayerNormLinear")):
        _write(tmp_path, f"{pt}/{rel}",
               f"class {cls}:\n    def __init__(self, a): pass\n    def forward(self, x): pass\n")
    for rel, cls in (("module/layernorm.py", "LayerNorm"), ("module/rmsnorm.py", "RMSNorm"),
                     ("ops/basic/layer_norm.py", "LayerNorm"), ("ops/basic/rmsnorm.py", "RMSNorm")):
        _write(tmp_path, f"{pt}/{rel}",
               f"class Other:\n    pass\nclass {cls}(Base):\n    def __init__(self, n, *, eps=1e-5): pass\n")
    for rel, cls in (("module/base.py", "TransformerEngineBaseModule"), ("ops/op.py", "BasicOperation")):
        _write(tmp_path, f"{pt}/{rel}", f"class {cls}:\n    def get_extra_state(self): pass\n"
                                        f"    def set_extra_state(self, state): pass\n")
    out = tmp_path / "snap.json"
    result = _run_script(str(tmp_path), "--commit", "abc123", "--output", str(out))
    assert result.returncode == 0, result.stderr
    entry = json.loads(out.read_text())["versions"]["9.9.0.dev0"]  # tag defaults to VERSION.txt
    assert entry["version"] == "9.9.0.dev0" and entry["commit"] == "abc123"
    assert entry["cp_comm_types"] == ["a2a", "a2a+p2p", "all_gather", "p2p"], entry["cp_comm_types"]
    init = entry["classes"]["DotProductAttention"]["methods"]["__init__"]
    assert [(p["name"], p["kind"], p["default"]) for p in init] == [
        ("self", "POSITIONAL_ONLY", None), ("heads", "POSITIONAL_ONLY", None), ("kv_channels", "POSITIONAL_ONLY", None),
        ("dropout", "POSITIONAL_OR_KEYWORD", "0.0"), ("args", "VAR_POSITIONAL", None),
        ("fmt", "KEYWORD_ONLY", "'sbhd'"), ("eps", "KEYWORD_ONLY", "1e-05"), ("scale", "KEYWORD_ONLY", "None"),
        ("kwargs", "VAR_KEYWORD", None)], init
    forward = entry["classes"]["DotProductAttention"]["methods"]["forward"]
    assert [(p["name"], p["default"]) for p in forward] == [("self", None), ("q", None), ("k", "None"),
                                                            ("mask_type", "'causal'")]
    assert entry["classes"]["ops.RMSNorm"]["file"] == f"{pt}/ops/basic/rmsnorm.py"

    # a second tag goes next to the first; a missing method is an error naming it
    result = _run_script(str(tmp_path), "--version", "other", "--output", str(out))
    assert result.returncode == 0 and sorted(json.loads(out.read_text())["versions"]) == ["9.9.0.dev0", "other"]
    _write(tmp_path, f"{pt}/module/linear.py", "class Linear:\n    def __init__(self): pass\n")
    result = _run_script(str(tmp_path), "--output", str(out))
    assert result.returncode != 0 and "class Linear defines no forward" in result.stderr, result.stderr


def _trees() -> dict:
    spec = os.environ.get("TE_SOURCE_TREES", "")
    return dict(item.split("=", 1) for item in spec.split(",") if item)


@pytest.mark.skipif(not _trees(), reason="set TE_SOURCE_TREES=tag=dir,... to regenerate from TE source trees")
def test_checked_in_snapshot_regenerates(tmp_path):
    out = tmp_path / "snap.json"
    for tag, tree in _trees().items():
        recorded = SNAPSHOT["versions"][tag]
        commit = ["--commit", recorded["commit"]] if recorded["commit"] else []  # none: a wheel's sources
        result = _run_script(tree, "--version", tag, *commit, "--output", str(out))
        assert result.returncode == 0, result.stderr
        assert json.loads(out.read_text())["versions"][tag] == recorded, f"{tag}: the snapshot is stale; regenerate it"


@pytest.mark.parametrize("tag", sorted(t for t in SNAPSHOT["versions"] if t != fake_te.SNAPSHOT_TAG))
def test_other_te_versions_keep_what_megatron_uses(tag):
    """Parameters may be added; none of the modelled version may go, change kind or change a default (a required
    one may become optional), and the leading positions Megatron passes positionally must stay."""
    modelled = SNAPSHOT["versions"][fake_te.SNAPSHOT_TAG]["classes"]
    other = SNAPSHOT["versions"][tag]["classes"]
    problems = []
    for cls, entry in modelled.items():
        for method, params in entry["methods"].items():
            theirs = {p["name"]: p for p in other[cls]["methods"][method]}
            for p in params:
                q = theirs.get(p["name"])
                if q is None:
                    problems.append(f"{cls}.{method}: {p['name']} removed")
                elif q["kind"] != p["kind"] or (p["default"] is not None and q["default"] != p["default"]):
                    problems.append(f"{cls}.{method}: {p['name']} {p['kind']}={p['default']} -> "
                                    f"{q['kind']}={q['default']}")
            keep = POSITIONAL_USE.get((cls, method), 1)
            ours = [p["name"] for p in params[:keep]]
            if [p["name"] for p in other[cls]["methods"][method][:keep]] != ours:
                problems.append(f"{cls}.{method}: leading parameters {ours} moved")
    assert not problems, f"TE {tag} differs from {fake_te.SNAPSHOT_TAG} where Megatron relies on it:\n" + \
        "\n".join(problems)
