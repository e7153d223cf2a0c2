"""The main job: a tiny two-stage (Lighthouse -> dense) Megatron-Core GPT pretraining run on an embedded corpus.

``python -m megatron_lighthouse.demo --help`` lists the flags. Importing this package imports nothing heavy: its
names are loaded on first use (PEP 562), so that the command line can take Ctrl-C from its first moment.
"""

import importlib

__all__ = ["DemoConfig", "SettingsError", "load_corpus", "run_demo"]

#: Exit status after Ctrl-C (128 + SIGINT, as a shell reports it).
EXIT_INTERRUPTED = 130
#: What the command line prints when Ctrl-C stops it before the first training step.
INTERRUPTED_BEFORE_TRAINING = "interrupted before the first step: nothing was trained"

_EXPORTS = {"DemoConfig": "train", "SettingsError": "train", "load_corpus": "corpus", "run_demo": "train"}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
