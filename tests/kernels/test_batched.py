"""kernels/batched.py (the CPU attention: one padded gather for the batch) against kernels/reference.py."""

import pytest
import torch

from hf_paged.kernels import batched, reference
from tests.kernels.paged_inputs import attention_inputs, ragged_lengths


def check(q_lens, seq_lens, hq, hkv, d, block_size, dtype=torch.float32, window=None, softcap=None, seed=0,
          sinks=None, expand=None):
    inputs = {k: v.cpu() for k, v in attention_inputs(q_lens, seq_lens, hq, hkv, d, block_size, dtype, seed).items()}
    options = dict(scale=d**-0.5, sliding_window=window, softcap=softcap, sinks=sinks, expand=expand)
    out = batched.paged_attention(**inputs, **options)
    ref = reference.paged_attention(**inputs, **options)
    atol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out, ref, atol=atol, rtol=atol)
    return out


@pytest.mark.parametrize("hq, hkv, d, block_size", [(4, 4, 16, 4), (6, 2, 8, 8), (8, 1, 32, 16), (3, 3, 12, 5)])
def test_decode(hq, hkv, d, block_size):
    seq_lens = ragged_lengths(7, 10, 40, seed=hq + d)
    check([1] * 7, seq_lens, hq, hkv, d, block_size, seed=block_size)


@pytest.mark.parametrize("window, softcap", [(None, None), (3, None), (None, 5.0), (7, 2.0)])
def test_prefill_over_cached_prefixes(window, softcap):
    # new tokens over cached prefixes of other lengths, a plain prefill, a decode, and a sequence without queries
    q_lens, seq_lens = [5, 12, 1, 0, 3], [9, 12, 20, 14, 17]
    check(q_lens, seq_lens, 4, 2, 16, 4, window=window, softcap=softcap, seed=3)


def test_bfloat16_and_ragged_fallback(monkeypatch):
    check([1, 1, 2], [3, 30, 8], 4, 2, 16, 8, dtype=torch.bfloat16)
    seen = []
    monkeypatch.setattr(reference, "paged_attention", lambda *a, **k: seen.append(1) or torch.zeros_like(a[0]))
    inputs = attention_inputs([1] * 5, [2, 2, 2, 2, 200], 2, 2, 8, 4, torch.float32)
    batched.paged_attention(**inputs, scale=1.0)  # 5 x 200 gathered for 208 real tokens: too ragged
    assert seen == [1]


@pytest.mark.parametrize("softcap", [None, 4.0])
def test_attention_sinks(softcap):
    """Sinks (one logit a query head in each denominator, gpt-oss): the batched path against the reference, which
    the Triton kernels' tests also take as truth; and sinks far below every score change nothing."""
    q_lens, seq_lens = [5, 1, 3], [9, 20, 3]
    sinks = torch.tensor([3.0, -1.0, 0.5, 6.0])
    out = check(q_lens, seq_lens, 4, 2, 16, 4, softcap=softcap, seed=4, sinks=sinks, window=6)
    plain = check(q_lens, seq_lens, 4, 2, 16, 4, softcap=softcap, seed=4, window=6)
    assert not torch.allclose(out, plain)
    torch.testing.assert_close(check(q_lens, seq_lens, 4, 2, 16, 4, softcap=softcap, seed=4, window=6,
                                     sinks=torch.full((4,), -1e4)), plain)


class Expand(torch.nn.Module):
    """A latent cache's up-projection, as multi-head latent attention's `expand_kv`: a one-"head" latent k
    [B, 1, L, 8] and a shared rotary key v [B, 1, L, 4] become K [B, 3, L, 6 + 4] and V [B, 3, L, 5]."""

    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(8, 3 * (6 + 5), bias=False)

    def forward(self, latent, rot):
        batch, _, length, _ = latent.shape
        nope, value = self.up(latent).view(batch, length, 3, 11).transpose(1, 2).split([6, 5], dim=-1)
        return torch.cat([nope, rot.expand(-1, 3, -1, -1)], dim=-1), value


def test_latents_expanded_by_the_model(monkeypatch):
    """Cached latents expanded by the model's own function: batched (whole padded batch) and the reference (per
    sequence) agree, on the output's own head_dim (V's), with GQA over the expanded heads."""
    torch.manual_seed(0)
    expand = Expand()
    q_lens, seq_lens = [4, 1, 6], [10, 17, 6]
    inputs = {k: v.cpu() for k, v in attention_inputs(q_lens, seq_lens, 6, 1, 8, 4, torch.float32, 5).items()}
    inputs["value_cache"] = inputs["value_cache"][..., :4].contiguous()  # the rotary key: 4 wide
    inputs["query"] = torch.randn(11, 6, 10)  # queries as wide as the expanded keys
    with torch.no_grad():
        out = batched.paged_attention(**inputs, scale=0.3, expand=expand)
        ref = reference.paged_attention(**inputs, scale=0.3, expand=expand)
    assert out.shape == (11, 6, 5)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
