"""The dense-kernel policy of the core attentions (CPU): where it applies, the LIGHTHOUSE_DENSE_KERNEL knob, the
kernel SDPACoreAttention runs, and the Lighthouse layer handing its subsequence to an SDPA inner as it is."""

from __future__ import annotations

import dataclasses
import importlib.util

import pytest
import torch

pytest.importorskip("megatron.core")

from megatron.core.transformer.enums import AttnMaskType  # noqa: E402

from megatron_lighthouse import dense, lighthouse_attention, sdpa_core_attention  # noqa: E402
from megatron_lighthouse.dense import (  # noqa: E402
    DENSE_KERNEL_ENV,
    DENSE_KERNELS,
    dense_kernel_from_env,
    fused_kernel_applies,
    pick_fastest,
    sdpa_causal,
)
from megatron_lighthouse.sdpa_core_attention import SDPACoreAttention  # noqa: E402
from megatron_lighthouse.spec import get_gpt_layer_with_lighthouse_spec  # noqa: E402
from megatron_lighthouse.transformer_config import lighthouse_config_from_env  # noqa: E402

from megatron_utils import LIGHTHOUSE, SEQ, init_megatron, tiny_config  # noqa: E402

ACCEPTED = "auto, cudnn, flash, sdpa, fa2, fa3"
SETTINGS = dataclasses.replace(LIGHTHOUSE, rope="tokens")


@pytest.fixture(scope="module", autouse=True)
def _megatron():
    init_megatron()


@pytest.mark.parametrize("device, dtype, dropout, capturing, applies", [
    ("cuda", torch.bfloat16, 0.0, False, True),
    ("cuda", torch.float16, 0.0, False, True),
    ("cuda", torch.float32, 0.0, False, False),  # no cuDNN or flash kernel in fp32
    ("cuda", torch.bfloat16, 0.1, False, False),  # dropout: SDPA under Megatron's RNG tracker
    ("cuda", torch.bfloat16, 0.0, True, False),  # CUDA-graph capture: nothing to time
    ("cpu", torch.bfloat16, 0.0, False, False),
    ("cpu", torch.float32, 0.0, False, False),
])
def test_the_named_kernel_applies_on_cuda_in_half_precision_without_dropout_or_capture(device, dtype, dropout,
                                                                                        capturing, applies):
    assert fused_kernel_applies(device, dtype, dropout, capturing) is applies


def test_the_knob_defaults_to_auto_and_accepts_every_kernel_name_that_can_run():
    assert dense_kernel_from_env({}) == "auto"
    assert dense_kernel_from_env({DENSE_KERNEL_ENV: ""}) == "auto"
    for name in ("auto", "cudnn", "flash", "sdpa"):
        assert dense_kernel_from_env({DENSE_KERNEL_ENV: name}) == name
    assert set(DENSE_KERNELS) == set(ACCEPTED.split(", "))


@pytest.mark.parametrize("value", ["cudnn2", "CUDNN", "flash-attn"])
def test_a_bad_knob_is_one_line_naming_it_and_the_accepted_values(value):
    with pytest.raises(ValueError) as err:
        dense_kernel_from_env({DENSE_KERNEL_ENV: value})
    assert str(err.value) == f"{DENSE_KERNEL_ENV}={value!r}: must be one of {ACCEPTED}"


def test_the_knob_is_a_known_lighthouse_variable_and_a_near_miss_of_it_is_refused():
    """Megatron-LM's --spec path checks every LIGHTHOUSE_* variable: the knob passes, its misspelling would be
    silently ignored and is refused."""
    assert lighthouse_config_from_env({DENSE_KERNEL_ENV: "cudnn", "LIGHTHOUSE_TOPK": "1024"}).topk == 1024
    with pytest.raises(ValueError, match=r"^LIGHTHOUSE_DENSE_KERNL='cudnn': not a Lighthouse setting; did you mean "
                                         r"LIGHTHOUSE_DENSE_KERNEL\? \(the settings: LIGHTHOUSE_LEVELS, .*, "
                                         r"LIGHTHOUSE_DENSE_KERNEL; the other LIGHTHOUSE_\* variables: "):
        lighthouse_config_from_env({"LIGHTHOUSE_DENSE_KERNL": "cudnn"})


def test_a_flash_attention_kernel_that_is_not_installed_is_refused(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith("flash_attn") else real(name, *a))
    with pytest.raises(ValueError, match=rf"^{DENSE_KERNEL_ENV}='fa3': needs the flash_attn_interface package, which "
                                         r"is not installed"):
        dense_kernel_from_env({DENSE_KERNEL_ENV: "fa3"})
    with pytest.raises(ValueError, match=r"^dense='fa2': needs the flash_attn package"):
        dense.dense_attention("fa2")


def test_auto_times_a_long_shape_on_a_cut_of_it(monkeypatch):
    """A dense layer's full length would take minutes to time: the kernels see at most TIMING_MAX_LEN positions."""
    monkeypatch.setattr(dense, "TIMING_MAX_LEN", 32)
    seen = []

    def recording(q, k, v, scale):
        seen.append((tuple(q.shape), tuple(k.shape)))
        return sdpa_causal(q, k, v, scale)

    q = torch.randn(1, 2, 100, 8)
    assert pick_fastest({"recording": recording}, q, q, q, 0.5) == "recording"
    assert set(seen) == {((1, 2, 32, 8), (1, 2, 32, 8))}


def test_sdpa_core_attention_reads_the_knob_when_built(monkeypatch):
    monkeypatch.setenv(DENSE_KERNEL_ENV, "flash")
    assert SDPACoreAttention(tiny_config(), 3, AttnMaskType.causal, "self").dense_kernel == "flash"
    monkeypatch.delenv(DENSE_KERNEL_ENV)
    assert SDPACoreAttention(tiny_config(), 3, AttnMaskType.causal, "self").dense_kernel == "auto"
    monkeypatch.setenv(DENSE_KERNEL_ENV, "fast")
    with pytest.raises(ValueError) as err:
        SDPACoreAttention(tiny_config(), 3, AttnMaskType.causal, "self")
    assert str(err.value) == f"SDPACoreAttention (layer 3): {DENSE_KERNEL_ENV}='fast': must be one of {ACCEPTED}"


@pytest.fixture
def cudnn_where_applied(monkeypatch):
    """``LIGHTHOUSE_DENSE_KERNEL=cudnn`` (a CPU has no cuDNN kernel: running it raises) and the policy's verdict
    forced to ``verdict[0]``; returns ``(verdict, calls)``, the arguments each policy question was asked with."""
    monkeypatch.setenv(DENSE_KERNEL_ENV, "cudnn")
    verdict, calls = [True], []

    def applies(device_type, dtype, dropout_p, capturing):
        calls.append((device_type, dtype, dropout_p, capturing))
        return verdict[0]

    monkeypatch.setattr(sdpa_core_attention, "fused_kernel_applies", applies)
    return verdict, calls


def test_sdpa_core_attention_runs_the_named_kernel_exactly_where_the_policy_applies(cudnn_where_applied):
    verdict, calls = cudnn_where_applied
    core = SDPACoreAttention(tiny_config(attention_dropout=0.25), 3, AttnMaskType.causal, "self")
    q, kv = torch.randn(SEQ, 2, 4, 16), torch.randn(SEQ, 2, 4, 16)
    with pytest.raises(RuntimeError):  # the policy's cuDNN kernel ran (and has nothing to run on a CPU)
        core.eval()(q, kv, kv, None)
    assert calls == [("cpu", torch.float32, 0.0, False)]
    verdict[0] = False  # SDPA's own choice: causal attention, with dropout in training only
    reference = sdpa_causal(*(x.permute(1, 2, 0, 3) for x in (q, kv, kv)), 16**-0.5)
    torch.testing.assert_close(core(q, kv, kv, None), reference.permute(2, 0, 1, 3).reshape(SEQ, 2, 64))
    torch.manual_seed(0)
    dropped = core.train()(q, kv, kv, None)
    assert calls[-1] == ("cpu", torch.float32, 0.25, False)
    assert not torch.allclose(dropped, core.eval()(q, kv, kv, None))


def test_decoding_keeps_sdpa_kernels_whatever_the_policy(cudnn_where_applied):
    """After the prompt (no_mask) and continuing a cache (lower-right) SDPA's own kernels run, not the policy's."""
    _, calls = cudnn_where_applied
    core = SDPACoreAttention(tiny_config(num_query_groups=2), 3, AttnMaskType.causal, "self")
    q, kv = torch.randn(SEQ, 2, 4, 16), torch.randn(SEQ, 2, 2, 16)
    core(q[-1:], kv, kv, None, attn_mask_type=AttnMaskType.no_mask)
    core(q[-5:], kv, kv, None)
    assert calls == []


def _lighthouse_layer():
    """The local spec's Lighthouse core attention, built alone (q/k taken as they come: no rotary handover)."""
    spec = get_gpt_layer_with_lighthouse_spec(lighthouse=SETTINGS, use_transformer_engine=False)
    return spec.submodules.self_attention.submodules.core_attention(
        config=tiny_config(num_query_groups=2), layer_number=3, attn_mask_type=AttnMaskType.causal,
        attention_type="self")


def test_a_lighthouse_layer_hands_its_subsequence_to_the_sdpa_inner_as_it_is(monkeypatch):
    """No [S, B, H, D] copy for the local inner attention, and the same output and gradients as the round trip
    through the inner's Megatron contract (what the layer did before)."""
    layer = _lighthouse_layer()
    assert isinstance(layer.inner, SDPACoreAttention)
    seen = []
    direct = layer.inner.causal_attention

    def recording(q, k, v):
        seen.append([(tuple(x.shape), x.is_contiguous()) for x in (q, k, v)])
        return direct(q, k, v)

    monkeypatch.setattr(layer.inner, "causal_attention", recording)

    def round_trip(q, k, v, scale):
        b, h, s, d = q.shape
        sbhd = [x.permute(2, 0, 1, 3).contiguous() for x in (q, k, v)]
        return layer.inner(*sbhd, None, attn_mask_type=AttnMaskType.causal).view(s, b, h, d).permute(1, 2, 0, 3)

    gen = torch.Generator().manual_seed(3)
    query = torch.randn(SEQ, 2, 4, 16, generator=gen, requires_grad=True)
    key, value = (torch.randn(SEQ, 2, 2, 16, generator=gen, requires_grad=True) for _ in range(2))
    out = layer(query, key, value, None)
    grads = torch.autograd.grad(out.square().sum(), (query, key, value))
    subsequence = SETTINGS.subsequence_length(SEQ)
    assert seen == [[((2, 4, subsequence, 16), True)] * 3]
    expected = lighthouse_attention(*(x.transpose(0, 1) for x in (query, key, value)), config=SETTINGS,
                                    attention=round_trip).transpose(0, 1).reshape(SEQ, 2, 64)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, torch.autograd.grad(expected.square().sum(), (query, key, value))):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_a_lighthouse_layer_applies_its_inner_dropout_in_training_only():
    layer = _lighthouse_layer()
    layer.inner.dropout_p = 0.5
    q, kv = torch.randn(SEQ, 1, 4, 16), torch.randn(SEQ, 1, 2, 16)
    evaluated = layer.eval()(q, kv, kv, None)
    expected = lighthouse_attention(q.transpose(0, 1), kv.transpose(0, 1), kv.transpose(0, 1), config=SETTINGS)
    torch.testing.assert_close(evaluated, expected.transpose(0, 1).reshape(SEQ, 1, 64), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(layer.train()(q, kv, kv, None), evaluated)
