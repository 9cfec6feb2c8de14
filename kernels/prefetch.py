"""L2 prefetch of a weight from inside an attention launch (`HF_PAGED_PREFETCH=1`; an experiment, off by default).

A decode step of a few sequences is latency-bound in its attention (a few us a layer in which HBM is mostly idle)
and then reads the layer's o_proj weight (32 MiB for a 7B model) at well under the copy bandwidth. With the
switch on, every program of the decode kernel first hands the TMA unit a slice of that weight to pull into L2
(`cp.async.bulk.prefetch.L2`, Hopper and newer: no registers, no wait; marked evict_last, so the attention's own
K/V lines leave L2 first), so the weight streams while the attention runs and the matmul after it reads L2. Only
for batches of at most `PREFETCH_MAX_SEQS` sequences: a larger batch's K/V would evict the lines, and its
attention is bandwidth-bound already. Results do not depend on it (a prefetch
moves no data that any kernel reads).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from hf_paged.kernels.tuning import hopper_or_newer

PREFETCH_MAX_SEQS = 4


def prefetch_enabled(device: torch.device) -> bool:
    """The switch is on and the device is a Hopper or newer GPU (bulk prefetches are sm_90 instructions)."""
    return os.environ.get("HF_PAGED_PREFETCH") == "1" and device.type == "cuda" and hopper_or_newer(device)


@functools.cache
def l2_bytes(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).L2_cache_size


def prefetch_target(weight: torch.Tensor | None, num_seqs: int) -> torch.Tensor | None:
    """`weight` where the decode kernel can prefetch it for this batch (16-byte aligned, a multiple of 16 bytes,
    contiguous, at most 3/4 of L2 (a 70B model's 128 MiB o_proj would only thrash it), on a Hopper+ GPU, few
    sequences, the switch on), else None."""
    if weight is None or num_seqs > PREFETCH_MAX_SEQS or not prefetch_enabled(weight.device):
        return None
    nbytes = weight.nbytes
    if not weight.is_contiguous() or weight.data_ptr() % 16 or nbytes % 16 or 4 * nbytes > 3 * l2_bytes(weight.device):
        return None
    return weight


@triton.jit
def prefetch_l2(base, nbytes, LANES: tl.constexpr):
    """This program's share of the bytes [base, base + nbytes) into L2: the grid's programs split them in equal
    16-byte aligned slices, each slice over LANES threads (one bulk prefetch a thread; LANES = the threads of
    the program, so no two threads repeat one)."""
    program = (tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)) * tl.num_programs(2) + tl.program_id(2)
    programs = tl.num_programs(0) * tl.num_programs(1) * tl.num_programs(2)
    piece = ((nbytes + programs * LANES - 1) // (programs * LANES) + 15) // 16 * 16  # bytes a thread
    start = (program * LANES + tl.arange(0, LANES)).to(tl.int64) * piece  # (LANES,)
    size = tl.minimum(tl.maximum(nbytes - start, 0), piece).to(tl.int32)
    ptrs = base.to(tl.pointer_type(tl.int8)) + start
    # evict_last: the attention's own K/V stream (evict_normal) goes first, not the weight it is waiting for
    tl.inline_asm_elementwise(
        "{ .reg .pred p; .reg .b64 policy; setp.gt.s32 p, $2, 0; "
        "createpolicy.fractional.L2::evict_last.b64 policy, 1.0; "
        "@p cp.async.bulk.prefetch.L2.global.L2::cache_hint [$1], $2, policy; mov.u32 $0, 0; }",
        "=r,l,r", [ptrs, size], dtype=tl.int32, is_pure=False, pack=1)
