"""Triton paged attention: the launcher of the split-K decode kernel (kernels/paged_decode.py) and the varlen
prefill kernel (kernels/paged_prefill.py), both GQA-aware.

Same function as `reference.paged_attention` (its module docstring gives the layouts); `paged_attention` checks the
inputs, then picks the decode kernel for a batch of single-token queries and the prefill kernel otherwise. Given
the step's own K/V (and its slots) the kernels read the new tokens from it (and store them): the engine's
forwards write and attend in one launch a layer.
"""

from __future__ import annotations

import torch
import triton

from hf_paged.kernels.attention_tile import INTERPRET
from hf_paged.kernels.paged_decode import launch_decode
from hf_paged.kernels.paged_prefill import launch_prefill
from hf_paged.kernels.tuning import (DecodeConfig, PrefillConfig, default_decode_config, default_prefill_config,
                                    use_pdl)

_LOG2E = 1.4426950408889634
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_HEAD_DIM = 256


def _check_inputs(query, key_cache, value_cache, block_tables, seq_lens, cu_seqlens_q, sliding_window, softcap,
                  chunk_size=None):
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
    if chunk_size is not None and (chunk_size < 1 or sliding_window is not None):
        raise ValueError(f"chunk_size must be >= 1 and without a sliding_window, got {chunk_size} / {sliding_window}")


def _check_new_kv(query, key_cache, key, value, slot_mapping):
    if (key is None) != (value is None):
        raise ValueError("give both key and value (the step's own K/V) or neither")
    if key is None:
        if slot_mapping is not None:
            raise ValueError("slot_mapping stores the step's own K/V: give key and value with it")
        return
    shape = (query.shape[0], key_cache.shape[2], key_cache.shape[3])
    for name, t in (("key", key), ("value", value)):
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must be [num_tokens, num_kv_heads, head_dim] = {shape}, got {tuple(t.shape)}")
        if t.dtype != key_cache.dtype or t.device != query.device:
            raise TypeError(f"{name} is {t.dtype} on {t.device}; the caches are {key_cache.dtype} on {query.device}")
    # NOTE: one token's rows may carry any stride along the token axis (torch calls them contiguous either way)
    if key.stride(-1) != 1 or any(a != b for a, b, n in zip(key.stride(), value.stride(), key.shape) if n > 1):
        raise ValueError(f"key and value need one layout with head_dim contiguous, strides {key.stride()} and "
                         f"{value.stride()}")
    if slot_mapping is not None:
        if tuple(slot_mapping.shape) != (query.shape[0],) or slot_mapping.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"slot_mapping must be int32/int64 [num_tokens={query.shape[0]}], got "
                             f"{slot_mapping.dtype} {tuple(slot_mapping.shape)}")
        if slot_mapping.device != query.device or slot_mapping.stride(0) != 1:
            raise ValueError(f"slot_mapping must be contiguous on {query.device}, got {slot_mapping.device} "
                             f"strides {slot_mapping.stride()}")


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
    slot_mapping: torch.Tensor | None = None,
    *,
    fresh: bool = False,
    sinks: torch.Tensor | None = None,
    chunk_size: int | None = None,
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
            the head_dim axis contiguous, the caches' dtype): the kernels then read the new tokens' keys from them
            and only the earlier context through the block tables.
        slot_mapping: [num_tokens] int32/int64 (-1: skip), with key/value: the kernels also store the step's K/V
            into these slots (`write_kv`'s job), so the caches need not hold them yet. Without it they must.
        fresh: with key/value, a promise that every sequence's context is just its new tokens (seq_len == its
            q_len: prompts without a cached prefix); the prefill kernel then reads nothing through the block
            tables, and compiles without that code (fewer registers). Not checked (that would read the device):
            a batch with cached context gives wrong results under it.
        sinks: [num_q_heads] attention sinks (gpt-oss's `s_aux`): one more logit per head in each softmax's
            denominator, attached to no value.
        chunk_size: chunked attention (Llama4): a query sees only the keys of its own chunk of `chunk_size`
            positions (the kernels' SLIDING=2, `window` then holding the chunk size).
        config: a DecodeConfig / PrefillConfig to override the tuned defaults (benchmarks, tests).
    Returns:
        [num_tokens, num_q_heads, head_dim] in query's dtype.
    """
    _check_inputs(query, key_cache, value_cache, block_tables, seq_lens, cu_seqlens_q, sliding_window, softcap,
                  chunk_size)
    _check_new_kv(query, key_cache, key, value, slot_mapping)
    if sinks is not None and (tuple(sinks.shape) != (query.shape[1],) or sinks.device != query.device):
        raise ValueError(f"sinks must be [num_q_heads={query.shape[1]}] on {query.device}, got {tuple(sinks.shape)} "
                         f"on {sinks.device}")
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
        SLIDING=2 if chunk_size is not None else sliding_window is not None, SOFTCAP=softcap is not None,
        DOT_PRECISION="ieee" if query.dtype == torch.float32 else "tf32", INTERPRET=INTERPRET,
        PDL=not INTERPRET and use_pdl(query.device),
        SINKS=sinks is not None, sinks=query if sinks is None else (sinks.float() * _LOG2E).contiguous(),
    )
    window = chunk_size if chunk_size is not None else sliding_window if sliding_window is not None else 0
    args = (query, key_cache, value_cache, block_tables, seq_lens, cu_seqlens_q,
            query.stride(0), query.stride(1), out.stride(0), out.stride(1),
            key_cache.stride(0), key_cache.stride(1), key_cache.stride(2), block_tables.stride(0),
            qk_scale, softcap_scale, window)
    if max_seqlen_q <= 1:
        cfg = config or default_decode_config(num_seqs, num_kv_heads, head_dim, query.device)
        if not isinstance(cfg, DecodeConfig):
            raise TypeError(f"a decode batch (max_seqlen_q = 1) needs a DecodeConfig, got {cfg!r}")
        launch_decode(out, args, common, cfg, num_seqs, num_kv_heads, num_q_heads, head_dim, key, value,
                      slot_mapping)
    else:
        cfg = config or default_prefill_config(group, head_dim, query.device, own_kv=key is not None)
        if not isinstance(cfg, PrefillConfig):
            raise TypeError(f"a prefill batch (max_seqlen_q > 1) needs a PrefillConfig, got {cfg!r}")
        launch_prefill(out, args, common, cfg, num_seqs, num_kv_heads, query, key, value, slot_mapping, fresh)
    return out
