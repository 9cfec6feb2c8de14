"""Triton paged decode attention: one query token per sequence, split-K over the context (flash-decoding).

One program per (sequence, KV head, split); its tile's rows are the GROUP query heads of that KV head (padded to
BLOCK_H >= 16 for tl.dot), so each K/V tile read through the block table serves the whole group. A decode step is
memory-bound: it streams each sequence's K/V once. When batch x KV heads would not fill the GPU the context is
split over NUM_SPLITS programs that write partial (acc, max, sum) triples; the last of them to finish merges them
(FUSED_REDUCE, an arrival counter per (sequence, KV head)), or `_reduce_kernel` does in a second launch.

With the step's own K/V given (NEW_KV, the engine's path) the kernel reads the cached context [.., seq_len - 1)
through the block table and the new token from the packed K/V, and stores that token into its slot (WRITE): the
KV write, the attention and the merge are one launch, where a small batch otherwise pays three launch latencies
per layer.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from hf_paged.kernels.attention_tile import PIPELINE_DECODE, attend, attend_key, attend_loop, row_max, row_sum
from hf_paged.kernels.tuning import DecodeConfig

# NOTE: the arrival counters of FUSED_REDUCE, per device: all zero between launches (the last split of each
# (sequence, KV head) resets its own), so captured CUDA graphs can replay without a memset. Launches that share
# them must not overlap: the engine and generate run their forwards on one stream. A buffer that is outgrown is
# kept alive, since graphs captured earlier still point at it.
_COUNTERS: dict[torch.device, list[torch.Tensor]] = {}
_MIN_COUNTERS = 4096


def arrival_counters(device: torch.device, needed: int) -> torch.Tensor | None:
    """At least `needed` zeroed int32 counters on `device`; None where a buffer would have to be allocated inside a
    CUDA-graph capture (the caller then reduces in a second launch)."""
    buffers = _COUNTERS.setdefault(device, [])
    if buffers and buffers[-1].numel() >= needed:
        return buffers[-1]
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return None
    buffers.append(torch.zeros(max(needed, _MIN_COUNTERS), dtype=torch.int32, device=device))
    return buffers[-1]


@triton.jit
def split_range(seq_len, window, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr, MIN_SPLIT_TILES: tl.constexpr,
                SLIDING: tl.constexpr, NEW_KV: tl.constexpr):
    """The KV tokens [lo, cached_end) a sequence reads through its block table, the tiles of each split, and how
    many splits hold any (all NUM_SPLITS unless MIN_SPLIT_TILES > 1: then the splits past `active` are left out,
    by the decode kernel and by both merges)."""
    lo = seq_len * 0
    if SLIDING == 2:  # chunked: the query (at seq_len - 1) reads its own chunk
        lo = (seq_len - 1) - (seq_len - 1) % window
    elif SLIDING:
        lo = tl.maximum(seq_len - window, 0)
    cached_end = seq_len  # keys read through the block table: all, or all but the step's own (NEW_KV)
    if NEW_KV:
        cached_end = seq_len - 1
    tiles = (cached_end - lo + BLOCK_N - 1) // BLOCK_N
    tiles_per_split = (tiles + NUM_SPLITS - 1) // NUM_SPLITS
    active = seq_len * 0 + NUM_SPLITS
    if MIN_SPLIT_TILES > 1:  # short sequences fill fewer splits
        tiles_per_split = tl.maximum(tiles_per_split, MIN_SPLIT_TILES)
        active = tl.maximum((tiles + tiles_per_split - 1) // tiles_per_split, 1)
    return lo, cached_end, tiles_per_split, active


@triton.jit
def _merge_splits(out_ptrs, out_mask, part_acc, part_ml, rows, h_mask, offs_d, active, sink,
                  NUM_SPLITS: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr, ROWS: tl.constexpr,
                  SINKS: tl.constexpr):
    """Merge the first `active` of the NUM_SPLITS partial softmaxes of ROWS query heads; rows[i] * NUM_SPLITS is
    head i's first partial. SINKS: sink (ROWS,), in log2 units, joins each head's denominator.

    NOTE: .cg loads: the partials were written by other SMs, read here from L2, never from a stale L1 line.
    """
    m_max = tl.full([ROWS], float("-inf"), dtype=tl.float32)
    for s in range(NUM_SPLITS):
        m = tl.load(part_ml + (rows * NUM_SPLITS + s) * 2, mask=h_mask & (s < active), other=float("-inf"),
                    cache_modifier=".cg")
        m_max = tl.maximum(m_max, m)
    m_max = tl.where(h_mask, m_max, 0.0)  # finite for real rows: the split holding the last token saw it
    o = tl.full([ROWS, HEAD_PAD], 0.0, dtype=tl.float32)
    denom = tl.full([ROWS], 0.0, dtype=tl.float32)
    for s in range(NUM_SPLITS):
        part = rows * NUM_SPLITS + s  # (ROWS,)
        held = h_mask & (s < active)  # a left-out split's partial was never written
        m = tl.load(part_ml + part * 2, mask=held, other=float("-inf"), cache_modifier=".cg")
        l = tl.load(part_ml + part * 2 + 1, mask=held, other=0.0, cache_modifier=".cg")
        acc = tl.load(part_acc + part[:, None] * HEAD_DIM + offs_d[None, :], mask=out_mask & held[:, None],
                      other=0.0, cache_modifier=".cg")  # (ROWS, HEAD_PAD)
        w = tl.exp2(m - m_max)  # 0 for empty splits (m = -inf)
        o += acc * w[:, None]
        denom += l * w
    if SINKS:
        denom += tl.where(h_mask, tl.exp2(sink - m_max), 0.0)
    denom = tl.where(h_mask, denom, 1.0)
    tl.store(out_ptrs, (o / denom[:, None]).to(out_ptrs.dtype.element_ty), mask=out_mask)


# NOTE: do_not_specialize: the block-table width (stride_bt) changes from step to step outside the CUDA graphs; a
# width of 1 or a multiple of 16 would otherwise compile another variant in the middle of a run (seconds each).
@triton.jit(do_not_specialize=["stride_bt"])
def _decode_kernel(
    out, part_acc, part_ml, counters,  # out (T, Hq, D); partials (S, Hq, NUM_SPLITS, D) / (.., 2) f32; (S * Hkv,)
    query, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_kb, stride_kt, stride_kh, stride_bt,
    qk_scale, softcap_scale, window,
    new_k, new_v, stride_nt, stride_nh, slot_mapping,  # NEW_KV: the step's K/V (T, Hkv, D); WRITE: its slots (T,)
    sinks,  # SINKS: (Hq,) f32 attention sinks in log2 units, one more logit in each head's softmax denominator
    GROUP: tl.constexpr, BLOCK_H: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr, MIN_SPLIT_TILES: tl.constexpr,
    SLIDING: tl.constexpr, SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
    NEW_KV: tl.constexpr, WRITE: tl.constexpr, FUSED_REDUCE: tl.constexpr, PDL: tl.constexpr,
    HEADS_FASTEST: tl.constexpr, SINKS: tl.constexpr,
):
    if HEADS_FASTEST:  # grid (Hkv, S, splits)
        kv_head = tl.program_id(0)
        seq = tl.program_id(1)
        num_kv_heads = tl.num_programs(0)
    else:  # grid (S, Hkv, splits)
        seq = tl.program_id(0)
        kv_head = tl.program_id(1)
        num_kv_heads = tl.num_programs(1)
    split = tl.program_id(2)
    q_start = tl.load(cu_seqlens_q + seq)
    if tl.load(cu_seqlens_q + seq + 1) == q_start:
        return
    seq_len = tl.load(seq_lens + seq)
    # PDL (programmatic dependent launch): launched early, wait for the kernel before, then let the next start. The
    # step's metadata above was written before the forward, never by the kernel just before: read while it runs.
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    lo, cached_end, tiles_per_split, active = split_range(seq_len, window, BLOCK_N, NUM_SPLITS, MIN_SPLIT_TILES,
                                                          SLIDING, NEW_KV)
    if split >= active:  # MIN_SPLIT_TILES: a split this sequence is too short for; the merges leave it out
        return
    start = lo + split * tiles_per_split * BLOCK_N
    end = tl.minimum(start + tiles_per_split * BLOCK_N, cached_end)

    heads = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, HEAD_PAD)
    d_mask = offs_d < HEAD_DIM
    h_mask = heads < GROUP
    q_heads = kv_head * GROUP + heads  # (BLOCK_H,)
    q = tl.load(query + q_start * stride_qt + q_heads[:, None] * stride_qh + offs_d[None, :],
                mask=h_mask[:, None] & d_mask[None, :], other=0.0)  # (BLOCK_H, HEAD_PAD)
    q_pos = tl.full([BLOCK_H], 0, dtype=tl.int32) + seq_len - 1
    table = block_tables + seq.to(tl.int64) * stride_bt
    if PIPELINE_DECODE:
        # NOTE: one loop over the split's whole range, every tile bounds-masked (the only query sits at seq_len - 1,
        # so every key in range is visible): a memory-bound loop pays nothing for the masks, where in two loops
        # (whole tiles, then the partial last one) the pipeline drains before the last tile's copies are issued.
        acc = tl.full([BLOCK_H, HEAD_PAD], 0.0, dtype=tl.float32)
        m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
        l_i = tl.full([BLOCK_H], 0.0, dtype=tl.float32)
        acc, m_i, l_i = attend_loop(acc, m_i, l_i, q, q_pos, k_cache, v_cache, table, stride_kb, stride_kt,
                                    kv_head * stride_kh, start, end, start, qk_scale, softcap_scale, window, offs_d,
                                    d_mask, BLOCK_SIZE, BLOCK_N, HEAD_PAD, HEAD_DIM, 1, SLIDING, SOFTCAP,
                                    DOT_PRECISION, INTERPRET, 0, PIPELINE_DECODE)
    else:
        full_end = start + tl.maximum(end - start, 0) // BLOCK_N * BLOCK_N  # whole tiles, unmasked
        acc, m_i, l_i = attend(q, q_pos, k_cache, v_cache, table, stride_kb, stride_kt, kv_head * stride_kh, start,
                                full_end, end, qk_scale, softcap_scale, window, offs_d, d_mask, BLOCK_H, BLOCK_SIZE,
                                BLOCK_N, HEAD_PAD, HEAD_DIM, SLIDING, SOFTCAP, DOT_PRECISION, INTERPRET,
                                PIPELINE_DECODE)
    if NEW_KV:
        if split == active - 1:  # the step's own token, from the packed K/V (and into its slot)
            src = q_start.to(tl.int64) * stride_nt + kv_head * stride_nh + offs_d  # (HEAD_PAD,)
            k = tl.load(new_k + src, mask=d_mask, other=0.0)
            v = tl.load(new_v + src, mask=d_mask, other=0.0)
            if WRITE:
                slot = tl.load(slot_mapping + q_start).to(tl.int64)
                if slot >= 0:
                    dst = (slot // BLOCK_SIZE) * stride_kb + (slot % BLOCK_SIZE) * stride_kt + kv_head * stride_kh
                    tl.store(k_cache + dst + offs_d, k.to(k_cache.dtype.element_ty), mask=d_mask)
                    tl.store(v_cache + dst + offs_d, v.to(v_cache.dtype.element_ty), mask=d_mask)
            acc, m_i, l_i = attend_key(acc, m_i, l_i, q, k, v, qk_scale, softcap_scale, SOFTCAP)
    out_ptrs = out + q_start * stride_ot + q_heads[:, None] * stride_oh + offs_d[None, :]
    out_mask = h_mask[:, None] & d_mask[None, :]
    sink = tl.full([BLOCK_H], 0.0, dtype=tl.float32)
    if SINKS:
        sink = tl.load(sinks + q_heads, mask=h_mask, other=0.0)
    if NUM_SPLITS == 1:
        if SINKS:
            l_i += tl.where(h_mask, tl.exp2(sink - m_i), 0.0)
        tl.store(out_ptrs, (acc / l_i[:, None]).to(out.dtype.element_ty), mask=out_mask)
    else:
        rows = seq * GROUP * num_kv_heads + q_heads  # (BLOCK_H,) query heads of (S, Hq)
        part = rows * NUM_SPLITS + split
        tl.store(part_acc + part[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=out_mask)
        tl.store(part_ml + part * 2, m_i, mask=h_mask)
        tl.store(part_ml + part * 2 + 1, l_i, mask=h_mask)
        if FUSED_REDUCE:
            # Every thread's partials are stored before the arrival counts (barrier, then a release); the last
            # split to arrive sees all of them (acquire) and merges.
            tl.debug_barrier()
            counter = counters + seq * num_kv_heads + kv_head
            arrived = tl.atomic_add(counter, 1, sem="acq_rel")
            if arrived == active - 1:
                _merge_splits(out_ptrs, out_mask, part_acc, part_ml, rows, h_mask, offs_d, active, sink, NUM_SPLITS,
                              HEAD_DIM, HEAD_PAD, BLOCK_H, SINKS)
                tl.atomic_xchg(counter, 0)  # zero again for the next launch


@triton.jit
def _reduce_kernel(
    out, part_acc, part_ml, cu_seqlens_q, seq_lens, window, stride_ot, stride_oh, sinks,
    NUM_SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr, MIN_SPLIT_TILES: tl.constexpr, SLIDING: tl.constexpr, NEW_KV: tl.constexpr,
    PDL: tl.constexpr, SINKS: tl.constexpr,
):
    """Merge the partial softmaxes of one (sequence, query head): the second launch without FUSED_REDUCE. The split
    constants are the decode launch's (they say which splits hold partials)."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    seq = tl.program_id(0)
    head = tl.program_id(1)
    q_start = tl.load(cu_seqlens_q + seq)
    if tl.load(cu_seqlens_q + seq + 1) == q_start:
        return
    splits = tl.arange(0, SPLITS_PAD)
    offs_d = tl.arange(0, HEAD_PAD)
    s_mask = splits < NUM_SPLITS
    if MIN_SPLIT_TILES > 1:
        active = split_range(tl.load(seq_lens + seq), window, BLOCK_N, NUM_SPLITS, MIN_SPLIT_TILES, SLIDING,
                             NEW_KV)[3]
        s_mask = splits < active
    row = (seq * tl.num_programs(1) + head) * NUM_SPLITS + splits  # (SPLITS_PAD,)
    m = tl.load(part_ml + row * 2, mask=s_mask, other=float("-inf"))
    l = tl.load(part_ml + row * 2 + 1, mask=s_mask, other=0.0)
    acc = tl.load(part_acc + row[:, None] * HEAD_DIM + offs_d[None, :],
                  mask=s_mask[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)  # (SPLITS_PAD, HEAD_PAD)
    m_max = row_max(m, 0)  # finite: the split holding the query's own token saw it
    w = tl.exp2(m - m_max)  # 0 for empty splits (m = -inf)
    denom = row_sum(l * w, 0)
    if SINKS:
        denom += tl.exp2(tl.load(sinks + head) - m_max)
    o = row_sum(acc * w[:, None], 0) / denom
    tl.store(out + q_start * stride_ot + head * stride_oh + offs_d, o.to(out.dtype.element_ty),
             mask=offs_d < HEAD_DIM)


def launch_decode(out, args, common, cfg: DecodeConfig, num_seqs, num_kv_heads, num_q_heads, head_dim, key=None,
                  value=None, slot_mapping=None) -> None:
    """Grid (S, Hkv, splits), or (Hkv, S, splits) with `cfg.heads_fastest`; `args` are the kernel's arguments from
    `query` to `window`, as the launcher built them. key/value: the step's own K/V (NEW_KV); slot_mapping: store
    them too (WRITE)."""
    splits = cfg.num_splits
    min_tiles = cfg.min_split_tiles if splits > 1 else 1
    block_h = max(16, triton.next_power_of_2(common["GROUP"]))
    counters = None
    if splits == 1:
        part_acc = part_ml = out  # unused
    else:
        part_acc = torch.empty(num_seqs, num_q_heads, splits, head_dim, device=out.device, dtype=torch.float32)
        part_ml = torch.empty(num_seqs, num_q_heads, splits, 2, device=out.device, dtype=torch.float32)
        if cfg.fused_reduce:
            counters = arrival_counters(out.device, num_seqs * num_kv_heads)
    fused = counters is not None
    if key is None:
        new = (out, out, 0, 0, out)  # unused
    else:
        new = (key, value, key.stride(0), key.stride(1), slot_mapping if slot_mapping is not None else out)
    if cfg.heads_fastest and num_seqs > 65535:  # a grid's y extent
        raise ValueError(f"heads_fastest launches one grid row a sequence: at most 65535, got {num_seqs}")
    grid = (num_kv_heads, num_seqs, splits) if cfg.heads_fastest else (num_seqs, num_kv_heads, splits)
    _decode_kernel[grid](
        out, part_acc, part_ml, counters if fused else out, *args, *new,
        BLOCK_H=block_h, BLOCK_N=cfg.block_n, NUM_SPLITS=splits, MIN_SPLIT_TILES=min_tiles, **common,
        NEW_KV=key is not None,
        WRITE=slot_mapping is not None, FUSED_REDUCE=fused, HEADS_FASTEST=cfg.heads_fastest,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, launch_pdl=common["PDL"])
    if splits > 1 and not fused:
        _reduce_kernel[(num_seqs, num_q_heads)](
            out, part_acc, part_ml, args[5], args[4], args[-1], out.stride(0), out.stride(1), common["sinks"],
            NUM_SPLITS=splits, SPLITS_PAD=triton.next_power_of_2(splits), HEAD_DIM=head_dim, BLOCK_N=cfg.block_n,
            MIN_SPLIT_TILES=min_tiles, SLIDING=common["SLIDING"], NEW_KV=key is not None,
            HEAD_PAD=common["HEAD_PAD"], PDL=common["PDL"], SINKS=common["SINKS"], num_warps=4,
            launch_pdl=common["PDL"])
