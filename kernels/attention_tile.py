"""The tile step the paged-attention kernels share: online softmax over K/V read through a block table.

`attend` runs the query rows of one tile over a KV range (whole tiles every row sees in full, then a masked
stretch; `attend_range` for a running softmax); `attend_loop` runs one loop over it; `attend_tile` one BLOCK_N-key
step; `attend_key` one single key.

Software pipelining through a block table: triton's pipeliner copies K/V tiles into shared memory (`cp.async`)
num_stages - 1 tiles ahead of the tile being computed, but only when their addresses do not hang on another load
of the same iteration. Read in the loop, the block-table entries made each K/V copy an "indirect" load: the
pipeliner then issued a tile's K/V only just before waiting for them (every copy group at wait 0, offline sm_90
TTGIR), so no copy of a program overlapped its tensor-core work. `attend_loop` therefore gathers each tile's rows
(`tile_rows`) one iteration ahead and carries them: the copies see a loop-carried address, like a plain strided
loop's, and stay num_stages - 1 tiles ahead (wait 2 at 3 stages). And a range runs as one loop that masks only the
tiles from `mask_from` on (a uniform branch, MASKED=2): as two loops, unmasked then masked, the pipeline drained
between them, and the masked tile's copies were issued only after the last unmasked tile was done.
kernels/paged_decode.py and kernels/paged_prefill.py build the decode and prefill kernels from them.
"""

import os

import triton
import triton.language as tl

# Whether the @triton.jit below ran under TRITON_INTERPRET=1 (read, as triton does, when they are decorated).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")
# HF_PAGED_KV_PIPELINE: which kernels run their K/V loops pipelined through the block table (module docstring):
# "prefill" (the default), "all" (or 1), "decode", "none" (or 0: the loops as before 2026-12-01, each tile's rows
# gathered in its own iteration, a range in two loops). The H200 timed the prefill 4-15% faster pipelined and the
# decode 1-19% slower (docs/kernels.md "Pipelined through the block table"). Read at import, compile-time constants
# the kernels pass down as PIPELINE.
_KV_PIPELINE = os.environ.get("HF_PAGED_KV_PIPELINE", "prefill").strip().lower()
if _KV_PIPELINE not in ("prefill", "decode", "all", "none", "1", "0"):
    raise ValueError(f"HF_PAGED_KV_PIPELINE={_KV_PIPELINE!r}: expected prefill, decode, all or none")
PIPELINE_PREFILL = tl.constexpr(_KV_PIPELINE in ("prefill", "all", "1"))
PIPELINE_DECODE = tl.constexpr(_KV_PIPELINE in ("decode", "all", "1"))


# NOTE: the kernels call only triton builtins and these @triton.jit helpers, never triton's own jit'd library
# functions (tl.zeros, tl.max, tl.sum, tl.cdiv): when triton was imported before TRITON_INTERPRET=1 was set
# (torch._dynamo imports it), those stay compiled-only and the CPU interpreter cannot call them. The reductions
# below are tl.max / tl.sum's own bodies; the interpreter recognises their combine functions and uses numpy.
@triton.jit
def row_max(x, axis: tl.constexpr):
    return tl.reduce(x, axis, tl.standard._elementwise_max)


@triton.jit
def row_sum(x, axis: tl.constexpr):
    return tl.reduce(x, axis, tl.standard._sum_combine)


@triton.jit
def tanh(x):
    # tanh through exp2 (exact at both tails: exp2 -> inf gives 1, exp2 -> 0 gives -1).
    return 1.0 - 2.0 / (tl.exp2(x * 2.8853900817779268) + 1.0)


@triton.jit
def dot(a, b, acc, DOT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr):
    """a @ b (+ acc, accumulated in place by the tensor cores)."""
    if INTERPRET:
        # NOTE: the CPU interpreter multiplies bf16 as raw uint16 bits; fp32 products of 16-bit operands are exact.
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def attend_tile(
    acc, m_i, l_i,  # (BLOCK_M, HEAD_PAD) f32, (BLOCK_M,) f32 running max (log2 units), (BLOCK_M,) f32 running sum
    q,  # (BLOCK_M, HEAD_PAD)
    q_pos,  # (BLOCK_M,) absolute query positions, -1 on padding rows (read only when MASKED)
    k_cache, v_cache, block_table,  # KV_MODE 0: the tile's (BLOCK_N,) row offsets (`tile_rows`); else unused
    stride_kb, stride_kt, head_off,  # KV_MODE 1: (row shift, row stride, head offset); 2: (row shift, -, head)
    n0, end, mask_from,  # this tile's first KV token; the range's end; MASKED=2: mask tiles reaching past it
    qk_scale, softcap_scale, window,
    offs_d, d_mask,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
    MASKED: tl.constexpr, SLIDING: tl.constexpr, SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr, KV_MODE: tl.constexpr,
):
    """One online-softmax step of q over the KV tokens [n0, n0 + BLOCK_N). KV_MODE 0 reads them through the block
    table; 1 and 2 from packed K/V [tokens, heads, D] where position p sits in row p + stride_kb (the step's own
    keys), by pointer (1) or through TMA tensor descriptors (2: whole tiles; rows past `end` belong to other
    tokens, masked out of the scores, and rows past the tensor read as zeros).

    MASKED=0 promises that every key of the tile exists and is visible to every real row: no bounds, causal or
    window masks then. MASKED=1 masks the tile; 2 masks it only if it reaches past `mask_from` (the keys before
    it are whole tiles every row sees), bounds-masking the loads of every tile.
    """
    offs_n = n0 + tl.arange(0, BLOCK_N)  # (BLOCK_N,) token positions
    if MASKED:
        in_range = offs_n < end
    if KV_MODE == 0:
        rows = block_table  # the tile's rows, gathered by attend_loop one tile ahead
    if KV_MODE == 2:
        k = tl.reshape(k_cache.load([n0 + stride_kb, head_off, 0]), [BLOCK_N, HEAD_PAD])  # HEAD_PAD == HEAD_DIM
    else:
        if KV_MODE == 1:
            rows = (offs_n + stride_kb).to(tl.int64) * stride_kt + head_off  # (BLOCK_N,)
        kv_offs = rows[:, None] + offs_d[None, :]  # (BLOCK_N, HEAD_PAD)
        if MASKED:
            kv_mask = in_range[:, None] & d_mask[None, :]
            k = tl.load(k_cache + kv_offs, mask=kv_mask, other=0.0)
        elif HEAD_PAD != HEAD_DIM:
            k = tl.load(k_cache + kv_offs, mask=d_mask[None, :], other=0.0)
        else:
            k = tl.load(k_cache + kv_offs)
    s = dot(q, tl.trans(k), None, DOT_PRECISION, INTERPRET)  # (BLOCK_M, BLOCK_N) raw scores
    if SOFTCAP:
        s = tanh(s * softcap_scale)  # the cap itself is folded into qk_scale
    if MASKED == 1:
        s = mask_scores(s, offs_n, in_range, q_pos, window, SLIDING)
    elif MASKED == 2:
        if n0 + BLOCK_N > mask_from:
            s = mask_scores(s, offs_n, in_range, q_pos, window, SLIDING)
    # Scores in log2 units are s * qk_scale; the scaling folds into one FMA with the max subtraction.
    m_new = tl.maximum(m_i, row_max(s, 1) * qk_scale)
    if MASKED:
        m_new_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
    else:
        m_new_safe = m_new  # finite: every row sees the whole tile
    alpha = tl.exp2(m_i - m_new_safe)
    p = tl.exp2(s * qk_scale - m_new_safe[:, None])
    l_i = l_i * alpha + row_sum(p, 1)
    if KV_MODE == 2:
        v = tl.reshape(v_cache.load([n0 + stride_kb, head_off, 0]), [BLOCK_N, HEAD_PAD])
    elif MASKED:
        v = tl.load(v_cache + kv_offs, mask=kv_mask, other=0.0)
    elif HEAD_PAD != HEAD_DIM:
        v = tl.load(v_cache + kv_offs, mask=d_mask[None, :], other=0.0)
    else:
        v = tl.load(v_cache + kv_offs)
    acc = dot(p.to(v.dtype), v, acc * alpha[:, None], DOT_PRECISION, INTERPRET)
    return acc, m_new, l_i


@triton.jit
def mask_scores(s, offs_n, in_range, q_pos, window, SLIDING: tl.constexpr):
    """-inf for the keys a row may not see: past the range, after the row's position, or out of its window.

    SLIDING 1 (or True): `window` is a sliding window (q - k < window); 2: it is a chunk size (chunked attention,
    Llama4: only the keys of the row's own chunk, k >= q - q % window).
    """
    visible = (offs_n[None, :] <= q_pos[:, None]) & in_range[None, :]
    if SLIDING == 2:
        visible = visible & (offs_n[None, :] >= (q_pos - q_pos % window)[:, None])
    elif SLIDING:
        visible = visible & ((q_pos[:, None] - offs_n[None, :]) < window)
    return tl.where(visible, s, float("-inf"))


@triton.jit
def tile_rows(block_table, n0, end, stride_kb, stride_kt, head_off, BLOCK_SIZE: tl.constexpr,
              BLOCK_N: tl.constexpr):
    """The pool offsets of the KV tokens [n0, n0 + BLOCK_N) (those before `end`; block 0 for the rest, never read)."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    blk = tl.load(block_table + offs_n // BLOCK_SIZE, mask=offs_n < end, other=0)
    return blk.to(tl.int64) * stride_kb + (offs_n % BLOCK_SIZE) * stride_kt + head_off  # (BLOCK_N,)


@triton.jit
def attend_step(
    acc, m_i, l_i, rows, q, q_pos, k_cache, v_cache, block_table, stride_kb, stride_kt, head_off, n0, end,
    mask_from, qk_scale, softcap_scale, window, offs_d, d_mask,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
    MASKED: tl.constexpr, SLIDING: tl.constexpr, SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr, KV_MODE: tl.constexpr, PIPELINE: tl.constexpr,
):
    """One tile of `attend_loop`; KV_MODE 0 gathers the tile's rows, or (PIPELINE) the next tile's (returned, carried
    to the next step)."""
    if KV_MODE == 0:
        if PIPELINE:
            following = tile_rows(block_table, n0 + BLOCK_N, end, stride_kb, stride_kt, head_off, BLOCK_SIZE,
                                  BLOCK_N)
            tile = rows
        else:
            following = rows
            tile = tile_rows(block_table, n0, end, stride_kb, stride_kt, head_off, BLOCK_SIZE, BLOCK_N)
    else:
        following = rows
        tile = block_table
    acc, m_i, l_i = attend_tile(acc, m_i, l_i, q, q_pos, k_cache, v_cache, tile, stride_kb, stride_kt, head_off, n0,
                                end, mask_from, qk_scale, softcap_scale, window, offs_d, d_mask, BLOCK_SIZE, BLOCK_N,
                                HEAD_PAD, HEAD_DIM, MASKED, SLIDING, SOFTCAP, DOT_PRECISION, INTERPRET, KV_MODE)
    return acc, m_i, l_i, following


@triton.jit
def attend_loop(
    acc, m_i, l_i, q, q_pos, k_cache, v_cache, block_table, stride_kb, stride_kt, head_off,
    start, end,  # KV token range [start, end); a whole number of tiles unless MASKED
    mask_from,  # MASKED=2: the tiles reaching past it are masked
    qk_scale, softcap_scale, window, offs_d, d_mask,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
    MASKED: tl.constexpr, SLIDING: tl.constexpr, SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr, KV_MODE: tl.constexpr, PIPELINE: tl.constexpr,
):
    """KV_MODE 0: `block_table` points at the sequence's row; each tile's rows are gathered a tile ahead under
    PIPELINE (module docstring), else in the tile's own iteration. Else the K/V are packed rows (see `attend_tile`)."""
    if KV_MODE == 0 and PIPELINE:
        rows = tile_rows(block_table, start, end, stride_kb, stride_kt, head_off, BLOCK_SIZE, BLOCK_N)
    else:
        rows = start  # unused
    if INTERPRET:
        # NOTE: the CPU interpreter cannot bound range() by tensors under numpy >= 2.4 (its scalars are shape-(1,)
        # arrays); compiled code keeps the for loop, which is what the software pipeliner works on.
        n0 = start
        while n0 < end:
            acc, m_i, l_i, rows = attend_step(acc, m_i, l_i, rows, q, q_pos, k_cache, v_cache, block_table,
                                              stride_kb, stride_kt, head_off, n0, end, mask_from, qk_scale,
                                              softcap_scale, window, offs_d, d_mask, BLOCK_SIZE, BLOCK_N, HEAD_PAD,
                                              HEAD_DIM, MASKED, SLIDING, SOFTCAP, DOT_PRECISION, INTERPRET, KV_MODE,
                                              PIPELINE)
            n0 += BLOCK_N
    else:
        for n0 in range(start, end, BLOCK_N):
            acc, m_i, l_i, rows = attend_step(acc, m_i, l_i, rows, q, q_pos, k_cache, v_cache, block_table,
                                              stride_kb, stride_kt, head_off, n0, end, mask_from, qk_scale,
                                              softcap_scale, window, offs_d, d_mask, BLOCK_SIZE, BLOCK_N, HEAD_PAD,
                                              HEAD_DIM, MASKED, SLIDING, SOFTCAP, DOT_PRECISION, INTERPRET, KV_MODE,
                                              PIPELINE)
    return acc, m_i, l_i


@triton.jit
def attend_range(
    acc, m_i, l_i, q, q_pos, k_cache, v_cache, block_table, stride_kb, stride_kt, head_off,
    start, full_end, end,  # [start, full_end): whole tiles every row sees in full; [full_end, end): masked
    qk_scale, softcap_scale, window, offs_d, d_mask,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
    SLIDING: tl.constexpr, SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
    KV_MODE: tl.constexpr, PIPELINE: tl.constexpr,
):
    """The running softmax (acc, max, sum) carried over the KV tokens [start, end): one loop masking the tiles from
    full_end on (PIPELINE), else an unmasked loop and a masked one."""
    if PIPELINE:
        acc, m_i, l_i = attend_loop(acc, m_i, l_i, q, q_pos, k_cache, v_cache, block_table, stride_kb, stride_kt,
                                    head_off, start, end, full_end, qk_scale, softcap_scale, window, offs_d, d_mask,
                                    BLOCK_SIZE, BLOCK_N, HEAD_PAD, HEAD_DIM, 2, SLIDING, SOFTCAP, DOT_PRECISION,
                                    INTERPRET, KV_MODE, PIPELINE)
    else:
        acc, m_i, l_i = attend_loop(acc, m_i, l_i, q, q_pos, k_cache, v_cache, block_table, stride_kb, stride_kt,
                                    head_off, start, full_end, full_end, qk_scale, softcap_scale, window, offs_d,
                                    d_mask, BLOCK_SIZE, BLOCK_N, HEAD_PAD, HEAD_DIM, 0, SLIDING, SOFTCAP,
                                    DOT_PRECISION, INTERPRET, KV_MODE, PIPELINE)
        acc, m_i, l_i = attend_loop(acc, m_i, l_i, q, q_pos, k_cache, v_cache, block_table, stride_kb, stride_kt,
                                    head_off, full_end, end, full_end, qk_scale, softcap_scale, window, offs_d,
                                    d_mask, BLOCK_SIZE, BLOCK_N, HEAD_PAD, HEAD_DIM, 1, SLIDING, SOFTCAP,
                                    DOT_PRECISION, INTERPRET, KV_MODE, PIPELINE)
    return acc, m_i, l_i


@triton.jit
def attend(
    q, q_pos, k_cache, v_cache, block_table, stride_kb, stride_kt, head_off,
    start, full_end, end,  # [start, full_end): whole tiles every row sees in full; [full_end, end): masked
    qk_scale, softcap_scale, window, offs_d, d_mask,
    ROWS: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, SLIDING: tl.constexpr, SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr, PIPELINE: tl.constexpr,
):
    """Unnormalised attention of the ROWS query rows over the KV tokens [start, end) through the block table.
    Returns (acc, max, sum)."""
    acc = tl.full([ROWS, HEAD_PAD], 0.0, dtype=tl.float32)
    m_i = tl.full([ROWS], float("-inf"), dtype=tl.float32)
    l_i = tl.full([ROWS], 0.0, dtype=tl.float32)
    return attend_range(acc, m_i, l_i, q, q_pos, k_cache, v_cache, block_table, stride_kb, stride_kt, head_off,
                        start, full_end, end, qk_scale, softcap_scale, window, offs_d, d_mask, BLOCK_SIZE, BLOCK_N,
                        HEAD_PAD, HEAD_DIM, SLIDING, SOFTCAP, DOT_PRECISION, INTERPRET, 0, PIPELINE)


@triton.jit
def attend_key(acc, m_i, l_i, q, k, v, qk_scale, softcap_scale, SOFTCAP: tl.constexpr):
    """One online-softmax step of the rows of q (ROWS, HEAD_PAD) over one key k and value v (HEAD_PAD,), visible to
    every row (a decode step's own token). Returns (acc, max, sum) as `attend_tile` does."""
    s = row_sum(q.to(tl.float32) * k.to(tl.float32)[None, :], 1)  # (ROWS,) raw scores
    if SOFTCAP:
        s = tanh(s * softcap_scale)
    m_new = tl.maximum(m_i, s * qk_scale)  # finite: the key is visible
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s * qk_scale - m_new)
    return acc * alpha[:, None] + p[:, None] * v.to(tl.float32)[None, :], m_new, l_i * alpha + p
