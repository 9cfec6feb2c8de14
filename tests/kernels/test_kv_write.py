"""Triton write_kv against kernels/reference.py."""

import pytest
import torch

from hf_paged.kernels import reference
from hf_paged.kernels.kv_write import write_kv
from tests.kernels.paged_inputs import DEVICE

on_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def check(num_tokens, num_blocks, block_size, num_heads, head_dim, dtype, cache_dtype=None, seed=0, skip_every=3):
    """Our cache contents equal the reference's bit for bit (within one ulp where a cast rounds on the interpreter)."""
    gen = torch.Generator().manual_seed(seed)
    cache_dtype = cache_dtype or dtype
    # Distinct random slots, every skip_every-th token marked -1 (padding).
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slots[::skip_every] = -1
    key = torch.randn(num_tokens, num_heads, head_dim, generator=gen).to(dtype)
    value = torch.randn(num_tokens, num_heads, head_dim, generator=gen).to(dtype)
    shape = (num_blocks, block_size, num_heads, head_dim)
    caches = [torch.randn(shape, generator=gen).to(cache_dtype) for _ in range(2)]  # untouched slots stay as drawn
    key, value, slots = key.to(DEVICE), value.to(DEVICE), slots.to(DEVICE)
    ours = [c.clone().to(DEVICE) for c in caches]
    ref = [c.clone().to(DEVICE) for c in caches]
    write_kv(key, value, *ours, slots)
    reference.write_kv(key, value, *ref, slots)
    # NOTE: the CPU interpreter's float32 -> bfloat16 cast does not round to nearest even as the GPU does.
    rtol = 2**-7 if DEVICE == "cpu" and cache_dtype != dtype else 0
    torch.testing.assert_close(ours, ref, atol=0, rtol=rtol)


@pytest.mark.parametrize("block_size", [8, 16, 32])
@pytest.mark.parametrize("num_heads, head_dim", [(1, 64), (2, 80), (4, 128), (3, 256)])
def test_write_kv_matches_reference(block_size, num_heads, head_dim):
    check(13, 5, block_size, num_heads, head_dim, torch.float16, seed=block_size + head_dim)


@pytest.mark.parametrize("dtype, cache_dtype", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.bfloat16),
                                                 (torch.float32, torch.float32)])
def test_write_kv_casts_to_cache_dtype(dtype, cache_dtype):
    check(9, 3, 8, 2, 64, dtype, cache_dtype)


def test_write_kv_strided_inputs_and_int32_slots():
    # key/value as the attention hands them: [B, Hkv, Q, D] transposed to [Q, Hkv, D] (non-contiguous).
    gen = torch.Generator().manual_seed(1)
    key = torch.randn(1, 2, 7, 64, generator=gen)[0].transpose(0, 1).to(DEVICE)  # (7, 2, 64), strided
    value = torch.randn(1, 2, 7, 64, generator=gen)[0].transpose(0, 1).to(DEVICE)
    slots = torch.tensor([3, -1, 0, 17, 8, -1, 30], dtype=torch.int32, device=DEVICE)
    ours = [torch.zeros(4, 8, 2, 64, device=DEVICE) for _ in range(2)]
    ref = [c.clone() for c in ours]
    write_kv(key, value, *ours, slots)
    reference.write_kv(key, value, *ref, slots.long())
    torch.testing.assert_close(ours, ref, atol=0, rtol=0)


def test_write_kv_rejects_bad_inputs():
    key = torch.randn(4, 2, 64, device=DEVICE)
    cache = torch.zeros(2, 8, 2, 64, device=DEVICE)
    with pytest.raises(ValueError, match="slot_mapping"):
        write_kv(key, key, cache, cache.clone(), torch.zeros(3, dtype=torch.long, device=DEVICE))
    with pytest.raises(TypeError, match="slot_mapping"):
        write_kv(key, key, cache, cache.clone(), torch.zeros(4, device=DEVICE))
    with pytest.raises(ValueError, match="differ"):
        write_kv(key[:, :1], key[:, :1], cache, cache.clone(), torch.zeros(4, dtype=torch.long, device=DEVICE))


@pytest.mark.cuda
@on_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_write_kv_large(dtype):
    check(8192, 1024, 16, 8, 128, dtype, seed=2, skip_every=97)
