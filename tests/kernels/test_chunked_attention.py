"""Chunked attention (Llama4's attention_chunk_size) in every attention path: the reference against Hugging Face's
chunked mask, the CPU batch against the reference, the Triton kernels (decode, prefill, the step's own K/V)
against the reference."""

import dataclasses

import pytest
import torch
from transformers.masking_utils import chunked_causal_mask_function

from hf_paged.kernels import batched, reference
from hf_paged.kernels.paged_attention import DecodeConfig, PrefillConfig, paged_attention
from hf_paged.kernels.tuning import default_prefill_config
from tests.kernels.paged_inputs import DEVICE, TOLERANCES, attention_inputs, ragged_lengths
from tests.kernels.test_paged_attention import check_new_kv

CHUNKS = [1, 5, 16, 100]
_REFERENCE, _TRITON = reference.paged_attention, paged_attention


def _inputs(q_lens, seq_lens, hq, hkv, d, block_size, dtype, seed):
    return attention_inputs(q_lens, seq_lens, hq, hkv, d, block_size, dtype, seed)


def test_reference_is_hugging_face_chunked_mask():
    """One sequence, no padding: the reference's visibility is transformers' chunked causal mask function."""
    chunk, seq_len, q_len = 5, 23, 9
    inputs = {k: v.cpu() for k, v in _inputs([q_len], [seq_len], 2, 1, 16, 4, torch.float32, 0).items()}
    out = reference.paged_attention(**inputs, scale=0.25, chunk_size=chunk)
    mask_fn = chunked_causal_mask_function(chunk, torch.zeros(1, dtype=torch.long))
    k = reference.gather_kv(inputs["key_cache"], inputs["block_tables"][0], seq_len).transpose(0, 1)
    v = reference.gather_kv(inputs["value_cache"], inputs["block_tables"][0], seq_len).transpose(0, 1)
    q = inputs["query"].transpose(0, 1)  # (Hq, Q, D)
    visible = torch.tensor([[bool(mask_fn(*(torch.tensor(x) for x in (0, 0, seq_len - q_len + i, j))))
                             for j in range(seq_len)] for i in range(q_len)])
    k, v = k.repeat_interleave(2, 0), v.repeat_interleave(2, 0)
    scores = (q @ k.transpose(1, 2) * 0.25).masked_fill(~visible, float("-inf"))
    expected = (torch.softmax(scores, -1) @ v).transpose(0, 1)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("chunk", CHUNKS)
def test_batched_matches_reference(chunk):
    q_lens, seq_lens = [5, 12, 1, 0, 3], [9, 12, 20, 14, 17]
    inputs = {k: v.cpu() for k, v in _inputs(q_lens, seq_lens, 4, 2, 16, 4, torch.float32, 3).items()}
    out = batched.paged_attention(**inputs, scale=0.25, chunk_size=chunk)
    ref = reference.paged_attention(**inputs, scale=0.25, chunk_size=chunk)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def check(q_lens, seq_lens, hq, hkv, d, block_size, dtype, chunk, seed=0, softcap=None, config=None):
    inputs = _inputs(q_lens, seq_lens, hq, hkv, d, block_size, dtype, seed)
    scale = d**-0.5
    out = paged_attention(**inputs, scale=scale, softcap=softcap, chunk_size=chunk, config=config)
    ref = reference.paged_attention(**inputs, scale=scale, softcap=softcap, chunk_size=chunk)
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(out, ref, atol=atol, rtol=rtol)


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_chunked(chunk, num_splits):
    # positions at, just past and well inside chunk boundaries
    check([1] * 5, [1, 16, 17, 40, 61], 4, 2, 64, 8, torch.float32, chunk, seed=7,
          config=DecodeConfig(block_n=16, num_splits=num_splits, num_warps=1, num_stages=1))


@pytest.mark.parametrize("chunk", CHUNKS)
def test_prefill_chunked(chunk):
    q_lens = [19, 5, 33, 1]
    check(q_lens, [19, 30, 50, 9], 4, 1, 64, 8, torch.float32, chunk, seed=11, softcap=2.0 if chunk == 5 else None,
          config=PrefillConfig(block_m=16, block_n=16, num_warps=1, num_stages=1))


def _check_new_kv_chunked(monkeypatch, chunk, *args, **kwargs):
    """check_new_kv (the step's own K/V apart, its slots poisoned) with chunk_size given to the kernel and the
    reference."""
    from tests.kernels import test_paged_attention as t

    monkeypatch.setattr(t, "paged_attention", lambda *a, **k: _TRITON(*a, **k, chunk_size=chunk))
    monkeypatch.setattr(t.reference, "paged_attention", lambda *a, **k: _REFERENCE(*a, **k, chunk_size=chunk))
    check_new_kv(*args, **kwargs)


@pytest.mark.parametrize("chunk", [1, 5, 16])
@pytest.mark.parametrize("splits, fused", [(1, True), (3, True), (3, False)])
def test_decode_own_kv_chunked(monkeypatch, chunk, splits, fused):
    config = DecodeConfig(block_n=16, num_splits=splits, num_warps=1, num_stages=1, fused_reduce=fused)
    _check_new_kv_chunked(monkeypatch, chunk, [1] * 5, [1, 2, 17, 33, 40], 4, 2, 64, 8, torch.float32, seed=5,
                          config=config, write=True)


@pytest.mark.parametrize("chunk", [1, 5, 16, 24])
@pytest.mark.parametrize("fresh", [False, True])
def test_prefill_own_kv_chunked(monkeypatch, chunk, fresh):
    q_lens = [19, 5, 33]
    seq_lens = q_lens if fresh else [19, 30, 50]
    config = dataclasses.replace(default_prefill_config(4, 64, torch.device(DEVICE)), block_m=16, block_n=16)
    _check_new_kv_chunked(monkeypatch, chunk, q_lens, seq_lens, 4, 1, 64, 8, torch.float32, seed=12, write=True,
                          fresh=fresh, config=config)


def test_chunk_and_window_are_exclusive():
    inputs = _inputs([1], [4], 2, 1, 16, 4, torch.float32, 0)
    with pytest.raises(ValueError, match="chunk_size"):
        paged_attention(**inputs, scale=0.25, sliding_window=3, chunk_size=2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("chunk", [64, 8192])
def test_gpu_chunked_long(dtype, chunk):
    seq_lens = ragged_lengths(6, 100, 3000, seed=chunk)
    check([1] * 6, seq_lens, 32, 8, 128, 16, dtype, chunk, seed=1)
    q_lens = [min(s, 257) for s in seq_lens]
    check(q_lens, seq_lens, 32, 8, 128, 16, dtype, chunk, seed=2)
