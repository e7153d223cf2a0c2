"""``check_cp_comm_type``: the context-parallel communication types TransformerEngine accepts, and nothing else.

The accepted set is held to the one recorded from TE's own source (tests/te_api/te_api.json, the strings TE's CP
dispatcher ``attn_forward_func_with_cp`` compares ``cp_comm_type`` against) for every TE version recorded there.
"""

from __future__ import annotations

import json
import pathlib
import re

import pytest

from megatron_lighthouse.causal_core_attention import check_cp_comm_type

SNAPSHOT = json.loads((pathlib.Path(__file__).resolve().parent / "te_api" / "te_api.json").read_text())
TE_TYPES = {tag: entry["cp_comm_types"] for tag, entry in SNAPSHOT["versions"].items()}


@pytest.mark.parametrize("tag", sorted(TE_TYPES))
def test_every_te_type_is_accepted(tag):
    assert set(TE_TYPES[tag]) == {"p2p", "all_gather", "a2a", "a2a+p2p"}, (
        f"TE {tag} dispatches on {TE_TYPES[tag]}: check_cp_comm_type and the fake need updating")
    for cp in (1, 2, 8):
        for value in TE_TYPES[tag]:
            check_cp_comm_type(value, cp)  # no error
        check_cp_comm_type(list(TE_TYPES[tag]), cp)  # per-layer list


@pytest.mark.parametrize("cp", [1, 4])
def test_none_is_megatrons_default(cp):
    check_cp_comm_type(None, cp)
    check_cp_comm_type([None, "p2p"], cp)


#: TE's ``all_gather`` without its underscore: the spelling Megatron-LM's ``--cp-comm-type`` help advertises.
UNDERSCORELESS = "all_gather".replace("_", "")


@pytest.mark.parametrize("spelling", [UNDERSCORELESS, "AllGather", "all-gather", "ALL_GATHER"])
def test_other_spellings_of_all_gather_are_refused_with_te_spelling(spelling):
    with pytest.raises(ValueError) as err:
        check_cp_comm_type(spelling, 2)
    message = str(err.value)
    assert repr(spelling) in message, message
    assert "use 'all_gather'" in message, f"the message must name TE's spelling: {message}"
    assert "context_parallel_size=2" in message, message


@pytest.mark.parametrize("value", ["ring", "a2a+all_gather", "ulysses", "P2P ring", "", "p2p ", 2, b"p2p", {"p2p"}])
def test_other_values_are_refused(value):
    with pytest.raises(ValueError) as err:
        check_cp_comm_type(value, 2)
    message = str(err.value)
    assert f"cp_comm_type={value!r}" in message, message
    for accepted in ("'p2p'", "'all_gather'", "'a2a'", "'a2a+p2p'"):
        assert accepted in message, f"the message must list {accepted}: {message}"


def test_per_layer_list_names_the_bad_layer():
    check_cp_comm_type(("p2p", "a2a", "all_gather"), 2)
    with pytest.raises(ValueError, match=re.escape(f"cp_comm_type[2]='{UNDERSCORELESS}'")):
        check_cp_comm_type(["p2p", "a2a", UNDERSCORELESS, "p2p"], 2)


@pytest.mark.parametrize("size", [0, -1, 1.5, "2", True, None])
def test_context_parallel_size_must_be_a_positive_int(size):
    with pytest.raises(ValueError, match="context_parallel_size"):
        check_cp_comm_type("p2p", size)


def test_the_core_attentions_check_it_when_built():
    """Megatron passes ``--cp-comm-type`` through to the core attention: a value TE would refuse at its first
    forward is refused when the Lighthouse and the SDPA core attention are built, naming the layer."""
    pytest.importorskip("megatron.core")
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_lighthouse.core_attention import LighthouseCoreAttention, LighthouseCoreAttentionSubmodules
    from megatron_lighthouse.sdpa_core_attention import SDPACoreAttention
    from megatron_utils import init_megatron, tiny_config

    init_megatron()
    cfg = tiny_config()
    builds = {
        "LighthouseCoreAttention": lambda comm: LighthouseCoreAttention(
            cfg, 3, AttnMaskType.causal, "self", cp_comm_type=comm,
            submodules=LighthouseCoreAttentionSubmodules(core_attention=SDPACoreAttention)),
        "SDPACoreAttention": lambda comm: SDPACoreAttention(cfg, 3, AttnMaskType.causal, "self", cp_comm_type=comm),
    }
    for name, build in builds.items():
        build("all_gather")
        with pytest.raises(ValueError, match=re.escape(f"{name} (layer 3): cp_comm_type='{UNDERSCORELESS}'") +
                           r".*use 'all_gather'"):
            build(UNDERSCORELESS)
