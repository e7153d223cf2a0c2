"""Shared helpers of the benchmark-script tests: load a script as a module, run Python in the repository root."""

from __future__ import annotations

import importlib.util
import pathlib
import subprocess
import sys
from types import ModuleType

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_benchmark(name: str) -> ModuleType:
    """``benchmarks/<name>.py`` imported as a module (the scripts are not a package); ``benchmarks/`` goes on
    ``sys.path`` as when a script runs, so that the modules shared by the scripts import."""
    if str(ROOT / "benchmarks") not in sys.path:
        sys.path.append(str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def run_python(*argv: str) -> subprocess.CompletedProcess:
    """``python *argv`` in its own process from the repository root (the scripts initialize torch.distributed,
    which must not leak into other tests)."""
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=300, cwd=ROOT)
