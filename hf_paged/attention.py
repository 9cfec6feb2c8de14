"""The "paged" attention implementation registered in transformers' AttentionInterface.

One stateless function fed through kwargs (as HF's integrations/sdpa_paged.py): `PagedCache.update` writes the
step's new K/V into the block pools and puts a `PagedAttentionMetadata` plus the layer's pools into the attention
module's kwargs; this function reads K/V straight through the block tables. Without that metadata (no PagedCache
in the forward) it attends over the contiguous K/V transformers passes, with the mask from `paged_mask`, so
correctness never depends on which cache is in use.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from hf_paged.kernels import ops
from hf_paged.kernels.reference import softmax_with_sinks

METADATA_KEY = "paged_metadata"
KV_POOL_KEY = "paged_kv_pool"
SLOTS_KEY = "paged_slot_mapping"  # the engine's compiled layers: the KV write happens here, into the module's pools
# Attention modules that tile the K/V heads they cached over their query heads after cache.update
# (JetMoE: `key_states.repeat(1, top_k, 1, 1)`): query head i reads K/V head i % Hkv, not the kernels' GQA i // group.
TILED_KV_MODULES = ("JetMoeAttention",)


@dataclass(slots=True)
class PagedAttentionMetadata:
    """Per-forward metadata shared by every layer (block ids mean the same slots in every layer's pool).

    The forward's query is [B, Hq, Q, D]; its B*Q positions are flattened row-major and `query_index` picks the
    ones that are real tokens (None: all of them), packed sequence after sequence as `cu_seqlens_q` describes.
    """

    block_tables: torch.Tensor  # (S, max_blocks) int32
    seq_lens: torch.Tensor  # (S,) int32: context per sequence, this step's tokens included
    cu_seqlens_q: torch.Tensor  # (S + 1,) int32
    query_index: torch.Tensor | None  # (T,) int64 into the flattened B*Q positions
    max_seqlen_q: int
    fresh: bool = False  # no sequence has context before this forward's tokens (prompts without a cached prefix)


@dataclass(slots=True)
class LayerKV:
    key_cache: torch.Tensor  # (num_blocks, block_size, Hkv, D)
    value_cache: torch.Tensor
    sliding_window: int | None
    chunk_size: int | None = None  # chunked attention (Llama4's attention_chunk_size): keys of the query's own chunk


def paged_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention of `query` [B, Hq, Q, D] over paged K/V. Returns ([B, Q, Hq, D], None)."""
    if kwargs.get("output_attentions"):
        raise ValueError("the 'paged' attention does not return attention weights; use attn_implementation='eager'")
    if dropout:
        raise ValueError("the 'paged' attention is for inference; it does not support attention dropout")
    meta: PagedAttentionMetadata | None = kwargs.get(METADATA_KEY)
    layer: LayerKV | None = kwargs.get(KV_POOL_KEY)
    slots = kwargs.get(SLOTS_KEY)  # the engine's compiled layers: the step's K/V is stored here, not in cache.update
    if slots is not None:
        layer = bound_pools(module)
    if meta is None or layer is None:
        return _contiguous_attention(module, query, key, value, attention_mask, scaling, softcap, **kwargs)
    tiled = type(module).__name__ in TILED_KV_MODULES
    if tiled and key.shape[1] != layer.key_cache.shape[2]:
        return _tiled_kv_attention(module, query, key, value, attention_mask, dropout, scaling, sliding_window,
                                   softcap, layer.key_cache.shape[2], **kwargs)

    sinks = kwargs.get("s_aux")  # attention sinks (gpt-oss and others): one more logit per head in the denominator
    batch, num_q_heads, q_len, head_dim = query.shape
    scale = scaling if scaling is not None else head_dim**-0.5
    chunk = layer.chunk_size
    window = None if chunk is not None else sliding_window if sliding_window is not None else layer.sliding_window
    flat_q = query.transpose(1, 2).reshape(batch * q_len, num_q_heads, head_dim)  # (B*Q, Hq, D)
    packed_q = (flat_q if meta.query_index is None else flat_q.index_select(0, meta.query_index)).contiguous()
    # The kernels take the step's own K/V apart where its rows are the packed queries' (no padded batch) and the
    # pool holds the same values (its dtype): a decode step with slots (the engine's layers) then stores and
    # attends in one launch; a decode step without (generate: cache.update has stored its token) reads the pool.
    # A prefill takes them only for fresh prompts (no cached context: no block-table reads at all). With cached
    # context the kernel reading both ways ran slower than the block tables alone (H200, MHA:
    # prefix chunks 0.249 against 0.211 ms, a mixed step 0.437 against 0.344; docs/kernels.md).
    # NOTE: contiguous rows: the kernels take one layout for both, and a compiled graph may lay K and V out apart.
    tables = (meta.block_tables, meta.seq_lens, meta.cu_seqlens_q)
    expand = getattr(module, "expand_kv", None)  # multi-head latent attention: the pools hold latents
    if expand is not None:
        if slots is not None:
            raise ValueError(f"{type(module).__name__} caches latents: the engine runs it without compiled layers")
        packed_out = ops.latent_attention(packed_q, layer.key_cache, layer.value_cache, *tables, scale, expand, window,
                                          softcap, sinks, chunk)  # (T, Hq, Dv)
        return _unpack(packed_out, meta, batch, q_len), None
    decode = meta.max_seqlen_q == 1
    own_kv = (meta.query_index is None and key.dtype == layer.key_cache.dtype
              and (slots is not None if decode else meta.fresh))
    new_k, new_v = (token_rows(key), token_rows(value)) if own_kv else (None, None)  # (T, Hkv, D)
    if slots is not None and own_kv:  # store and attend in one launch (Triton)
        packed_out = ops.write_and_attend(packed_q, new_k, new_v, layer.key_cache, layer.value_cache, slots, *tables,
                                          scale, window, softcap, meta.max_seqlen_q, meta.fresh, sinks,
                                          chunk_size=chunk)  # (T, Hq, D)
    else:
        if slots is not None:
            ops.write_kv(token_rows(key), token_rows(value), layer.key_cache, layer.value_cache, slots)
        packed_out = ops.paged_attention(packed_q, layer.key_cache, layer.value_cache, *tables, scale,
                                         sliding_window=window, softcap=softcap, max_seqlen_q=meta.max_seqlen_q,
                                         key=new_k, value=new_v, fresh=meta.fresh, sinks=sinks,
                                         chunk_size=chunk)  # (T, Hq, D)
    return _unpack(packed_out, meta, batch, q_len), None


def _tiled_kv_attention(module, query, key, value, attention_mask, dropout, scaling, sliding_window, softcap,
                        num_kv_heads, **kwargs):
    """JetMoE's mixture of attention: K/V [B, r*Hkv, Q, D] are the cached Hkv heads tiled r = top_k times, query head
    e*Hkv + h reading K/V head h. Reorder the query heads to GQA order (h*r + e), attend over the Hkv heads the pool
    holds (the first Hkv of the tiled ones), and put the output heads back."""
    batch, num_q_heads, q_len, head_dim = query.shape
    rep = key.shape[1] // num_kv_heads
    if key.shape[1] != rep * num_kv_heads or num_q_heads != key.shape[1]:
        raise ValueError(
            f"{type(module).__name__} passes {num_q_heads} query and {key.shape[1]} K/V heads where cache.update "
            f"stored {num_kv_heads}: not JetMoE's tiling; cache_implementation='paged' does not support it"
        )
    query = query.view(batch, rep, num_kv_heads, q_len, head_dim).transpose(1, 2).reshape(query.shape)
    if kwargs.get("s_aux") is not None:
        kwargs["s_aux"] = kwargs["s_aux"].view(rep, num_kv_heads).t().reshape(-1)
    out, _ = paged_attention_forward(module, query, key[:, :num_kv_heads], value[:, :num_kv_heads], attention_mask,
                                     dropout, scaling, sliding_window, softcap, **kwargs)  # [B, Q, Hq, D], GQA order
    return out.view(batch, q_len, num_kv_heads, rep, -1).transpose(2, 3).reshape(out.shape), None


def _unpack(packed_out: torch.Tensor, meta: PagedAttentionMetadata, batch: int, q_len: int) -> torch.Tensor:
    """The packed rows [T, Hq, Dv] back at their places in the forward's [B, Q, Hq, Dv] (padding: zeros)."""
    if meta.query_index is None:
        out = packed_out
    else:
        out = packed_out.new_zeros(batch * q_len, *packed_out.shape[1:])
        out.index_copy_(0, meta.query_index, packed_out)
    return out.view(batch, q_len, *packed_out.shape[1:])


def bind_pools(module: torch.nn.Module, layer: LayerKV | None) -> None:
    """Give an attention module its layer's pools (None: take them back). The engine's compiled decoder layers read
    them there: reached through the module, they are inputs of one graph that every layer shares, where reaching
    them through the cache by layer index would compile every layer apart."""
    if layer is None:
        for name in ("hf_paged_keys", "hf_paged_values", "hf_paged_window", "hf_paged_chunk"):
            module.__dict__.pop(name, None)
    else:
        module.hf_paged_keys, module.hf_paged_values = layer.key_cache, layer.value_cache
        module.hf_paged_window = layer.sliding_window
        module.hf_paged_chunk = layer.chunk_size


def bound_pools(module: torch.nn.Module) -> LayerKV:
    return LayerKV(module.hf_paged_keys, module.hf_paged_values, module.hf_paged_window, module.hf_paged_chunk)


def token_rows(states: torch.Tensor) -> torch.Tensor:
    """K or V states [B, Hkv, Q, D] as contiguous rows per token [B*Q, Hkv, D], as the KV write takes them."""
    batch, heads, q_len, dim = states.shape
    return states.transpose(1, 2).reshape(batch * q_len, heads, dim).contiguous()


def _contiguous_attention(module, query, key, value, attention_mask, scaling, softcap, **kwargs):
    """Attention over ordinary contiguous K/V [B, Hkv, L, D] with a boolean (or absent = causal) mask."""
    kwargs.pop("sliding_window", None)
    sinks = kwargs.pop("s_aux", None)
    if softcap is None and sinks is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    # Soft-capping (Gemma2) and attention sinks (gpt-oss) need the scores before softmax: plain eager math.
    group = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(group, dim=1)
    value = value.repeat_interleave(group, dim=1)
    scores = torch.matmul(query, key.transpose(2, 3)) * (scaling if scaling is not None else query.shape[-1] ** -0.5)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap  # (B, Hq, Q, L)
    q_len, kv_len = query.shape[2], key.shape[2]
    if attention_mask is None:
        q_pos = torch.arange(kv_len - q_len, kv_len, device=query.device)[:, None]
        attention_mask = torch.arange(kv_len, device=query.device)[None, :] <= q_pos
    if attention_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
    else:
        scores = scores + attention_mask
    probs = softmax_with_sinks(scores.float(), sinks).to(query.dtype)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), None


def paged_mask(*args, **kwargs):
    """Mask function registered for "paged" (without one, transformers would hand the attention no padding mask).

    With a PagedCache the block tables carry causality and padding and this mask is ignored; it exists for forwards
    without one, where it is exactly sdpa's boolean mask.
    """
    return sdpa_mask(*args, **kwargs)
