"""Triton KV write: store this step's new key/value rows into their cache slots (`reference.write_kv`)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _write_kv_kernel(
    key, value, key_cache, value_cache, slot_mapping,
    stride_kt, stride_kh, stride_vt, stride_vh, stride_cb, stride_ct, stride_ch,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, HEAD_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    token = tl.program_id(0)
    slot = tl.load(slot_mapping + token).to(tl.int64)
    if slot < 0:
        return
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, HEAD_PAD)
    mask = (heads < NUM_HEADS)[:, None] & (offs_d < HEAD_DIM)[None, :]  # (BLOCK_H, HEAD_PAD)
    dst = (slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_ct + heads[:, None] * stride_ch + offs_d[None, :]
    src_t = token.to(tl.int64)
    k = tl.load(key + src_t * stride_kt + heads[:, None] * stride_kh + offs_d[None, :], mask=mask)
    v = tl.load(value + src_t * stride_vt + heads[:, None] * stride_vh + offs_d[None, :], mask=mask)
    tl.store(key_cache + dst, k.to(key_cache.dtype.element_ty), mask=mask)
    tl.store(value_cache + dst, v.to(value_cache.dtype.element_ty), mask=mask)


def write_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Store key/value [num_tokens, num_kv_heads, head_dim] into the slots of `slot_mapping` (-1: skip).

    Args:
        key, value: [num_tokens, num_kv_heads, head_dim], any float dtype (cast to the cache's); head_dim contiguous.
        key_cache, value_cache: [num_blocks, block_size, num_kv_heads, head_dim], same shape and strides.
        slot_mapping: [num_tokens] int64 or int32, block_id * block_size + offset.
    NOTE: two tokens must not map to one slot (the reference keeps the last, here the winner is unspecified).
    """
    if key.dim() != 3 or key.shape != value.shape:
        raise ValueError(f"key and value must both be [num_tokens, num_kv_heads, head_dim], got "
                         f"{tuple(key.shape)} and {tuple(value.shape)}")
    if key_cache.dim() != 4 or key_cache.shape != value_cache.shape or key_cache.stride() != value_cache.stride():
        raise ValueError(f"key_cache and value_cache must be [num_blocks, block_size, num_kv_heads, head_dim] with "
                         f"equal strides, got {tuple(key_cache.shape)} {key_cache.stride()} and "
                         f"{tuple(value_cache.shape)} {value_cache.stride()}")
    num_tokens, num_heads, head_dim = key.shape
    if key_cache.shape[2:] != key.shape[1:]:
        raise ValueError(f"key heads/head_dim {tuple(key.shape[1:])} differ from the cache's "
                         f"{tuple(key_cache.shape[2:])}")
    if slot_mapping.dim() != 1 or slot_mapping.shape[0] != num_tokens:
        raise ValueError(f"slot_mapping must be [num_tokens={num_tokens}], got {tuple(slot_mapping.shape)}")
    if slot_mapping.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"slot_mapping must be int32 or int64, got {slot_mapping.dtype}")
    if not (key.dtype.is_floating_point and key_cache.dtype.is_floating_point):
        raise TypeError(f"key {key.dtype} and key_cache {key_cache.dtype} must be floating point")
    if key.stride(-1) != 1 or value.stride(-1) != 1 or key_cache.stride(-1) != 1:
        raise ValueError("head_dim must be the contiguous axis of key, value and the caches")
    for name, t in (("value", value), ("key_cache", key_cache), ("value_cache", value_cache),
                    ("slot_mapping", slot_mapping)):
        if t.device != key.device:
            raise ValueError(f"{name} is on {t.device}, key on {key.device}")
    if num_tokens == 0:
        return
    head_pad = triton.next_power_of_2(head_dim)
    block_h = min(triton.next_power_of_2(num_heads), max(1, 4096 // head_pad))  # <= 4096 elements a program
    grid = (num_tokens, triton.cdiv(num_heads, block_h))
    _write_kv_kernel[grid](
        key, value, key_cache, value_cache, slot_mapping.contiguous(),
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        NUM_HEADS=num_heads, HEAD_DIM=head_dim, BLOCK_H=block_h, HEAD_PAD=head_pad, BLOCK_SIZE=key_cache.shape[1],
        num_warps=4 if block_h * head_pad >= 1024 else 1,
    )
