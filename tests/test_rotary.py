"""RoPE of selected entries: Megatron's formula, entry positions, and what the dense kernel is handed."""

from __future__ import annotations

import math

import pytest
import torch
from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

from megatron_lighthouse import lighthouse_attention, select_indices
from megatron_lighthouse.attention import entry_positions
from megatron_lighthouse.rotary import apply_rotary, entry_rotary

SETTINGS = dict(levels=3, pooling_factor=4, topk=128)
N, H, D = 2048, 2, 16


def rope_table(n: int, rot_dim: int, interleaved: bool = False, theta: float = 10000.0) -> torch.Tensor:
    """Megatron's ``RotaryEmbedding`` angles for positions ``0..n-1``: ``[n, 1, 1, rot_dim]`` float32."""
    inv_freq = 1.0 / theta ** (torch.arange(0, rot_dim, 2, dtype=torch.float32) / rot_dim)
    freqs = torch.outer(torch.arange(n, dtype=torch.float32), inv_freq)
    emb = torch.stack((freqs, freqs), dim=-1).flatten(-2) if interleaved else torch.cat((freqs, freqs), dim=-1)
    return emb[:, None, None, :]


def _qkv(b: int = 1, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(b, N, H, D, generator=gen, dtype=torch.float64).float().requires_grad_(True)
            for _ in range(3)]


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("rot_dim", [D, D // 2])
def test_token_positions_give_megatrons_rope(interleaved, rot_dim):
    x = torch.randn(64, 2, H, D)  # [s, b, h, d], Megatron's layout
    freqs = rope_table(64, rot_dim, interleaved)
    want = _apply_rotary_pos_emb_bshd(x, freqs, rotary_interleaved=interleaved)  # Megatron's unfused RoPE
    torch.testing.assert_close(apply_rotary(x, freqs, interleaved), want, rtol=0, atol=0)
    # entry_rotary indexes the same table by position: [B, H, S, D] entries at positions 0..63 are the same rows
    got = entry_rotary(freqs, interleaved)(x.permute(1, 2, 0, 3), torch.arange(64).expand(2, H, 64))
    torch.testing.assert_close(got, want.permute(1, 2, 0, 3), rtol=0, atol=0)


def test_entry_positions_are_last_tokens_with_chunk_offsets():
    n, levels, p = 64, 3, 4  # pyramid of a 32-token chunk: 32 tokens, 8 entries of 4, 2 entries of 16
    indices = torch.tensor([[[0, 31, 32, 39, 40, 41]], [[5, 33, 41, 0, 1, 2]]])  # [B*chunks=2, H=1, S_c=6]
    got = entry_positions(indices, n, levels, p, chunks=2)
    assert got.shape == (1, 1, 12)
    assert got.tolist() == [[[0, 31, 3, 31, 15, 31,  # chunk 0: token 0, token 31, entry 0 of 4, 7 of 4, 0/1 of 16
                              32 + 5, 32 + 7, 32 + 31, 32, 33, 34]]]


def test_the_kernel_gets_pooled_raw_entries_rotated_at_their_last_token():
    """Spy on the dense kernel: each selected q/k entry is the mean of the raw tokens it covers, rotated by the
    angle of its last token; values are not rotated."""
    q, k, v = _qkv()
    freqs = rope_table(N, D)
    seen = {}

    def spy(qs, ks, vs, scale):
        seen.update(q=qs.detach(), k=ks.detach(), v=vs.detach())
        return torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale)

    lighthouse_attention(q, k, v, attention=spy, backend="torch", rotary=entry_rotary(freqs), **SETTINGS)
    indices = select_indices(q.detach(), k.detach(), backend="torch", **SETTINGS)[0]  # [H, S]
    sizes = [N, N // 4, N // 16]
    for h in range(H):
        for s in (0, 7, indices.shape[-1] // 2, indices.shape[-1] - 1):
            pos = int(indices[h, s])
            level = 0 if pos < sizes[0] else 1 if pos < sizes[0] + sizes[1] else 2
            j = pos - sum(sizes[:level])
            span = 4**level
            tokens = slice(j * span, (j + 1) * span)
            angle = freqs[(j + 1) * span - 1, 0, 0]
            for name, x in (("q", q), ("k", k)):
                raw = x.detach()[0, tokens, h].mean(0)
                want = raw * torch.cos(angle) + torch.cat((-raw[D // 2:], raw[:D // 2])) * torch.sin(angle)
                torch.testing.assert_close(seen[name][0, h, s], want, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(seen["v"][0, h, s], v.detach()[0, tokens, h].mean(0), rtol=1e-5, atol=1e-6)


def test_a_common_shift_of_positions_changes_nothing():
    """RoPE makes attention depend on relative positions only: q and k entries get the same position scheme, so
    angles of positions ``t + 1000`` give the output of ``t`` (and the selection does not see positions)."""
    q, k, v = _qkv()
    base = lighthouse_attention(q, k, v, backend="torch", rotary=entry_rotary(rope_table(N, D)), **SETTINGS)
    shifted = lighthouse_attention(q, k, v, backend="torch", rotary=entry_rotary(rope_table(N + 1000, D)[1000:]),
                                   **SETTINGS)
    torch.testing.assert_close(shifted, base, rtol=1e-4, atol=5e-5)  # fp32 angles of ~3000 rad: ~1e-5 off
    plain = lighthouse_attention(q, k, v, backend="torch", **SETTINGS)
    assert (plain - base).abs().max() > 1e-2  # the rotation does change the result


def test_zero_angles_are_no_rotation():
    q, k, v = _qkv()
    out = lighthouse_attention(q, k, v, backend="torch", rotary=entry_rotary(torch.zeros(N, 1, 1, D)), **SETTINGS)
    torch.testing.assert_close(out, lighthouse_attention(q, k, v, backend="torch", **SETTINGS), rtol=0, atol=0)


def test_triton_backend_matches_torch_with_rotary_forward_and_backward():
    q, k, v = _qkv()
    rotary = entry_rotary(rope_table(N, D))
    grads = []
    outs = []
    for backend in ("torch", "triton"):
        out = lighthouse_attention(q, k, v, backend=backend, rotary=rotary, **SETTINGS)
        dout = torch.ones_like(out) / math.sqrt(out.numel())
        grads.append(torch.autograd.grad(out, (q, k, v), dout))
        outs.append(out.detach())
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-5)
    for got, want in zip(grads[1], grads[0]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_chunked_selection_rotates_at_positions_in_the_whole_sequence():
    """With ``chunks=2`` (the CP semantics) the second chunk's entries are rotated at positions ``n/2 + t``:
    every position lies in its own chunk's half of the sequence, in causal order."""
    n = 2 * N
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, n, H, D, generator=gen) for _ in range(3))
    table = rope_table(n, D)
    positions = []

    def rotary(x, pos):
        positions.append(pos)
        return entry_rotary(table)(x, pos)

    lighthouse_attention(q, k, v, backend="torch", chunks=2, rotary=rotary, **dict(SETTINGS, topk=256))
    pos = positions[0][0, 0]
    half = pos.shape[0] // 2
    assert int(pos[:half].max()) < n // 2 <= int(pos[half:].min()) and int(pos.max()) < n
    assert bool((pos[:half].diff() >= 0).all()) and bool((pos[half:].diff() >= 0).all())


@pytest.mark.parametrize(
    "freqs,match",
    [
        (torch.zeros(N, 2, 1, D), r"freqs of shape \(2048, 2, 1, 16\): must be Megatron's \[s, 1, 1, R\]"),
        (torch.zeros(N, 1, D), r"freqs of shape \(2048, 1, 16\)"),
        (torch.zeros(N), r"freqs of shape \(2048,\)"),
        (torch.zeros(N, 1, 1, D - 1), r"freqs of shape \(2048, 1, 1, 15\): .*an even R >= 2"),
        (torch.zeros(N, 0), r"freqs of shape \(2048, 0\)"),
        (torch.zeros(0, 1, 1, D), r"freqs of shape \(0, 1, 1, 16\): .*s >= 1"),
        ([[0.0] * D] * N, r"freqs must be a torch.Tensor, got list"),
    ],
)
def test_entry_rotary_refuses_a_table_of_another_layout(freqs, match):
    with pytest.raises(ValueError, match=rf"entry_rotary: {match}"):
        entry_rotary(freqs)


@pytest.mark.parametrize("wrong", ["shape", "dtype", "device", "not a tensor"])
def test_a_rotary_returning_the_wrong_result_is_named(wrong):
    """The rotary's result, not the dense kernel's, is refused, and blamed on rotary=."""

    def rotary(x, positions):
        return {"shape": x[..., :-1], "dtype": x.double(), "device": x.to("meta"), "not a tensor": x.tolist()}[wrong]

    with pytest.raises(ValueError, match=r"rotary= returned .*; an entry rotary must return its x's shape, dtype and "
                                         r"device, \(1, 2, 1152, 16\) torch.float32 on cpu"):
        lighthouse_attention(*_qkv(), backend="torch", rotary=rotary, **SETTINGS)
