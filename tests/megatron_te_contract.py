"""Run in a fresh process: LighthouseCoreAttention over Megatron's ``TEDotProductAttention`` on the fake
TransformerEngine (tests/fake_te.py; strict TE v2.9 signatures), without context parallelism.

Prints the megatron-core and fake TE versions, then ``OK`` after checking how the inner TE attention is built and
driven; any failure raises.
"""

from __future__ import annotations

import fake_te

Fake = fake_te.install()

import torch  # noqa: E402
from megatron.core.extensions.transformer_engine import TEDotProductAttention  # noqa: E402
from megatron.core.transformer.spec_utils import get_module  # noqa: E402

from megatron_lighthouse import lighthouse_attention  # noqa: E402
from megatron_lighthouse.core_attention import LighthouseCoreAttention  # noqa: E402
from megatron_lighthouse.spec import get_gpt_layer_with_lighthouse_spec  # noqa: E402
from megatron_utils import LIGHTHOUSE, SEQ, init_megatron, tiny_config  # noqa: E402


def main() -> None:
    init_megatron()
    from megatron.core.transformer.enums import AttnMaskType

    cfg = tiny_config(num_query_groups=2)
    spec = get_gpt_layer_with_lighthouse_spec(cfg, use_transformer_engine=True)
    core_spec = spec.submodules.self_attention.submodules.core_attention
    assert core_spec.module is LighthouseCoreAttention
    assert get_module(core_spec.submodules.core_attention) is TEDotProductAttention
    core = core_spec(config=cfg, layer_number=3, attn_mask_type=AttnMaskType.causal, attention_type="self",
                     cp_comm_type="p2p", softmax_scale=None, pg_collection=None)
    assert isinstance(core.inner, Fake)
    init = [c[1] for c in Fake.calls if c[0] == "init"]
    assert len(init) == 1 and init[0]["num_attention_heads"] == 4 and init[0]["num_gqa_groups"] == 4, init
    assert init[0]["attn_mask_type"] == "causal" and init[0]["kv_channels"] == 16

    torch.manual_seed(0)
    q = torch.randn(SEQ, 2, 4, 16)
    k, v = torch.randn(SEQ, 2, 2, 16), torch.randn(SEQ, 2, 2, 16)
    out = core(q, k, v, None, attn_mask_type=AttnMaskType.causal)
    sub = LIGHTHOUSE.subsequence_length(SEQ)
    fwd = [c[1] for c in Fake.calls if c[0] == "forward"]
    assert len(fwd) == 1 and fwd[0]["query"] == (sub, 2, 4, 16) and fwd[0]["key"] == (sub, 2, 4, 16), fwd
    assert fwd[0]["attention_mask"] is None and fwd[0]["attn_mask_type"] == "causal"
    expected = lighthouse_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                    levels=LIGHTHOUSE.levels, pooling_factor=LIGHTHOUSE.pooling_factor,
                                    topk=LIGHTHOUSE.topk).transpose(0, 1).reshape(SEQ, 2, 64)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)

    core.enabled = False
    core(q, k, v, None, attn_mask_type=AttnMaskType.causal)
    fwd = [c[1] for c in Fake.calls if c[0] == "forward"]
    assert fwd[-1]["query"] == (SEQ, 2, 4, 16) and fwd[-1]["key"] == (SEQ, 2, 4, 16), fwd[-1]
    from megatron.core.package_info import __version__ as megatron_version

    print(f"megatron-core {megatron_version}, fake TransformerEngine {fake_te.TE_VERSION}")
    print("OK")


if __name__ == "__main__":
    main()
