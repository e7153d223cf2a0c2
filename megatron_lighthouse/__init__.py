"""megatron-lighthouse: Lighthouse attention (selection-based hierarchical attention) for Megatron-Core.

Every name here is imported on first use (PEP 562): importing the package imports neither torch nor megatron-core
(the command lines take Ctrl-C from their first moment; the Megatron-Core names need megatron-core only when used).
A submodule is imported when first read as an attribute (``megatron_lighthouse.config``).
"""

import importlib
import importlib.util

__version__ = "0.1.0"

__all__ = ["lighthouse_attention", "select_indices", "LighthouseConfig", "LighthouseSchedule", "cp_causal_attention",
           "split_for_cp", "gather_from_cp", "set_lighthouse_enabled", "lighthouse_enabled", "__version__"]

#: Public name -> the module that defines it.
_EXPORTS = {
    "lighthouse_attention": "attention",
    "select_indices": "attention",
    "LighthouseConfig": "config",
    "cp_causal_attention": "context_parallel",
    "split_for_cp": "cp_layout",
    "gather_from_cp": "cp_layout",
    "LighthouseSchedule": "schedule",
    "lighthouse_enabled": "schedule",
    "set_lighthouse_enabled": "schedule",
    # the Megatron-Core integration
    "LighthouseCoreAttention": "core_attention",
    "SDPACoreAttention": "sdpa_core_attention",
    "LighthouseTransformerConfig": "transformer_config",
    "dense_state_dict": "export",
    "save_dense_checkpoint": "export",
    "dense_spec_for": "export",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted({*globals(), *_EXPORTS})
