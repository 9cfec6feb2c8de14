"""Triton copy_blocks against kernels/reference.py."""

import pytest
import torch

from hf_paged.kernels import reference
from hf_paged.kernels.block_copy import copy_blocks
from tests.kernels.paged_inputs import DEVICE

on_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def check(num_blocks, block_size, num_heads, head_dim, dtype, num_pairs, seed=0, as_list=False):
    gen = torch.Generator().manual_seed(seed)
    shape = (num_blocks, block_size, num_heads, head_dim)
    caches = [torch.randn(shape, generator=gen).to(dtype).to(DEVICE) for _ in range(2)]
    order = torch.randperm(num_blocks, generator=gen)
    src, dst = order[:num_pairs], order[num_pairs : 2 * num_pairs]  # disjoint, as copy-on-write makes them
    ours = [c.clone() for c in caches]
    ref = [c.clone() for c in caches]
    if as_list:
        copy_blocks(*ours, src.tolist(), dst.tolist())
    else:
        copy_blocks(*ours, src.to(DEVICE), dst.to(DEVICE))
    reference.copy_blocks(*ref, src.to(DEVICE), dst.to(DEVICE))
    torch.testing.assert_close(ours, ref, atol=0, rtol=0)


@pytest.mark.parametrize("block_size", [8, 16, 32])
@pytest.mark.parametrize("num_heads, head_dim", [(1, 64), (3, 80), (2, 256)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_copy_blocks_matches_reference(block_size, num_heads, head_dim, dtype):
    check(9, block_size, num_heads, head_dim, dtype, num_pairs=3, seed=block_size + head_dim)


def test_copy_blocks_from_lists_and_empty():
    check(6, 8, 2, 64, torch.bfloat16, num_pairs=2, as_list=True)
    check(6, 8, 2, 64, torch.bfloat16, num_pairs=0)


def test_copy_blocks_rejects_bad_inputs():
    cache = torch.zeros(4, 8, 2, 64, device=DEVICE)
    with pytest.raises(ValueError, match="pair up"):
        copy_blocks(cache, cache.clone(), [0, 1], [2])
    with pytest.raises(ValueError, match="contiguous"):
        copy_blocks(cache.transpose(1, 2), cache.clone().transpose(1, 2), [0], [1])
    with pytest.raises(ValueError, match="int block ids"):
        copy_blocks(cache, cache.clone(), torch.zeros(1), torch.ones(1))


@pytest.mark.cuda
@on_gpu
def test_gpu_copy_blocks_large():
    check(4096, 16, 8, 128, torch.bfloat16, num_pairs=1000, seed=3)
