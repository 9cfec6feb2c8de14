"""Triton prefill attention of fresh prompts (no cached context), warp-specialised on Hopper.

The engine's commonest prefill: prompts without a prefix-cache hit, whose keys are exactly the step's own K/V. Here
nothing is read through block tables, so every load can be a TMA tile: one program per (query tile, query head)
holds BLOCK_M tokens of one head, and walks the keys of its sequence from the first to its diagonal in one loop,
masking every tile causally.

Why a kernel of its own: triton 3.6 splits such a loop into a producer warpgroup (the TMA copies) and two consumer
warpgroups (64 rows each; wgmma and the softmax), the FlashAttention-3 scheme, but only for loops it can partition
(probed offline for sm_90, docs/kernels.md "Fresh prompts, warp-specialised"): every operand of the dots from a
tensor descriptor built in the kernel (`tl.make_tensor_descriptor`; descriptors built on the host, as
kernels/paged_prefill.py passes them, are not partitioned), one loop, and no branch in it (a tile masked only where
it crosses the diagonal, `if`, compiles unpartitioned). So every tile is masked (the prefill kernel masks only
the tiles crossing the diagonal).

The descriptors end at the sequence's last token: TMA reads rows past it as zeros and drops stores past it, so a
tile never touches the next sequence's rows. WRITE stores the tile's own K/V into its slots after the attention
(one query head of each group does, so each (token, KV head) is stored once). The descriptors live in a global
scratch buffer that triton asks an allocator for at each launch (`_scratch`).
"""

from __future__ import annotations

import threading

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
from triton.runtime import _allocation

from hf_paged.kernels.attention_tile import dot, row_max, row_sum
from hf_paged.kernels.paged_prefill import store_tile
from hf_paged.kernels.tuning import PrefillConfig, hopper_or_newer


@triton.jit
def _causal_tile(acc, m_i, l_i, q, q_pos, k_desc, v_desc, q_start, n0, qk_scale, BLOCK_N: tl.constexpr,
                 DOT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr):
    """One online-softmax step of the tile's rows over the keys [n0, n0 + BLOCK_N), masked causally."""
    k = k_desc.load([q_start + n0, 0])  # (BLOCK_N, HEAD_DIM)
    s = dot(q, tl.trans(k), None, DOT_PRECISION, INTERPRET)
    visible = (n0 + tl.arange(0, BLOCK_N))[None, :] <= q_pos[:, None]
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, row_max(s, 1) * qk_scale)
    p = tl.exp2(s * qk_scale - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    v = v_desc.load([q_start + n0, 0])
    acc = dot(p.to(v.dtype), v, acc * alpha[:, None], DOT_PRECISION, INTERPRET)
    return acc, m_new, l_i * alpha + row_sum(p, 1)


@triton.jit(do_not_specialize=["num_seqs"])
def _fresh_prefill_kernel(
    out, query, new_k, new_v, k_cache, v_cache, slot_mapping, cu_seqlens_q,
    stride_qt, stride_ot, stride_nt, stride_kb, stride_kt, stride_kh,
    qk_scale, num_seqs,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, DOT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
    WRITE: tl.constexpr, WRITE_Q: tl.constexpr, PDL: tl.constexpr,
    SEARCH_STEPS: tl.constexpr,  # ceil(log2(num_seqs)) at least (rounded up to 4s: fewer compilations)
):
    # Sequence s owns the programs from cu_seqlens_q[s] // BLOCK_M + s on, as in kernels/paged_prefill.py; the last
    # query tiles (the most keys) start first.
    program = tl.num_programs(0) - 1 - tl.program_id(0)
    head = tl.program_id(1)
    kv_head = head // GROUP
    # The sequence: the last s with cu_seqlens_q[s] // BLOCK_M + s <= program, by a binary search of SEARCH_STEPS
    # unrolled steps (a loop or an early return here and triton 3.6 no longer partitions the loop below).
    lo = num_seqs * 0
    hi = num_seqs
    for _ in tl.static_range(SEARCH_STEPS):
        active = lo + 1 < hi
        mid = (lo + hi) // 2
        right = tl.load(cu_seqlens_q + mid) // BLOCK_M + mid <= program
        lo = tl.where(active & right, mid, lo)
        hi = tl.where(active & ~right, mid, hi)
    seq = lo
    q_start = tl.load(cu_seqlens_q + seq)
    q_end = tl.load(cu_seqlens_q + seq + 1)
    tile = program - (q_start // BLOCK_M + seq)
    first = tile * BLOCK_M  # the tile's first position in its sequence; a spare program past the end runs no
    # loop and its stores fall past the descriptors' end (dropped) or are masked
    if PDL:  # see kernels/paged_prefill.py; the descriptors are written to scratch only after the kernel before
        gdc_wait()
        gdc_launch_dependents()
    q_desc = tl.make_tensor_descriptor(query + head * HEAD_DIM, shape=[q_end, HEAD_DIM], strides=[stride_qt, 1],
                                       block_shape=[BLOCK_M, HEAD_DIM])
    k_desc = tl.make_tensor_descriptor(new_k + kv_head * HEAD_DIM, shape=[q_end, HEAD_DIM], strides=[stride_nt, 1],
                                       block_shape=[BLOCK_N, HEAD_DIM])
    v_desc = tl.make_tensor_descriptor(new_v + kv_head * HEAD_DIM, shape=[q_end, HEAD_DIM], strides=[stride_nt, 1],
                                       block_shape=[BLOCK_N, HEAD_DIM])
    o_desc = tl.make_tensor_descriptor(out + head * HEAD_DIM, shape=[q_end, HEAD_DIM], strides=[stride_ot, 1],
                                       block_shape=[BLOCK_M, HEAD_DIM])
    q = q_desc.load([q_start + first, 0])  # (BLOCK_M, HEAD_DIM)
    q_pos = first + tl.arange(0, BLOCK_M)
    acc = tl.full([BLOCK_M, HEAD_DIM], 0.0, dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.full([BLOCK_M], 0.0, dtype=tl.float32)
    q_len = q_end - q_start
    last = tl.where(first < q_len, tl.minimum(first + BLOCK_M, q_len), 0)  # keys [0, last) reach the tile's rows
    # The first tile shows every row key 0, so the running max is finite from then on: no -inf guard.
    if INTERPRET:  # NOTE: the CPU interpreter cannot bound range() by tensors (kernels/attention_tile.py)
        n0 = last * 0
        while n0 < last:
            acc, m_i, l_i = _causal_tile(acc, m_i, l_i, q, q_pos, k_desc, v_desc, q_start, n0, qk_scale, BLOCK_N,
                                         DOT_PRECISION, INTERPRET)
            n0 += BLOCK_N
    else:
        # compiled only where it launches, Hopper and newer (fresh_prefill_fits)
        for n0 in tl.range(0, last, BLOCK_N, warp_specialize=True):
            acc, m_i, l_i = _causal_tile(acc, m_i, l_i, q, q_pos, k_desc, v_desc, q_start, n0, qk_scale, BLOCK_N,
                                         DOT_PRECISION, INTERPRET)
    o_desc.store([q_start + first, 0], (acc / l_i[:, None]).to(out.dtype.element_ty))
    if WRITE and head % GROUP == 0:
        offs_d = tl.arange(0, HEAD_DIM)
        store_tile(k_cache, v_cache, new_k, new_v, slot_mapping, q_start, q_len, tile, kv_head, stride_nt, HEAD_DIM,
                   stride_kb, stride_kt, stride_kh, offs_d, offs_d < HEAD_DIM, BLOCK_M, BLOCK_SIZE, WRITE_Q)

class _Scratch:
    """Triton's allocator for the in-kernel descriptors: one device buffer per device, grown, never freed.

    A CUDA graph keeps the address a launch was captured with, so the buffer must outlive every graph; a grown
    buffer keeps the old ones alive too. Launches on one stream run one after the other (under PDL the kernel writes
    its descriptors only after `gdc_wait`), so they can share it."""

    def __init__(self):
        self._lock = threading.Lock()
        self._buffers: dict[torch.device, list[torch.Tensor]] = {}

    def __call__(self, size: int, alignment: int, stream) -> torch.Tensor:
        device = torch.device("cuda", torch.cuda.current_device())
        with self._lock:
            kept = self._buffers.setdefault(device, [])
            if not kept or kept[-1].numel() < size + alignment:
                kept.append(torch.empty(max(size + alignment, 1 << 20), dtype=torch.uint8, device=device))
            buf = kept[-1]
        offset = -buf.data_ptr() % alignment
        return buf[offset:offset + size]


_scratch = _Scratch()


def fresh_prefill_fits(query, key, value, sliding_window, softcap) -> bool:
    """Whether `launch_fresh_prefill` takes these: a power-of-2 head_dim of at least 16, no window or soft-cap, and
    rows TMA can describe (16-byte aligned bases and row strides, heads packed), on Hopper or newer (TMA; or the CPU
    interpreter)."""
    head_dim = query.shape[-1]
    if query.device.type == "cuda" and not hopper_or_newer(query.device):
        return False
    if sliding_window is not None or softcap is not None or query.dtype == torch.float32:
        return False
    if head_dim < 16 or head_dim != triton.next_power_of_2(head_dim):
        return False
    return all(t.data_ptr() % 16 == 0 and t.stride(0) * t.element_size() % 16 == 0 and t.stride(1) == head_dim
               for t in (query, key, value))


def launch_fresh_prefill(out, query, key, value, key_cache, value_cache, slot_mapping, cu_seqlens_q, qk_scale,
                         num_seqs, common, cfg: PrefillConfig) -> None:
    """Grid (T // BLOCK_M + S, Hq). `common` gives GROUP, BLOCK_SIZE, DOT_PRECISION, INTERPRET and PDL as the
    launcher built them; slot_mapping None: store nothing. Only where `fresh_prefill_fits` (Hopper and newer: the
    loop is compiled warp-specialised)."""
    write = slot_mapping is not None
    grid = (query.shape[0] // cfg.block_m + num_seqs, query.shape[1])
    search_steps = -(-max(1, (num_seqs - 1).bit_length()) // 4) * 4
    # NOTE: triton 3.6 keeps its allocator in a ContextVar (`triton.set_allocator` sets it): set for this launch
    # only, and reset after, so a caller's own allocator (inductor's) stays in place.
    token = _allocation._allocator.set(_scratch)
    try:
        _fresh_prefill_kernel[grid](
            out, query, key, value, key_cache, value_cache, slot_mapping if write else cu_seqlens_q, cu_seqlens_q,
            query.stride(0), out.stride(0), key.stride(0), key_cache.stride(0), key_cache.stride(1),
            key_cache.stride(2), qk_scale, num_seqs, GROUP=common["GROUP"], BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
            HEAD_DIM=query.shape[-1], BLOCK_SIZE=common["BLOCK_SIZE"], DOT_PRECISION=common["DOT_PRECISION"],
            INTERPRET=common["INTERPRET"], WRITE=write, WRITE_Q=min(16, cfg.block_m), PDL=common["PDL"],
            SEARCH_STEPS=search_steps, num_warps=cfg.num_warps, num_stages=cfg.num_stages, launch_pdl=common["PDL"])
    finally:
        _allocation._allocator.reset(token)
