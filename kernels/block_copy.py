"""Triton block copy for copy-on-write: key/value blocks src[i] -> dst[i] (`reference.copy_blocks`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl


@triton.jit
def _copy_blocks_kernel(key_cache, value_cache, src, dst, stride_b, BLOCK_NUMEL: tl.constexpr, CHUNK: tl.constexpr):
    pair = tl.program_id(0)
    offs = tl.program_id(1) * CHUNK + tl.arange(0, CHUNK)
    mask = offs < BLOCK_NUMEL
    src_off = tl.load(src + pair).to(tl.int64) * stride_b + offs
    dst_off = tl.load(dst + pair).to(tl.int64) * stride_b + offs
    tl.store(key_cache + dst_off, tl.load(key_cache + src_off, mask=mask), mask=mask)
    tl.store(value_cache + dst_off, tl.load(value_cache + src_off, mask=mask), mask=mask)


def _block_ids(ids: torch.Tensor | Sequence[int], name: str, device: torch.device) -> torch.Tensor:
    ids = torch.as_tensor(ids, device=device)
    if ids.dim() != 1 or ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name} must be a 1-d sequence of int block ids, got {ids.dtype} shape {tuple(ids.shape)}")
    return ids.contiguous()


def copy_blocks(
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    src: torch.Tensor | Sequence[int],
    dst: torch.Tensor | Sequence[int],
) -> None:
    """Copy whole blocks src[i] -> dst[i] in both caches [num_blocks, block_size, num_kv_heads, head_dim].

    NOTE: the dst blocks must be distinct and none may be a src block (copy-on-write gives fresh dst blocks);
    the pairs are copied in parallel.
    """
    if key_cache.dim() != 4 or key_cache.shape != value_cache.shape or key_cache.dtype != value_cache.dtype:
        raise ValueError(f"key_cache and value_cache must be [num_blocks, block_size, num_kv_heads, head_dim] of one "
                         f"dtype, got {tuple(key_cache.shape)} {key_cache.dtype} and "
                         f"{tuple(value_cache.shape)} {value_cache.dtype}")
    if key_cache.stride() != value_cache.stride():
        raise ValueError(f"key_cache strides {key_cache.stride()} differ from value_cache's {value_cache.stride()}")
    block_numel = key_cache[0].numel()
    if not key_cache[0].is_contiguous():
        raise ValueError(f"each cache block must be contiguous, strides {key_cache.stride()}")
    if value_cache.device != key_cache.device:
        raise ValueError(f"value_cache is on {value_cache.device}, key_cache on {key_cache.device}")
    src = _block_ids(src, "src", key_cache.device)
    dst = _block_ids(dst, "dst", key_cache.device)
    if src.shape != dst.shape:
        raise ValueError(f"src and dst must pair up: {src.shape[0]} src blocks, {dst.shape[0]} dst blocks")
    if src.numel() == 0:
        return
    chunk = min(4096, triton.next_power_of_2(block_numel))
    grid = (src.numel(), triton.cdiv(block_numel, chunk))
    _copy_blocks_kernel[grid](key_cache, value_cache, src, dst, key_cache.stride(0), BLOCK_NUMEL=block_numel,
                              CHUNK=chunk, num_warps=4)
