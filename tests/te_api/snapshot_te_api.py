"""Record the TransformerEngine API that tests/fake_te.py stands in for, read from a TE source tree with ``ast``.

Usage::

    python tests/te_api/snapshot_te_api.py TE_SOURCE_DIR [--version TAG] [--commit SHA] [--output PATH]

``TE_SOURCE_DIR`` is the root of a TransformerEngine checkout (or ``git archive`` of one): the directory holding
``transformer_engine/`` and ``build_tools/VERSION.txt`` (a release wheel's ``transformer_engine/`` with a
``build_tools/VERSION.txt`` of its version beside it serves too: the v2.20 entry was read from the 2.20.2 wheel). Nothing of TE is imported. The entry ``TAG`` (default:
the version in ``VERSION.txt``) of the JSON snapshot ``PATH`` (default: ``te_api.json`` next to this script) is
written or replaced; other entries are kept. An entry holds, for each class of :data:`TARGETS`, the file it was
found in and, per method, its parameters as ``{"name", "kind", "default"}`` (``kind``: an
``inspect.Parameter`` kind name; ``default``: the source text of the default, which for literals is their
``repr``, or ``null`` when there is none), and ``cp_comm_types``: the communication types TE's CP dispatcher
(``attn_forward_func_with_cp``) compares ``cp_comm_type`` against.
"""

from __future__ import annotations

import argparse
import ast
import json
import pathlib
import re
import subprocess
import sys
from typing import Dict, List, Optional, Sequence, Tuple

HERE = pathlib.Path(__file__).resolve().parent
DEFAULT_OUTPUT = HERE / "te_api.json"

_PT = "transformer_engine/pytorch"
_DPA = (f"{_PT}/attention/dot_product_attention/dot_product_attention.py", f"{_PT}/attention.py")
_CP = (f"{_PT}/attention/dot_product_attention/context_parallel.py", f"{_PT}/attention.py")

#: ``(key, candidate files (first found wins), class name, methods)``: what the fake stands in for. ``ops.*``
#: are the fusible operations TE's ``LayerNorm``/``RMSNorm`` modules hand their ``**kwargs`` to; the base module
#: and operation carry the checkpoint ``_extra_state`` methods.
TARGETS: Tuple[Tuple[str, Tuple[str, ...], str, Tuple[str, ...]], ...] = (
    ("DotProductAttention", _DPA, "DotProductAttention", ("__init__", "forward", "set_context_parallel_group")),
    ("Linear", (f"{_PT}/module/linear.py",), "Linear", ("__init__", "forward")),
    ("LayerNormLinear", (f"{_PT}/module/layernorm_linear.py",), "LayerNormLinear", ("__init__", "forward")),
    ("LayerNorm", (f"{_PT}/module/layernorm.py",), "LayerNorm", ("__init__",)),
    ("RMSNorm", (f"{_PT}/module/rmsnorm.py",), "RMSNorm", ("__init__",)),
    ("ops.LayerNorm", (f"{_PT}/ops/basic/layer_norm.py",), "LayerNorm", ("__init__",)),
    ("ops.RMSNorm", (f"{_PT}/ops/basic/rmsnorm.py",), "RMSNorm", ("__init__",)),
    ("TransformerEngineBaseModule", (f"{_PT}/module/base.py",), "TransformerEngineBaseModule",
     ("get_extra_state", "set_extra_state")),
    ("ops.BasicOperation", (f"{_PT}/ops/op.py",), "BasicOperation", ("get_extra_state", "set_extra_state")),
)

#: The function whose comparisons of ``cp_comm_type`` define the accepted communication types.
CP_DISPATCH = "attn_forward_func_with_cp"


def _parameters(fn: ast.FunctionDef) -> List[Dict[str, Optional[str]]]:
    """``fn``'s parameters in order, ``self`` included, as ``{"name", "kind", "default"}``."""
    args = fn.args
    positional = args.posonlyargs + args.args
    defaults = [None] * (len(positional) - len(args.defaults)) + list(args.defaults)
    out = []
    for i, (arg, default) in enumerate(zip(positional, defaults)):
        kind = "POSITIONAL_ONLY" if i < len(args.posonlyargs) else "POSITIONAL_OR_KEYWORD"
        out.append({"name": arg.arg, "kind": kind, "default": None if default is None else ast.unparse(default)})
    if args.vararg is not None:
        out.append({"name": args.vararg.arg, "kind": "VAR_POSITIONAL", "default": None})
    for arg, default in zip(args.kwonlyargs, args.kw_defaults):
        out.append({"name": arg.arg, "kind": "KEYWORD_ONLY",
                    "default": None if default is None else ast.unparse(default)})
    if args.kwarg is not None:
        out.append({"name": args.kwarg.arg, "kind": "VAR_KEYWORD", "default": None})
    return out


def _find_class(tree: ast.Module, name: str) -> Optional[ast.ClassDef]:
    """The module-level class ``name`` of ``tree`` (``None``: not defined there)."""
    return next((node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == name), None)


def _class_entry(root: pathlib.Path, files: Sequence[str], cls: str, methods: Sequence[str]) -> dict:
    for rel in files:
        path = root / rel
        if not path.is_file():
            continue
        node = _find_class(ast.parse(path.read_text(), filename=str(path)), cls)
        if node is None:
            continue
        defs = {item.name: item for item in node.body if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef))}
        missing = [m for m in methods if m not in defs]
        if missing:
            raise SystemExit(f"{rel}: class {cls} defines no {', '.join(missing)}")
        return {"file": rel, "methods": {m: _parameters(defs[m]) for m in methods}}
    raise SystemExit(f"class {cls} not found in any of {', '.join(files)} under {root}")


def _compared_strings(node: ast.AST, name: str) -> List[str]:
    """String constants that ``name`` is compared to (``==`` / ``in`` a literal list, tuple or set) in ``node``."""
    found = []
    for cmp in ast.walk(node):
        if not (isinstance(cmp, ast.Compare) and isinstance(cmp.left, ast.Name) and cmp.left.id == name):
            continue
        for op, right in zip(cmp.ops, cmp.comparators):
            if isinstance(op, ast.Eq) and isinstance(right, ast.Constant) and isinstance(right.value, str):
                found.append(right.value)
            elif isinstance(op, ast.In) and isinstance(right, (ast.List, ast.Tuple, ast.Set)):
                found += [e.value for e in right.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)]
    return found


def _cp_comm_types(root: pathlib.Path) -> List[str]:
    for rel in _CP:
        path = root / rel
        if not path.is_file():
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        fn = next((n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == CP_DISPATCH), None)
        if fn is not None:
            return sorted(set(_compared_strings(fn, "cp_comm_type")))
    raise SystemExit(f"{CP_DISPATCH} not found in any of {', '.join(_CP)} under {root}")


def _git_commit(root: pathlib.Path) -> Optional[str]:
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip() or None


def snapshot(root: pathlib.Path, commit: Optional[str] = None) -> dict:
    """The API entry of the TE source tree at ``root``."""
    version_file = root / "build_tools" / "VERSION.txt"
    if not version_file.is_file():
        raise SystemExit(f"{root}: no build_tools/VERSION.txt (not a TransformerEngine source tree?)")
    return {
        "version": version_file.read_text().strip(),
        "commit": commit or _git_commit(root),
        "classes": {key: _class_entry(root, files, cls, methods) for key, files, cls, methods in TARGETS},
        "cp_comm_types": _cp_comm_types(root),
    }


def _dump(data: dict) -> str:
    """``data`` as indented JSON with one line per parameter (diffs between versions stay readable)."""
    text = json.dumps(data, indent=1)
    # a parameter object {"name": .., "kind": .., "default": ..} spans 5 lines: fold it onto one
    return re.sub(r'\{\n\s*("name": [^\n]*)\n\s*("kind": [^\n]*)\n\s*("default": [^\n]*)\n\s*\}',
                  lambda m: "{" + " ".join(m.groups()) + "}", text) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=pathlib.Path, help="TransformerEngine source tree (holds transformer_engine/)")
    parser.add_argument("--version", help="entry name (default: build_tools/VERSION.txt)")
    parser.add_argument("--commit", help="commit the tree was taken from (default: git rev-parse HEAD there)")
    parser.add_argument("--output", type=pathlib.Path, default=DEFAULT_OUTPUT, help="JSON snapshot to update")
    args = parser.parse_args(argv)
    entry = snapshot(args.source, args.commit)
    tag = args.version or entry["version"]
    data = json.loads(args.output.read_text()) if args.output.is_file() else {"versions": {}}
    data["versions"][tag] = entry
    data["versions"] = dict(sorted(data["versions"].items()))
    args.output.write_text(_dump(data))
    print(f"{args.output}: wrote {tag} (TE {entry['version']}, commit {entry['commit']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
