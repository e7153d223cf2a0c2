"""The main job: a tiny two-stage (Lighthouse -> dense) Megatron-Core GPT pretraining run on an embedded corpus.

``python -m megatron_lighthouse.demo --help`` lists the flags.
"""

from .corpus import load_corpus
from .train import DemoConfig, SettingsError, run_demo

__all__ = ["DemoConfig", "SettingsError", "load_corpus", "run_demo"]
