"""kernels/batched.py (the CPU attention: one padded gather for the batch) against kernels/reference.py."""

import pytest
import torch

from hf_paged.kernels import batched, reference
from tests.kernels.paged_inputs import attention_inputs, ragged_lengths


def check(q_lens, seq_lens, hq, hkv, d, block_size, dtype=torch.float32, window=None, softcap=None, seed=0):
    inputs = {k: v.cpu() for k, v in attention_inputs(q_lens, seq_lens, hq, hkv, d, block_size, dtype, seed).items()}
    out = batched.paged_attention(**inputs, scale=d**-0.5, sliding_window=window, softcap=softcap)
    ref = reference.paged_attention(**inputs, scale=d**-0.5, sliding_window=window, softcap=softcap)
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
