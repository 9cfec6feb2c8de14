"""Triton paged attention: a split-K decode kernel and a varlen prefill kernel, both GQA-aware.

Same function as `reference.paged_attention` (its module docstring gives the layouts). Both kernels run one
program per (piece of work, sequence, KV head) and put the query heads of that KV head's group side by side in
the rows of one tile, so each K/V tile read through the block table serves the whole group:

    rows of a tile   decode: the GROUP query heads of one token (padded to 16 for tl.dot)
                     prefill: BLOCK_Q tokens x GROUP heads, row r = token r // GROUP, head r % GROUP

Decode (every q_len <= 1) is memory-bound: it streams each sequence's K/V once. When batch x KV heads would not
fill the GPU it splits the context over NUM_SPLITS programs (flash-decoding) that write partial (acc, max, sum)
triples, merged by `_reduce_kernel`. Prefill walks the K/V of its query tile up to the tile's last position with
an online softmax; tiles that lie wholly below the causal diagonal skip the mask.
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl

from hf_paged.kernels.attention_tile import INTERPRET, attend, attend_loop, row_max, row_sum
from hf_paged.kernels.tuning import DecodeConfig, PrefillConfig, default_decode_config, default_prefill_config

_LOG2E = 1.4426950408889634
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_HEAD_DIM = 256
# NOTE: do_not_specialize: the block-table width (stride_bt) changes from step to step outside the CUDA graphs; a
# width of 1 or a multiple of 16 would otherwise compile another variant in the middle of a run (seconds each).
@triton.jit(do_not_specialize=["stride_bt"])
def _decode_kernel(
    out, part_acc, part_ml,  # out (T, Hq, D); partials (S, Hq, NUM_SPLITS, D) f32 and (S, Hq, NUM_SPLITS, 2) f32
    query, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_kb, stride_kt, stride_kh, stride_bt,
    qk_scale, softcap_scale, window,
    GROUP: tl.constexpr, BLOCK_H: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr,
    SLIDING: tl.constexpr, SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    q_start = tl.load(cu_seqlens_q + seq)
    if tl.load(cu_seqlens_q + seq + 1) == q_start:
        return
    seq_len = tl.load(seq_lens + seq)
    lo = 0
    if SLIDING:
        lo = tl.maximum(seq_len - window, 0)
    # NOTE: the only query sits at seq_len - 1, so every key in [lo, seq_len) is visible: only the last partial
    # tile of each split needs a (bounds) mask.
    tiles_per_split = ((seq_len - lo + BLOCK_N - 1) // BLOCK_N + NUM_SPLITS - 1) // NUM_SPLITS
    start = lo + split * tiles_per_split * BLOCK_N
    end = tl.minimum(start + tiles_per_split * BLOCK_N, seq_len)
    full_end = start + tl.maximum(end - start, 0) // BLOCK_N * BLOCK_N

    heads = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, HEAD_PAD)
    d_mask = offs_d < HEAD_DIM
    h_mask = heads < GROUP
    q_heads = kv_head * GROUP + heads  # (BLOCK_H,)
    q = tl.load(query + q_start * stride_qt + q_heads[:, None] * stride_qh + offs_d[None, :],
                mask=h_mask[:, None] & d_mask[None, :], other=0.0)  # (BLOCK_H, HEAD_PAD)
    q_pos = tl.full([BLOCK_H], 0, dtype=tl.int32) + seq_len - 1
    acc, m_i, l_i = attend(q, q_pos, k_cache, v_cache, block_tables + seq.to(tl.int64) * stride_bt, stride_kb,
                            stride_kt, kv_head * stride_kh, start, full_end, end, qk_scale, softcap_scale, window,
                            offs_d, d_mask, BLOCK_H, BLOCK_SIZE, BLOCK_N, HEAD_PAD, HEAD_DIM, SLIDING, SOFTCAP,
                            DOT_PRECISION, INTERPRET)
    if NUM_SPLITS == 1:
        o = acc / l_i[:, None]
        tl.store(out + q_start * stride_ot + q_heads[:, None] * stride_oh + offs_d[None, :],
                 o.to(out.dtype.element_ty), mask=h_mask[:, None] & d_mask[None, :])
    else:
        row = (seq * GROUP * tl.num_programs(1) + q_heads) * NUM_SPLITS + split  # (BLOCK_H,) into (S, Hq, SPLITS)
        tl.store(part_acc + row[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=h_mask[:, None] & d_mask[None, :])
        tl.store(part_ml + row * 2, m_i, mask=h_mask)
        tl.store(part_ml + row * 2 + 1, l_i, mask=h_mask)


@triton.jit
def _reduce_kernel(
    out, part_acc, part_ml, cu_seqlens_q, stride_ot, stride_oh,
    NUM_SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr,
):
    """Merge the NUM_SPLITS partial softmaxes of one (sequence, query head)."""
    seq = tl.program_id(0)
    head = tl.program_id(1)
    q_start = tl.load(cu_seqlens_q + seq)
    if tl.load(cu_seqlens_q + seq + 1) == q_start:
        return
    splits = tl.arange(0, SPLITS_PAD)
    offs_d = tl.arange(0, HEAD_PAD)
    s_mask = splits < NUM_SPLITS
    row = (seq * tl.num_programs(1) + head) * NUM_SPLITS + splits  # (SPLITS_PAD,)
    m = tl.load(part_ml + row * 2, mask=s_mask, other=float("-inf"))
    l = tl.load(part_ml + row * 2 + 1, mask=s_mask, other=0.0)
    acc = tl.load(part_acc + row[:, None] * HEAD_DIM + offs_d[None, :],
                  mask=s_mask[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)  # (SPLITS_PAD, HEAD_PAD)
    m_max = row_max(m, 0)  # finite: the split holding the query's own token saw it
    w = tl.exp2(m - m_max)  # 0 for empty splits (m = -inf)
    o = row_sum(acc * w[:, None], 0) / row_sum(l * w, 0)
    tl.store(out + q_start * stride_ot + head * stride_oh + offs_d, o.to(out.dtype.element_ty),
             mask=offs_d < HEAD_DIM)


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


# NOTE: do_not_specialize: a num_seqs of 1 would become a constant and change _find_seq's loop-carried types; the
# block-table width (stride_bt) changes every step, and each specialisation of it would be another compilation.
@triton.jit(do_not_specialize=["num_seqs", "stride_bt"])
def _prefill_kernel(
    out, query, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_kb, stride_kt, stride_kh, stride_bt,
    qk_scale, softcap_scale, window, num_seqs,
    new_k, new_v, stride_nt, stride_nh,  # NEW_KV: the step's own K/V [num_tokens, num_kv_heads, D], packed like q
    # (NEW_KV 1: pointers; 2: TMA tensor descriptors over them)
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, HEAD_DIM: tl.constexpr,
    HEAD_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    SLIDING: tl.constexpr, SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
    NEW_KV: tl.constexpr,
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
    ctx_start = seq_len - q_len  # position of the sequence's first query token

    rows = tl.arange(0, BLOCK_M)
    tok = tile * BLOCK_Q + rows // GROUP  # (BLOCK_M,) query token within the sequence
    q_heads = kv_head * GROUP + rows % GROUP
    row_ok = (rows < BLOCK_Q * GROUP) & (tok < q_len)
    q_pos = tl.where(row_ok, ctx_start + tok, -1)
    offs_d = tl.arange(0, HEAD_PAD)
    d_mask = offs_d < HEAD_DIM
    q_offs = (q_start + tok).to(tl.int64)[:, None] * stride_qt + q_heads[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(query + q_offs, mask=row_ok[:, None] & d_mask[None, :], other=0.0)  # (BLOCK_M, HEAD_PAD)

    first = ctx_start + tile * BLOCK_Q  # first and last query positions of the tile
    end = ctx_start + tl.minimum(tile * BLOCK_Q + BLOCK_Q, q_len)  # = last + 1
    if SLIDING:
        lo = tl.maximum(first - window + 1, 0)
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
        acc, m_i, l_i = attend_loop(acc, m_i, l_i, q, q_pos, k_cache, v_cache, table, stride_kb, stride_kt,
                                     kv_head * stride_kh, lo, cached_full, qk_scale, softcap_scale, window, offs_d,
                                     d_mask, BLOCK_SIZE, BLOCK_N, HEAD_PAD, HEAD_DIM, False, SLIDING, SOFTCAP,
                                     DOT_PRECISION, INTERPRET, 0)
        acc, m_i, l_i = attend_loop(acc, m_i, l_i, q, q_pos, k_cache, v_cache, table, stride_kb, stride_kt,
                                     kv_head * stride_kh, cached_full, cached_end, qk_scale, softcap_scale, window,
                                     offs_d, d_mask, BLOCK_SIZE, BLOCK_N, HEAD_PAD, HEAD_DIM, True, SLIDING, SOFTCAP,
                                     DOT_PRECISION, INTERPRET, 0)
        new_start = tl.maximum(lo, ctx_start)
        new_full = new_start + tl.maximum(first + 1 - new_start, 0) // BLOCK_N * BLOCK_N  # below the diagonal
        if SLIDING:
            new_full = new_start
        shift = q_start - ctx_start  # position p of the sequence is row p + shift of the packed K/V
        new_head = kv_head * stride_nh
        if NEW_KV == 2:
            new_head = kv_head
        acc, m_i, l_i = attend_loop(acc, m_i, l_i, q, q_pos, new_k, new_v, table, shift, stride_nt,
                                     new_head, new_start, new_full, qk_scale, softcap_scale, window,
                                     offs_d, d_mask, BLOCK_SIZE, BLOCK_N, HEAD_PAD, HEAD_DIM, False, SLIDING, SOFTCAP,
                                     DOT_PRECISION, INTERPRET, NEW_KV)
        acc, m_i, l_i = attend_loop(acc, m_i, l_i, q, q_pos, new_k, new_v, table, shift, stride_nt,
                                     new_head, new_full, end, qk_scale, softcap_scale, window,
                                     offs_d, d_mask, BLOCK_SIZE, BLOCK_N, HEAD_PAD, HEAD_DIM, True, SLIDING, SOFTCAP,
                                     DOT_PRECISION, INTERPRET, NEW_KV)
    else:
        acc, m_i, l_i = attend(q, q_pos, k_cache, v_cache, table, stride_kb, stride_kt, kv_head * stride_kh, lo,
                                full_end, end, qk_scale, softcap_scale, window, offs_d, d_mask, BLOCK_M, BLOCK_SIZE,
                                BLOCK_N, HEAD_PAD, HEAD_DIM, SLIDING, SOFTCAP, DOT_PRECISION, INTERPRET)
    l_i = tl.where(l_i == 0.0, 1.0, l_i)  # padding rows
    o = acc / l_i[:, None]
    o_offs = (q_start + tok).to(tl.int64)[:, None] * stride_ot + q_heads[:, None] * stride_oh + offs_d[None, :]
    tl.store(out + o_offs, o.to(out.dtype.element_ty), mask=row_ok[:, None] & d_mask[None, :])


def _check_inputs(query, key_cache, value_cache, block_tables, seq_lens, cu_seqlens_q, sliding_window, softcap):
    if query.dim() != 3:
        raise ValueError(f"query must be [num_tokens, num_q_heads, head_dim], got shape {tuple(query.shape)}")
    if key_cache.dim() != 4:
        raise ValueError(f"key_cache must be [num_blocks, block_size, num_kv_heads, head_dim], "
                         f"got shape {tuple(key_cache.shape)}")
    if value_cache.shape != key_cache.shape or value_cache.stride() != key_cache.stride():
        raise ValueError(f"value_cache {tuple(value_cache.shape)} / strides {value_cache.stride()} must match "
                         f"key_cache {tuple(key_cache.shape)} / strides {key_cache.stride()}")
    if query.dtype not in _DTYPES:
        raise TypeError(f"query dtype {query.dtype} is not supported; use one of {_DTYPES}")
    if key_cache.dtype != query.dtype or value_cache.dtype != query.dtype:
        raise TypeError(f"query, key_cache and value_cache must share a dtype, got {query.dtype}, "
                        f"{key_cache.dtype}, {value_cache.dtype}")
    num_q_heads, head_dim = query.shape[1:]
    num_kv_heads = key_cache.shape[2]
    if key_cache.shape[3] != head_dim:
        raise ValueError(f"head_dim differs: query has {head_dim}, key_cache has {key_cache.shape[3]}")
    if not 16 <= head_dim <= _MAX_HEAD_DIM:
        raise ValueError(f"head_dim {head_dim} is outside the supported 16..{_MAX_HEAD_DIM}")
    if num_q_heads % num_kv_heads:
        raise ValueError(f"num_q_heads {num_q_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    if query.stride(-1) != 1 or key_cache.stride(-1) != 1:
        raise ValueError(f"the head_dim axis must be contiguous: query strides {query.stride()}, "
                         f"key_cache strides {key_cache.stride()}")
    if key_cache.stride(2) != head_dim:
        raise ValueError(f"key_cache heads must be packed [.., num_kv_heads, head_dim], strides {key_cache.stride()}")
    num_seqs = seq_lens.shape[0]
    for name, t, shape in (("block_tables", block_tables, (num_seqs, block_tables.shape[-1])),
                           ("seq_lens", seq_lens, (num_seqs,)), ("cu_seqlens_q", cu_seqlens_q, (num_seqs + 1,))):
        if t.dtype != torch.int32:
            raise TypeError(f"{name} must be int32, got {t.dtype}")
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape} (num_seqs = {num_seqs}), got {tuple(t.shape)}")
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous along its last axis, strides {t.stride()}")
    for name, t in (("key_cache", key_cache), ("value_cache", value_cache), ("block_tables", block_tables),
                    ("seq_lens", seq_lens), ("cu_seqlens_q", cu_seqlens_q)):
        if t.device != query.device:
            raise ValueError(f"{name} is on {t.device}, query on {query.device}")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be >= 1 or None, got {sliding_window}")
    if softcap is not None and softcap <= 0:
        raise ValueError(f"softcap must be > 0 or None, got {softcap}")


def _check_new_kv(query, key_cache, key, value):
    if (key is None) != (value is None):
        raise ValueError("give both key and value (the step's own K/V) or neither")
    if key is None:
        return
    shape = (query.shape[0], key_cache.shape[2], key_cache.shape[3])
    for name, t in (("key", key), ("value", value)):
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must be [num_tokens, num_kv_heads, head_dim] = {shape}, got {tuple(t.shape)}")
        if t.dtype != key_cache.dtype or t.device != query.device:
            raise TypeError(f"{name} is {t.dtype} on {t.device}; the caches are {key_cache.dtype} on {query.device}")
    if key.stride(-1) != 1 or key.stride() != value.stride():
        raise ValueError(f"key and value need one layout with head_dim contiguous, strides {key.stride()} and "
                         f"{value.stride()}")


def paged_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
    max_seqlen_q: int | None = None,
    key: torch.Tensor | None = None,
    value: torch.Tensor | None = None,
    *,
    config: DecodeConfig | PrefillConfig | None = None,
) -> torch.Tensor:
    """Varlen causal attention of packed queries over paged K/V; `reference.paged_attention` is the spec.

    Args:
        query: [num_tokens, num_q_heads, head_dim] fp16/bf16/fp32, the queries of all sequences back to back;
            NOTE: cu_seqlens_q[-1] must equal num_tokens (rows past it are left unwritten).
        key_cache, value_cache: [num_blocks, block_size, num_kv_heads, head_dim], query's dtype.
        block_tables: [num_seqs, max_blocks] int32. seq_lens: [num_seqs] int32 (context incl. new tokens).
        cu_seqlens_q: [num_seqs + 1] int32.
        max_seqlen_q: the longest q_len; 1 picks the decode kernel. None reads it from cu_seqlens_q (a host sync).
        key, value: optionally the step's own K/V [num_tokens, num_kv_heads, head_dim] (rows packed like query's,
            the head_dim axis contiguous), already written to the caches: the prefill kernel then reads the new
            tokens' keys from them (contiguous rows) and only the earlier context through the block tables.
        config: a DecodeConfig / PrefillConfig to override the tuned defaults (benchmarks, tests).
    Returns:
        [num_tokens, num_q_heads, head_dim] in query's dtype.
    """
    _check_inputs(query, key_cache, value_cache, block_tables, seq_lens, cu_seqlens_q, sliding_window, softcap)
    _check_new_kv(query, key_cache, key, value)
    out = torch.empty_like(query, memory_format=torch.contiguous_format)
    num_seqs = seq_lens.shape[0]
    if num_seqs == 0 or query.shape[0] == 0:
        return out
    if max_seqlen_q is None:
        max_seqlen_q = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max())
    _, num_q_heads, head_dim = query.shape
    _, block_size, num_kv_heads, _ = key_cache.shape
    group = num_q_heads // num_kv_heads
    if softcap is None:
        qk_scale, softcap_scale = scale * _LOG2E, 1.0
    else:
        qk_scale, softcap_scale = softcap * _LOG2E, scale / softcap
    common = dict(
        GROUP=group, HEAD_DIM=head_dim, HEAD_PAD=max(16, triton.next_power_of_2(head_dim)), BLOCK_SIZE=block_size,
        SLIDING=sliding_window is not None, SOFTCAP=softcap is not None,
        DOT_PRECISION="ieee" if query.dtype == torch.float32 else "tf32", INTERPRET=INTERPRET,
    )
    window = sliding_window if sliding_window is not None else 0
    args = (query, key_cache, value_cache, block_tables, seq_lens, cu_seqlens_q,
            query.stride(0), query.stride(1), out.stride(0), out.stride(1),
            key_cache.stride(0), key_cache.stride(1), key_cache.stride(2), block_tables.stride(0),
            qk_scale, softcap_scale, window)
    if max_seqlen_q <= 1:
        cfg = config or default_decode_config(num_seqs, num_kv_heads, head_dim, query.device)
        if not isinstance(cfg, DecodeConfig):
            raise TypeError(f"a decode batch (max_seqlen_q = 1) needs a DecodeConfig, got {cfg!r}")
        _launch_decode(out, args, common, cfg, num_seqs, num_kv_heads, num_q_heads, head_dim)
    else:
        cfg = config or default_prefill_config(group, head_dim, query.device)
        if not isinstance(cfg, PrefillConfig):
            raise TypeError(f"a prefill batch (max_seqlen_q > 1) needs a PrefillConfig, got {cfg!r}")
        block_m = max(cfg.block_m, triton.next_power_of_2(group))
        block_q = block_m // group
        grid = (query.shape[0] // block_q + num_seqs, num_kv_heads)  # see _prefill_kernel
        new_kv, new = _new_kv_args(query, key, value, cfg)
        _prefill_kernel[grid](out, *args, num_seqs, *new, BLOCK_M=block_m, BLOCK_Q=block_q, BLOCK_N=cfg.block_n,
                              **common, NEW_KV=new_kv, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out


def _new_kv_args(query, key, value, cfg: PrefillConfig) -> tuple[int, tuple]:
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


def _launch_decode(out, args, common, cfg, num_seqs, num_kv_heads, num_q_heads, head_dim):
    splits = cfg.num_splits
    block_h = max(16, triton.next_power_of_2(common["GROUP"]))
    if splits == 1:
        part_acc = part_ml = out  # unused
    else:
        part_acc = torch.empty(num_seqs, num_q_heads, splits, head_dim, device=out.device, dtype=torch.float32)
        part_ml = torch.empty(num_seqs, num_q_heads, splits, 2, device=out.device, dtype=torch.float32)
    _decode_kernel[(num_seqs, num_kv_heads, splits)](
        out, part_acc, part_ml, *args, BLOCK_H=block_h, BLOCK_N=cfg.block_n, NUM_SPLITS=splits, **common,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if splits > 1:
        _reduce_kernel[(num_seqs, num_q_heads)](
            out, part_acc, part_ml, args[5], out.stride(0), out.stride(1),
            NUM_SPLITS=splits, SPLITS_PAD=triton.next_power_of_2(splits), HEAD_DIM=head_dim,
            HEAD_PAD=common["HEAD_PAD"], num_warps=4)
