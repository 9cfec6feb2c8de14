"""Triton matmul for a decode step's projections: `F.linear(x, weight, bias)` with at most 64 rows of x.

At a few rows a projection only streams its weight, so the kernel is built to read that weight at the copy rate:
each program walks a strip of `block_n` weight rows across its share of K (one of `split_k` shares) through a
pipeline of `num_stages` tiles, and multiplies each tile with the rows of x (padded to 16, the smallest dot, or to
32 or 64) as `weight_tile @ x_tile.T`, so the weight is the dot's wide operand. Where K is split, each program
leaves its partial sum in fp32 scratch and the last program of a strip (a per-strip counter, reset by that program)
adds the partials in split order: one launch, and the same bits whatever order the programs ran in.

A weight's strips rarely fill whole waves of the GPU (q/k/v's 192 strips of 64 rows take two waves of 132 SMs, the
second 45% full), so a config with `persistent` > 0 launches that many programs an SM instead and deals out the
work, (strip, K tile) pairs in strip order, evenly (stream-K): each program runs one pipelined loop over its share,
storing each strip it covers whole, and leaving the partial sums of the (at most two) strips it shares with its
neighbours in scratch; the last of a shared strip's programs to arrive adds them in program order.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from hf_paged.kernels.attention_tile import INTERPRET
from hf_paged.kernels.paged_decode import arrival_counters
from hf_paged.kernels.ops import SKINNY_MAX_ROWS as MAX_ROWS  # x padded to a dot operand of 16, 32 or 64 rows
from hf_paged.kernels.tuning import SkinnyConfig, default_skinny_config, sm_count


@triton.jit
def _accumulate(acc, w_ptrs, x_ptrs, k, offs_n, offs_m, offs_k, M, N, K, PRECISION: tl.constexpr,
                EVEN: tl.constexpr, INTERPRET: tl.constexpr):
    if EVEN:  # every strip whole, every share whole tiles inside K
        w = tl.load(w_ptrs + k)
        xt = tl.load(x_ptrs + k, mask=(offs_m < M)[None, :], other=0.0)
    else:
        w = tl.load(w_ptrs + k, mask=(offs_n < N)[:, None] & (offs_k + k < K)[None, :], other=0.0)
        xt = tl.load(x_ptrs + k, mask=(offs_m < M)[None, :] & (offs_k + k < K)[:, None], other=0.0)
    if INTERPRET:  # NOTE: triton 3.6's interpreter multiplies bfloat16 dot operands as garbage; fp32 is exact
        w, xt = w.to(tl.float32), xt.to(tl.float32)
    return tl.dot(w, xt, acc, input_precision=PRECISION)  # (BLOCK_N, ROWS)


@triton.jit(do_not_specialize=["M"])  # NOTE: compiled for one row apart the tiles ran up to 2.4x slower (H100)
def _skinny_kernel(
    x, weight, bias, out, partial, counters, M, N, K, k_per_split,
    stride_xm, stride_wn, stride_om,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr, EVEN: tl.constexpr, INTERPRET: tl.constexpr, ROWS: tl.constexpr,
):
    strip, share = tl.program_id(0), tl.program_id(1)
    offs_n = strip * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, ROWS)
    offs_k = tl.arange(0, BLOCK_K)
    w_ptrs = weight + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :]  # (BLOCK_N, BLOCK_K)
    x_ptrs = x + offs_m[None, :] * stride_xm + offs_k[:, None]  # (BLOCK_K, ROWS): x's rows as columns
    k_start = share * k_per_split
    acc = tl.full([BLOCK_N, ROWS], 0.0, dtype=tl.float32)
    if INTERPRET:  # NOTE: the CPU interpreter cannot bound range() by tensors (attention_tile.py says why)
        k = k_start
        while k < k_start + k_per_split:
            acc = _accumulate(acc, w_ptrs, x_ptrs, k, offs_n, offs_m, offs_k, M, N, K, PRECISION, EVEN, INTERPRET)
            k += BLOCK_K
    else:
        for k in range(k_start, k_start + k_per_split, BLOCK_K):  # the last share may run past K: masked
            acc = _accumulate(acc, w_ptrs, x_ptrs, k, offs_n, offs_m, offs_k, M, N, K, PRECISION, EVEN, INTERPRET)
    out_mask = (offs_n < N)[:, None] & (offs_m < M)[None, :]
    out_ptrs = out + offs_m[None, :] * stride_om + offs_n[:, None]  # (BLOCK_N, ROWS): out^T
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(bias + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[:, None]
        tl.store(out_ptrs, acc.to(out.dtype.element_ty), mask=out_mask)
    else:
        part_ptrs = partial + offs_m[None, :] * N + offs_n[:, None]  # (BLOCK_N, ROWS) of a [SPLIT_K, M, N] scratch
        tl.store(part_ptrs + share * M * N, acc, mask=out_mask)
        tl.debug_barrier()  # NOTE: every thread's partial is written before the release below
        arrived = tl.atomic_add(counters + strip, 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:  # the strip's last program: its partials are all visible (acquire)
            total = tl.full([BLOCK_N, ROWS], 0.0, dtype=tl.float32)
            for s in range(SPLIT_K):
                total += tl.load(part_ptrs + s * M * N, mask=out_mask, other=0.0, cache_modifier=".cg")
            if HAS_BIAS:
                total += tl.load(bias + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[:, None]
            tl.store(out_ptrs, total.to(out.dtype.element_ty), mask=out_mask)
            tl.atomic_xchg(counters + strip, 0)  # ready for the next launch (a CUDA graph's replay too)


@triton.jit
def _settle_strip(strip, p, start, end, T, W, P, bias, out, partial, counters, M, N, stride_om,
                  BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr, ROWS: tl.constexpr):
    """Stream-K: where program p covers only part of `strip` (its items [start, end)), arrive at the strip's
    counter; the last of its programs to arrive adds their partials in program order and stores the strip."""
    if (strip * T < start) | ((strip + 1) * T > end):
        offs_n = strip * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_m = tl.arange(0, ROWS)
        local = tl.arange(0, BLOCK_N)[:, None] * ROWS + offs_m[None, :]  # (BLOCK_N, ROWS) of a partial slot
        first = ((strip * T + 1).to(tl.int64) * P - 1) // W  # the programs holding the strip's first and last item
        last = (((strip + 1) * T).to(tl.int64) * P - 1) // W
        tl.debug_barrier()  # NOTE: every thread's partial is written before the release below
        arrived = tl.atomic_add(counters + strip, 1, sem="acq_rel")
        if arrived == last - first:  # the last to arrive: every partial of the strip is visible (acquire)
            total = tl.full([BLOCK_N, ROWS], 0.0, dtype=tl.float32)
            q = first
            while q <= last:
                q_first_strip = (q * W // P) // T  # a program's first strip is its slot 0, its last slot 1
                slot = tl.where(strip == q_first_strip, 0, 1)
                total += tl.load(partial + (q * 2 + slot) * BLOCK_N * ROWS + local, cache_modifier=".cg")
                q += 1
            if HAS_BIAS:
                total += tl.load(bias + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[:, None]
            out_mask = (offs_n < N)[:, None] & (offs_m < M)[None, :]
            tl.store(out + offs_m[None, :] * stride_om + offs_n[:, None], total.to(out.dtype.element_ty),
                     mask=out_mask)
            tl.atomic_xchg(counters + strip, 0)  # ready for the next launch (a CUDA graph's replay too)


@triton.jit(do_not_specialize=["M"])
def _skinny_stream_kernel(
    x, weight, bias, out, partial, counters, M, N, K, T, W, P,
    stride_xm, stride_wn, stride_om,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    EVEN: tl.constexpr, INTERPRET: tl.constexpr, ROWS: tl.constexpr,
):
    # The W = strips x T items (strip, K tile), strip-major; program p takes [p W / P, (p + 1) W / P).
    p = tl.program_id(0)
    start = (p.to(tl.int64) * W // P).to(tl.int32)
    end = ((p + 1).to(tl.int64) * W // P).to(tl.int32)
    offs_m = tl.arange(0, ROWS)
    offs_k = tl.arange(0, BLOCK_K)
    local = tl.arange(0, BLOCK_N)[:, None] * ROWS + offs_m[None, :]  # (BLOCK_N, ROWS) of a partial slot
    x_ptrs = x + offs_m[None, :] * stride_xm + offs_k[:, None]  # (BLOCK_K, ROWS): x's rows as columns
    first_strip = start // T
    acc = tl.full([BLOCK_N, ROWS], 0.0, dtype=tl.float32)
    # NOTE: one flat loop over the items (not one a strip), so the pipeline runs on across strip boundaries
    if INTERPRET:  # NOTE: the CPU interpreter cannot bound range() by tensors (attention_tile.py says why)
        it = start
        while it < end:
            acc = _stream_step(acc, it, start, end, p, first_strip, T, x_ptrs, weight, bias, out, partial, local,
                               offs_m, offs_k, M, N, K, stride_wn, stride_om, BLOCK_N, BLOCK_K, HAS_BIAS,
                               PRECISION, EVEN, INTERPRET, ROWS)
            it += 1
    else:
        for it in range(start, end):
            acc = _stream_step(acc, it, start, end, p, first_strip, T, x_ptrs, weight, bias, out, partial, local,
                               offs_m, offs_k, M, N, K, stride_wn, stride_om, BLOCK_N, BLOCK_K, HAS_BIAS,
                               PRECISION, EVEN, INTERPRET, ROWS)
    last_strip = (end - 1) // T
    _settle_strip(first_strip, p, start, end, T, W, P, bias, out, partial, counters, M, N, stride_om, BLOCK_N,
                  HAS_BIAS, ROWS)
    if last_strip != first_strip:
        _settle_strip(last_strip, p, start, end, T, W, P, bias, out, partial, counters, M, N, stride_om, BLOCK_N,
                      HAS_BIAS, ROWS)


@triton.jit
def _stream_step(acc, it, start, end, p, first_strip, T, x_ptrs, weight, bias, out, partial, local, offs_m, offs_k,
                 M, N, K, stride_wn, stride_om, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, EVEN: tl.constexpr, INTERPRET: tl.constexpr,
                 ROWS: tl.constexpr):
    """One item of a stream-K program: K tile `kt` of strip `strip` into acc; where the program's run of the strip
    ends, the strip stored (covered whole: from its first tile on) or its partial left in the program's slot."""
    strip = it // T
    kt = it - strip * T
    offs_n = strip * BLOCK_N + tl.arange(0, BLOCK_N)
    w_ptrs = weight + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :]  # (BLOCK_N, BLOCK_K)
    acc = _accumulate(acc, w_ptrs, x_ptrs, kt * BLOCK_K, offs_n, offs_m, offs_k, M, N, K, PRECISION, EVEN,
                      INTERPRET)
    done = (kt == T - 1) | (it == end - 1)
    if done:
        whole = (kt == T - 1) & (strip * T >= start)
        out_mask = (offs_n < N)[:, None] & (offs_m < M)[None, :]
        result = acc
        if HAS_BIAS:
            result += tl.load(bias + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[:, None]
        tl.store(out + offs_m[None, :] * stride_om + offs_n[:, None], result.to(out.dtype.element_ty),
                 mask=out_mask & whole)
        slot = tl.where(strip == first_strip, 0, 1)
        tl.store(partial + (p * 2 + slot) * BLOCK_N * ROWS + local, acc, mask=(local >= 0) & ~whole)  # all of it
    return tl.where(done, 0.0, acc)


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  config: SkinnyConfig | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)` for x of at most 64 rows (after flattening its leading dims; `ops.linear` sends it
    16 or fewer).

    Args:
        x: [..., K], K contiguous. weight: [N, K], K contiguous, x's dtype. bias: [N] or None.
        config: the tile (default: `default_skinny_config`).
    Returns: [..., N] in x's dtype.
    """
    if weight.dim() != 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x [..., K] and weight [N, K] disagree: {tuple(x.shape)} and {tuple(weight.shape)}")
    if x.dtype != weight.dtype or (bias is not None and bias.dtype != x.dtype):
        raise TypeError(f"x {x.dtype}, weight {weight.dtype} and bias {None if bias is None else bias.dtype} "
                        "must share a dtype")
    if x.stride(-1) != 1 or weight.stride(-1) != 1:
        raise ValueError("K must be the contiguous axis of x and weight")
    if bias is not None and (bias.shape != (weight.shape[0],) or bias.stride(0) != 1):
        raise ValueError(f"bias must be contiguous [N={weight.shape[0]}], got {tuple(bias.shape)}")
    if weight.device != x.device or (bias is not None and bias.device != x.device):
        raise ValueError(f"x, weight and bias must share a device: {x.device}, {weight.device}")
    lead, (n, k) = x.shape[:-1], weight.shape
    x2 = x.reshape(-1, k)  # (M, K)
    m = x2.shape[0]
    if m > MAX_ROWS:
        raise ValueError(f"skinny_linear takes at most {MAX_ROWS} rows, got {m}")
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    config = config or default_skinny_config(m, n, k, x.device)
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)  # (M, N)
    if m == 0 or n == 0:
        return out.reshape(*lead, n)
    if k == 0:
        return out.zero_().add_(bias if bias is not None else 0).reshape(*lead, n)
    rows = max(16, triton.next_power_of_2(m))  # x's rows padded to a dot operand
    strips = triton.cdiv(n, config.block_n)
    if config.persistent:
        tiles = triton.cdiv(k, config.block_k)  # T: K tiles a strip
        items = strips * tiles
        programs = min(items, config.persistent * sm_count(x.device))
        counters = arrival_counters(x.device, strips)
        if counters is not None:  # else (no counters inside a CUDA-graph capture) the strip grid below, unsplit
            partial = torch.empty(programs * 2, config.block_n, rows, dtype=torch.float32, device=x.device)
            _skinny_stream_kernel[(programs,)](
                x2, weight, bias if bias is not None else x2, out, partial, counters, m, n, k, tiles, items, programs,
                x2.stride(0), weight.stride(0), out.stride(0),
                BLOCK_N=config.block_n, BLOCK_K=config.block_k, HAS_BIAS=bias is not None,
                PRECISION="ieee" if x.dtype == torch.float32 or INTERPRET else "tf32",
                EVEN=n % config.block_n == 0 and k % config.block_k == 0, INTERPRET=INTERPRET, ROWS=rows,
                num_warps=config.num_warps, num_stages=config.num_stages,
            )
            return out.reshape(*lead, n)
        config = dataclasses.replace(config, persistent=0, split_k=1)
    k_per_split = triton.cdiv(triton.cdiv(k, config.split_k), config.block_k) * config.block_k
    split = triton.cdiv(k, k_per_split)  # no empty shares
    counters = arrival_counters(x.device, strips) if split > 1 else None
    if counters is None:  # no split, or no counters to be had inside a CUDA-graph capture
        split, k_per_split, counters = 1, triton.cdiv(k, config.block_k) * config.block_k, out
    partial = torch.empty(split, m, n, dtype=torch.float32, device=x.device) if split > 1 else out  # (S, M, N)
    _skinny_kernel[(strips, split)](
        x2, weight, bias if bias is not None else x2, out, partial, counters, m, n, k, k_per_split,
        x2.stride(0), weight.stride(0), out.stride(0),
        BLOCK_N=config.block_n, BLOCK_K=config.block_k, SPLIT_K=split, HAS_BIAS=bias is not None,
        PRECISION="ieee" if x.dtype == torch.float32 or INTERPRET else "tf32",
        EVEN=n % config.block_n == 0 and k % k_per_split == 0, INTERPRET=INTERPRET, ROWS=rows,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return out.reshape(*lead, n)
