"""Triton paged varlen prefill attention: packed queries of many sequences (cu_seqlens_q), each attending causally
to its cached prefix and its new tokens, all read through block tables.

One program per (query tile, KV head). A tile's rows are BLOCK_Q tokens x GROUP query heads (row r = token
r // GROUP, head r % GROUP), so each K/V tile read serves the whole group. A program walks the K/V of its tile up
to the tile's last position with an online softmax; tiles that lie wholly below the causal diagonal skip the mask.

With the step's own K/V given (NEW_KV, the engine's path) only the earlier context is gathered through the block
tables; the new tokens' keys come from the packed K/V, by pointer (1) or through TMA tensor descriptors (2). WRITE
also stores the program's own tokens into their slots (each (token, KV head) belongs to one program), so the KV
write needs no launch of its own: no program reads this step's slots through the block tables.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from hf_paged.kernels.attention_tile import PIPELINE_PREFILL, attend, attend_range
from hf_paged.kernels.tuning import PrefillConfig


@triton.jit
def _find_seq(cu_seqlens_q, target, num_seqs, BLOCK_Q: tl.constexpr):
    """The sequence owning query-tile program `target`: the last s with cu_seqlens_q[s] // BLOCK_Q + s <= target."""
    lo = num_seqs * 0
    hi = num_seqs
    while lo + 1 < hi:
        mid = (lo + hi) // 2
        right = tl.load(cu_seqlens_q + mid) // BLOCK_Q + mid <= target
        lo = tl.where(right, mid, lo)
        hi = tl.where(right, hi, mid)
    return lo


@triton.jit
def store_tile(k_cache, v_cache, key_rows, value_rows, slot_mapping, q_start, q_len, tile, kv_head, stride_nt,
               stride_nh, stride_kb, stride_kt, stride_kh, offs_d, d_mask, BLOCK_Q: tl.constexpr,
               BLOCK_SIZE: tl.constexpr, WRITE_Q: tl.constexpr):
    """The K/V of query tile `tile`'s tokens, for one KV head, from the packed rows into their slots (-1: none)."""
    for chunk in tl.static_range(0, BLOCK_Q, WRITE_Q):  # WRITE_Q tokens at a time
        w_tok = tile * BLOCK_Q + chunk + tl.arange(0, WRITE_Q)  # (WRITE_Q,)
        w_ok = (chunk + tl.arange(0, WRITE_Q) < BLOCK_Q) & (w_tok < q_len)
        slots = tl.load(slot_mapping + q_start + w_tok, mask=w_ok, other=-1).to(tl.int64)
        w_mask = (w_ok & (slots >= 0))[:, None] & d_mask[None, :]  # (WRITE_Q, HEAD_PAD)
        src = (q_start + w_tok).to(tl.int64)[:, None] * stride_nt + kv_head * stride_nh + offs_d[None, :]
        dst = ((slots // BLOCK_SIZE) * stride_kb + (slots % BLOCK_SIZE) * stride_kt + kv_head * stride_kh)
        dst = dst[:, None] + offs_d[None, :]
        tl.store(k_cache + dst, tl.load(key_rows + src, mask=w_mask).to(k_cache.dtype.element_ty), mask=w_mask)
        tl.store(v_cache + dst, tl.load(value_rows + src, mask=w_mask).to(v_cache.dtype.element_ty), mask=w_mask)


# NOTE: do_not_specialize: a num_seqs of 1 would become a constant and change _find_seq's loop-carried types; the
# block-table width (stride_bt) changes every step, and each specialisation of it would be another compilation.
@triton.jit(do_not_specialize=["num_seqs", "stride_bt"])
def _prefill_kernel(
    out, query, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_kb, stride_kt, stride_kh, stride_bt,
    qk_scale, softcap_scale, window, num_seqs,
    new_k, new_v, stride_nt, stride_nh,  # NEW_KV: the step's own K/V [num_tokens, num_kv_heads, D], packed like q
    # (NEW_KV 1: pointers; 2: TMA tensor descriptors over them)
    key_rows, value_rows, slot_mapping,  # WRITE: the same K/V by pointer, and the tokens' slots (T,)
    sinks,  # SINKS: (Hq,) f32 attention sinks in log2 units, one more logit in each head's softmax denominator
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, HEAD_DIM: tl.constexpr,
    HEAD_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    SLIDING: tl.constexpr, SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
    NEW_KV: tl.constexpr, WRITE: tl.constexpr, WRITE_Q: tl.constexpr,  # WRITE_Q: tokens stored at a time
    PREFIX: tl.constexpr,  # with NEW_KV: False promises no sequence has keys before its new tokens (fresh prompts)
    PDL: tl.constexpr,  # launched early (programmatic dependent launch): wait for the kernel before, see below
    STORE_LAST: tl.constexpr,  # WRITE after the attention instead of before (PrefillConfig.store_last)
    SINKS: tl.constexpr,
):
    # The query tiles of all sequences back to back: sequence s owns the programs from cu_seqlens_q[s] // BLOCK_Q + s
    # to the next sequence's first (at least its ceil(q_len / BLOCK_Q) tiles; a spare one returns at once). So a
    # mixed batch of long prefills and many decodes launches ~T / BLOCK_Q + S programs, not max_q / BLOCK_Q x S.
    # Later programs start first: the last query tiles of a sequence see the most keys.
    program = tl.num_programs(0) - 1 - tl.program_id(0)
    kv_head = tl.program_id(1)
    seq = _find_seq(cu_seqlens_q, program, num_seqs, BLOCK_Q)
    q_start = tl.load(cu_seqlens_q + seq)
    q_len = tl.load(cu_seqlens_q + seq + 1) - q_start
    tile = program - (q_start // BLOCK_Q + seq)
    if tile * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens + seq)
    # PDL: launched early, wait for the kernel before (it wrote the queries and K/V), then let the next start; the
    # step's metadata above was written before the forward, never by the kernel just before: read while it runs.
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    ctx_start = seq_len - q_len  # position of the sequence's first query token
    offs_d = tl.arange(0, HEAD_PAD)
    d_mask = offs_d < HEAD_DIM
    # WRITE: this tile's tokens, for this KV head, into their slots, before the attention (nothing is live in
    # registers yet) or, STORE_LAST, after it; no program reads this step's slots through the block tables (the
    # new tokens come from the packed rows), so order is free.
    if WRITE and not STORE_LAST:
        store_tile(k_cache, v_cache, key_rows, value_rows, slot_mapping, q_start, q_len, tile, kv_head, stride_nt,
                   stride_nh, stride_kb, stride_kt, stride_kh, offs_d, d_mask, BLOCK_Q, BLOCK_SIZE, WRITE_Q)
    rows = tl.arange(0, BLOCK_M)
    tok = tile * BLOCK_Q + rows // GROUP  # (BLOCK_M,) query token within the sequence
    q_heads = kv_head * GROUP + rows % GROUP
    row_ok = (rows < BLOCK_Q * GROUP) & (tok < q_len)
    q_pos = tl.where(row_ok, ctx_start + tok, -1)
    q_offs = (q_start + tok).to(tl.int64)[:, None] * stride_qt + q_heads[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(query + q_offs, mask=row_ok[:, None] & d_mask[None, :], other=0.0)  # (BLOCK_M, HEAD_PAD)

    first = ctx_start + tile * BLOCK_Q  # first and last query positions of the tile
    end = ctx_start + tl.minimum(tile * BLOCK_Q + BLOCK_Q, q_len)  # = last + 1
    if SLIDING:
        lo = tl.maximum(first - window + 1, 0)
        if SLIDING == 2:  # chunked: the tile's first row has the lowest chunk start
            lo = first - first % window
        full_end = lo  # the window's lower edge moves per row: mask every tile
    else:
        lo = 0
        full_end = (first + 1) // BLOCK_N * BLOCK_N  # keys every row sees, in whole tiles
    table = block_tables + seq.to(tl.int64) * stride_bt
    if NEW_KV:
        # The keys before the step's own come from the pool, the step's own from the packed K/V (contiguous rows,
        # no block-table gather); each range is whole unmasked tiles, then one masked stretch.
        acc = tl.full([BLOCK_M, HEAD_PAD], 0.0, dtype=tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.full([BLOCK_M], 0.0, dtype=tl.float32)
        cached_end = tl.minimum(ctx_start, end)
        cached_full = lo + tl.maximum(cached_end - lo, 0) // BLOCK_N * BLOCK_N
        if SLIDING:
            cached_full = lo
        # NOTE: without PREFIX the block-table loops are not even compiled (offline, with the launch's alignment
        # hints, the 64 x 64 TMA tile then holds 146-151 registers instead of 198).
        if PREFIX:
            acc, m_i, l_i = attend_range(acc, m_i, l_i, q, q_pos, k_cache, v_cache, table, stride_kb, stride_kt,
                                          kv_head * stride_kh, lo, cached_full, cached_end, qk_scale, softcap_scale,
                                          window, offs_d, d_mask, BLOCK_SIZE, BLOCK_N, HEAD_PAD, HEAD_DIM, SLIDING,
                                          SOFTCAP, DOT_PRECISION, INTERPRET, 0, PIPELINE_PREFILL)
        new_start = tl.maximum(lo, ctx_start)
        new_full = new_start + tl.maximum(first + 1 - new_start, 0) // BLOCK_N * BLOCK_N  # below the diagonal
        if SLIDING:
            new_full = new_start
        shift = q_start - ctx_start  # position p of the sequence is row p + shift of the packed K/V
        new_head = kv_head * stride_nh
        if NEW_KV == 2:
            new_head = kv_head
        acc, m_i, l_i = attend_range(acc, m_i, l_i, q, q_pos, new_k, new_v, table, shift, stride_nt, new_head,
                                      new_start, new_full, end, qk_scale, softcap_scale, window, offs_d, d_mask,
                                      BLOCK_SIZE, BLOCK_N, HEAD_PAD, HEAD_DIM, SLIDING, SOFTCAP, DOT_PRECISION,
                                      INTERPRET, NEW_KV, PIPELINE_PREFILL)
    else:
        acc, m_i, l_i = attend(q, q_pos, k_cache, v_cache, table, stride_kb, stride_kt, kv_head * stride_kh, lo,
                                full_end, end, qk_scale, softcap_scale, window, offs_d, d_mask, BLOCK_M, BLOCK_SIZE,
                                BLOCK_N, HEAD_PAD, HEAD_DIM, SLIDING, SOFTCAP, DOT_PRECISION, INTERPRET,
                                PIPELINE_PREFILL)
    if SINKS:  # m_i is finite on real rows: each sees its own key
        l_i += tl.where(row_ok, tl.exp2(tl.load(sinks + q_heads) - m_i), 0.0)
    l_i = tl.where(l_i == 0.0, 1.0, l_i)  # padding rows
    o = acc / l_i[:, None]
    o_offs = (q_start + tok).to(tl.int64)[:, None] * stride_ot + q_heads[:, None] * stride_oh + offs_d[None, :]
    tl.store(out + o_offs, o.to(out.dtype.element_ty), mask=row_ok[:, None] & d_mask[None, :])
    if WRITE and STORE_LAST:
        store_tile(k_cache, v_cache, key_rows, value_rows, slot_mapping, q_start, q_len, tile, kv_head, stride_nt,
                   stride_nh, stride_kb, stride_kt, stride_kh, offs_d, d_mask, BLOCK_Q, BLOCK_SIZE, WRITE_Q)


def new_kv_args(query, key, value, cfg: PrefillConfig) -> tuple[int, tuple]:
    """The prefill kernel's NEW_KV mode and its (new_k, new_v, stride_nt, stride_nh) arguments: 0 without the step's
    own K/V; 2 with TMA descriptors where they can describe it (power-of-2 head_dim, 16-byte aligned rows); else 1."""
    if key is None:
        return 0, (query, query, 0, 0)
    head_dim = key.shape[-1]
    aligned = all(t.data_ptr() % 16 == 0 and t.stride(0) * t.element_size() % 16 == 0
                  and t.stride(1) * t.element_size() % 16 == 0 for t in (key, value))
    if cfg.tma and aligned and head_dim == triton.next_power_of_2(head_dim):
        from triton.tools.tensor_descriptor import TensorDescriptor

        block = [cfg.block_n, 1, head_dim]
        descriptors = [TensorDescriptor(t, list(t.shape), list(t.stride()), block) for t in (key, value)]
        return 2, (*descriptors, key.stride(0), key.stride(1))
    return 1, (key, value, key.stride(0), key.stride(1))


def launch_prefill(out, args, common, cfg: PrefillConfig, num_seqs, num_kv_heads, query, key=None, value=None,
                   slot_mapping=None, fresh=False) -> None:
    """Grid (T // BLOCK_Q + S, Hkv); `args` are the kernel's arguments from `query` to `window`, as the launcher
    built them. key/value: the step's own K/V (NEW_KV); slot_mapping: store them too (WRITE); fresh: with them, no
    sequence has keys before its new tokens (nothing is read through the block tables)."""
    group = common["GROUP"]
    block_m = max(cfg.block_m, triton.next_power_of_2(group))
    block_q = block_m // group
    grid = (query.shape[0] // block_q + num_seqs, num_kv_heads)  # see _prefill_kernel
    new_kv, new = new_kv_args(query, key, value, cfg)
    write = slot_mapping is not None
    rows = (key, value, slot_mapping) if write else (query, query, query)
    _prefill_kernel[grid](out, *args, num_seqs, *new, *rows, BLOCK_M=block_m, BLOCK_Q=block_q, BLOCK_N=cfg.block_n,
                          **common, NEW_KV=new_kv, WRITE=write, WRITE_Q=min(16, triton.next_power_of_2(block_q)),
                          PREFIX=not (fresh and new_kv), STORE_LAST=write and cfg.store_last,
                          num_warps=cfg.num_warps, num_stages=cfg.num_stages, launch_pdl=common["PDL"])
