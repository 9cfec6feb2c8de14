"""Tile configurations of the paged-attention kernels, and the defaults picked per launch (tuned on an H100)."""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import triton

from hf_paged.kernels.ops import decode_heads_first, env_choice


@dataclass(frozen=True, slots=True)
class DecodeConfig:
    block_n: int  # KV tokens per loop step
    num_splits: int  # programs per (sequence, KV head); > 1 merges their partial results
    num_warps: int = 4
    num_stages: int = 3
    fused_reduce: bool = True  # the last split to finish merges (else a second launch, `_reduce_kernel`, does)
    # tiles a split holds at least: a sequence shorter than num_splits x this many tiles uses fewer splits (the
    # rest exit at once, writing nothing, and the merges leave them out), so a batch of mixed lengths splits only
    # its long sequences
    min_split_tiles: int = 1
    # the grid's fastest axis is the KV head instead of the sequence: (Hkv, S, splits). The GPU hands out
    # programs in grid order, so all heads of a sequence run side by side (reading one token's rows of every head,
    # adjacent in the pool) and, in a batch sorted longest first (the engine's), the long sequences start in the
    # first wave. default_decode_config sets it unless HF_PAGED_DECODE_ORDER=sequences (kernels/ops.py)
    heads_fastest: bool = False


@dataclass(frozen=True, slots=True)
class PrefillConfig:
    block_m: int  # rows per program (query tokens x query heads of one KV group)
    block_n: int  # KV tokens per loop step
    num_warps: int = 4
    num_stages: int = 3
    tma: bool = True  # the step's own K/V, when given, through TMA tensor descriptors (else by pointer)
    # with slots to store the step's own K/V into: after the tile's attention (its output written) instead of
    # before it; the stores then overlap other programs' tensor-core work rather than all programs' first wave
    store_last: bool = False


@dataclass(frozen=True, slots=True)
class SkinnyConfig:
    """A tile of kernels/skinny_matmul.py: block_n weight rows a program, block_k of K a step, K in split_k shares."""

    block_n: int = 64
    block_k: int = 128
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 4
    # > 0: this many programs an SM share the (strip, K tile) items evenly (stream-K) and split_k is not used;
    # 0: one program a strip and K share
    persistent: int = 0

    def __post_init__(self):
        if any(b < 16 or b & (b - 1) for b in (self.block_n, self.block_k)):
            raise ValueError(f"block_n and block_k must be powers of 2 >= 16, got {self.block_n}, {self.block_k}")
        if self.split_k < 1 or self.persistent < 0:
            raise ValueError(f"split_k must be >= 1 and persistent >= 0, got {self.split_k}, {self.persistent}")


@functools.cache
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def sm_count(device: torch.device) -> int:
    """The device's SMs; 4 off CUDA (the CPU interpreter's stand-in, small enough to split tiny test shapes)."""
    return _num_sms(device) if device.type == "cuda" else 4


@functools.cache
def _shared_memory(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).shared_memory_per_multiprocessor if device.type == "cuda" else 0


@functools.cache
def hopper_or_newer(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device)[0] >= 9


def use_pdl(device: torch.device) -> bool:
    """Programmatic dependent launch for the attention kernels (`HF_PAGED_PDL=1`, Hopper and newer; off by
    default, an experiment): a launch may start while the kernel before it finishes, and waits for it
    (`griddepcontrol.wait`) before reading anything, so a CUDA graph's back-to-back small kernels overlap their
    launch latency. The engine's compilations then ask inductor for the same (engine/compiled.py)."""
    return os.environ.get("HF_PAGED_PDL") == "1" and device.type == "cuda" and hopper_or_newer(device)


def default_decode_config(num_seqs: int, num_kv_heads: int, head_dim: int, device: torch.device) -> DecodeConfig:
    """Split the context until the grid holds about one program per SM (few long sequences need it most); the last
    split to finish merges the partials only for two splits, a second launch merges more.

    Measured on an H200 (docs/kernels.md, one decode layer from a CUDA graph, context 512): one sequence x 8 KV
    heads took 7.0 us at 16 splits merged by a second launch, 10.4 us merged by the last split; 16 x 8 took 13.6
    us at 2 splits merged by the last, 14.1 at 4. Batch 64 x 8 KV heads runs fastest unsplit (H100).
    """
    if device.type != "cuda":  # the CPU interpreter: small tiles, one split
        return DecodeConfig(block_n=16, num_splits=1, num_warps=1, num_stages=1)
    programs = max(num_seqs * num_kv_heads, 1)
    splits = min(16, triton.next_power_of_2(triton.cdiv(_num_sms(device), programs)))
    min_tiles = 1
    if long := long_splits():  # the experiment: at least S splits, for the sequences long enough to fill them
        splits, min_tiles = max(splits, long[0]), long[1]
    return DecodeConfig(block_n=64 if head_dim <= 128 else 32, num_splits=splits, num_warps=4, num_stages=3,
                        fused_reduce=splits <= 2, min_split_tiles=min_tiles,
                        heads_fastest=decode_heads_first())


def long_splits() -> tuple[int, int] | None:
    """`HF_PAGED_LONG_SPLITS=S:M` (an experiment, unset by default): every decode launch has at least S splits
    of at least M tiles each (`DecodeConfig.min_split_tiles`), so in a batch of mixed lengths only the long
    sequences spread over several programs. None when unset; a malformed value is a ValueError."""
    value = os.environ.get("HF_PAGED_LONG_SPLITS", "").strip()
    if not value:
        return None
    try:
        splits, tiles = (int(part) for part in value.split(":"))
    except ValueError:
        splits = tiles = 0
    if not (1 <= splits <= 16 and tiles >= 1):
        raise ValueError(f"HF_PAGED_LONG_SPLITS={value!r}: expected S:M, 1 <= S <= 16 splits of M >= 1 tiles")
    return splits, tiles


def default_prefill_config(group: int, head_dim: int, device: torch.device, own_kv: bool = False) -> PrefillConfig:
    """32-64 query tokens and 32 keys a step, one warpgroup (fastest of a sweep on an H100, docs/kernels.md); 64
    rows and 64 keys a step where the step's own K/V comes through TMA (fastest of a sweep on an H200, GQA and MHA),
    storing it after the tile's attention (fastest of the H100 sweep of 2026-12-07: MHA 0.2480 against 0.2836 ms
    stored first, GQA 4 0.2053 against 0.2112)."""
    if device.type != "cuda":
        return PrefillConfig(block_m=max(16, triton.next_power_of_2(group)), block_n=16, num_warps=1, num_stages=1)
    if head_dim > 128:
        return PrefillConfig(block_m=64, block_n=32, num_warps=4, num_stages=2)
    if own_kv:
        return PrefillConfig(block_m=64, block_n=64, num_warps=4, num_stages=3, store_last=True)
    return PrefillConfig(block_m=64 if group == 1 else 128, block_n=32, num_warps=4, num_stages=3)


def default_skinny_config(m: int, n: int, k: int, device: torch.device) -> SkinnyConfig:
    """The H100's best skinny-matmul tiles for a Llama-2-7B decode step at 2-16 rows (docs/kernels.md, "The skinny
    matmul"): a weight of at least a wave of 64-row strips streams them unsplit, six stages deep where shared memory
    allows (q/k/v, gate/up, the LM head); a narrower one takes 16-row strips (o), unless its K is long enough to
    halve instead (down). Off CUDA (the CPU interpreter) as for 4 SMs.

    `HF_PAGED_SKINNY_GRID=stream` (an experiment, not yet timed on a GPU): stream-K over one program an SM, 64 x 128
    tiles as deep, for every shape. The sweep found each SM streaming its strips at its share of the copy rate and
    the time set by the waves the strips fill: q/k/v's 192 strips of 64 rows take two waves of 132 SMs (46.3 us; 33
    us at the copy rate), gate/up's 344 three (72.7 us; 59 us); dealt out evenly, the part-filled last wave goes.
    """
    stages = 6 if device.type == "cuda" and _shared_memory(device) >= 160 * 1024 else 4
    if skinny_grid() == "stream":
        return SkinnyConfig(64, 128, 1, 4, stages, persistent=1)
    if triton.cdiv(n, 64) >= sm_count(device):
        return SkinnyConfig(64, 128, 1, 4, stages)
    if k >= 2 * n:
        return SkinnyConfig(64, 128, 2, 4, 4)
    return SkinnyConfig(16, 256, 1, 4, 4)


def skinny_grid() -> str:
    """`HF_PAGED_SKINNY_GRID`: `strips` (default: one program a strip and K share) or `stream` (stream-K, see
    default_skinny_config). Else a ValueError."""
    return env_choice("HF_PAGED_SKINNY_GRID", ("strips", "stream"))
