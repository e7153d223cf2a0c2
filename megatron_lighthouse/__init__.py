"""megatron-lighthouse: Lighthouse attention (selection-based hierarchical attention) for Megatron-Core."""

from .attention import lighthouse_attention, select_indices
from .config import LighthouseConfig

__version__ = "0.1.0"

__all__ = ["lighthouse_attention", "select_indices", "LighthouseConfig", "__version__"]
