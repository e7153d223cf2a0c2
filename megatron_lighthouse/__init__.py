"""megatron-lighthouse: Lighthouse attention (selection-based hierarchical attention) for Megatron-Core."""

from .attention import lighthouse_attention, select_indices
from .config import LighthouseConfig
from .context_parallel import cp_causal_attention
from .cp_layout import gather_from_cp, split_for_cp

__version__ = "0.1.0"

__all__ = ["lighthouse_attention", "select_indices", "LighthouseConfig", "cp_causal_attention", "split_for_cp",
           "gather_from_cp", "__version__"]
