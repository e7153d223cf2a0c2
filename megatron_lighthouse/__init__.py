"""megatron-lighthouse: Lighthouse attention (selection-based hierarchical attention) for Megatron-Core."""

from .attention import lighthouse_attention, select_indices
from .config import LighthouseConfig
from .context_parallel import cp_causal_attention
from .cp_layout import gather_from_cp, split_for_cp
from .schedule import LighthouseSchedule, lighthouse_enabled, set_lighthouse_enabled

__version__ = "0.1.0"

__all__ = ["lighthouse_attention", "select_indices", "LighthouseConfig", "LighthouseSchedule", "cp_causal_attention",
           "split_for_cp", "gather_from_cp", "set_lighthouse_enabled", "lighthouse_enabled", "__version__"]

#: Megatron-Core integration, imported on first use so that this package never needs megatron-core.
_MEGATRON_EXPORTS = {
    "LighthouseCoreAttention": "core_attention",
    "SDPACoreAttention": "sdpa_core_attention",
    "LighthouseTransformerConfig": "transformer_config",
    "dense_state_dict": "export",
    "save_dense_checkpoint": "export",
    "dense_spec_for": "export",
}


def __getattr__(name: str):
    if name in _MEGATRON_EXPORTS:
        import importlib

        return getattr(importlib.import_module(f".{_MEGATRON_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
