"""``hybrid_pattern``: dense layers count the attention layers of a hybrid layer pattern (any megatron-core)."""

from __future__ import annotations

import importlib.util
import pathlib
import subprocess
import sys

import pytest

from megatron_lighthouse.config import LighthouseConfig
from megatron_lighthouse.hybrid_pattern import hybrid_attention_layers

PAPER = LighthouseConfig()  # dense_layers (0, 1, -2, -1)


@pytest.mark.parametrize("pattern, attention, lighthouse", [
    # the GPT model of 6 blocks: attention layers 1, 3, ..., 11; the middle two run Lighthouse
    ("*-" * 6, (1, 3, 5, 7, 9, 11), (5, 7)),
    # Mamba between the attention layers: the first two and last two *attention* layers stay dense
    ("M*M*M*M*M*M*", (2, 4, 6, 8, 10, 12), (6, 8)),
    # pipeline segments are not layers; the numbers run on across them (and across virtual stages)
    ("*-*-|*-*-|*-*-", (1, 3, 5, 7, 9, 11), (5, 7)),
    ("MM*-|M*E*|-M*-|*M--", (3, 6, 8, 11, 13), (8,)),
    # a multi-token-prediction part without attention layers is left out
    ("*-*-*-*-*-/MM/MM", (1, 3, 5, 7, 9), (5,)),
])
def test_dense_layers_count_attention_layers(pattern, attention, lighthouse):
    layers = hybrid_attention_layers(pattern, PAPER)
    assert layers.attention == attention and layers.lighthouse == lighthouse
    assert layers.dense == tuple(n for n in attention if n not in lighthouse)
    assert layers.num_layers == len(pattern.split("/")[0].replace("|", ""))


def test_a_gpt_pattern_keeps_the_gpt_layers_dense():
    """``*-`` per GPT block: attention layer i is GPT layer i, so the same layers run Lighthouse."""
    for dense_layers in [(0, 1, -2, -1), (0,), (), (3, -1)]:
        config = LighthouseConfig(dense_layers=dense_layers)
        gpt = sorted(config.dense_layer_set(8))
        layers = hybrid_attention_layers("*-" * 8, config)
        assert [(n - 1) // 2 for n in layers.dense] == gpt


def test_describe_names_the_hybrid_layer_numbers():
    assert hybrid_attention_layers("*-" * 8, PAPER).describe() == (
        "4 of 8 attention layers run Lighthouse (hybrid layers 5, 7, 9, 11); dense: 1, 3, 13, 15")
    assert hybrid_attention_layers("M*" * 2, LighthouseConfig(dense_layers=())).describe() == (
        "2 of 2 attention layers run Lighthouse (hybrid layers 2, 4); dense: none")


@pytest.mark.parametrize("pattern, config, message", [
    # fewer than five attention layers with the paper's rule: refused as for GPT
    ("*-" * 4, PAPER, "keeps all 4 attention layers (hybrid layers 1, 3, 5, 7) dense: no layer would run Lighthouse"),
    ("M*M*M", PAPER, "keeps all 2 attention layers (hybrid layers 2, 4) dense"),
    ("M*M", PAPER, "LighthouseConfig.dense_layers entry 1: out of range for a model of 1 attention layers"),
    ("MMM-", LighthouseConfig(dense_layers=()), "no attention layer ('*') in its main part"),
    ("*-" * 6 + "/*-", PAPER, "its multi-token-prediction part ('/*-') has attention layers ('*')"),
    (None, PAPER, "None: not a string"),
])
def test_patterns_without_a_lighthouse_layer_are_refused(pattern, config, message):
    with pytest.raises(ValueError) as err:
        hybrid_attention_layers(pattern, config)
    assert message in str(err.value)


def test_resolved_once_per_pattern_and_settings():
    assert hybrid_attention_layers("*-" * 6, PAPER) is hybrid_attention_layers("*-" * 6, LighthouseConfig())


def test_the_module_needs_only_the_standard_library():
    """The launch examples load it by path, without torch (a login node)."""
    path = pathlib.Path(importlib.util.find_spec("megatron_lighthouse.hybrid_pattern").origin)
    code = ("import importlib.util, sys; spec = importlib.util.spec_from_file_location('p', sys.argv[1]); "
            "m = sys.modules['p'] = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); "
            "print('torch' in sys.modules, m.ATTENTION)")
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["False", "*"], out.stderr
