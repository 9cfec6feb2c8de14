"""Plain torch versions of every paged kernel: the CPU path and the tests' ground truth.

Layouts shared by all kernels (vLLM's vocabulary):
    key_cache, value_cache  [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables            [num_seqs, max_blocks_per_seq] int32, -1 (or anything) past a sequence's last block
    seq_lens                [num_seqs] int32: tokens of context per sequence, new tokens included
    cu_seqlens_q            [num_seqs + 1] int32: offsets of each sequence's queries in the packed query
    slot_mapping            [num_tokens] int64: block_id * block_size + offset, -1 = do not store
Query token k of sequence s (q_len_s = cu_seqlens_q[s+1] - cu_seqlens_q[s]) sits at absolute position
p = seq_lens[s] - q_len_s + k and attends to the keys at positions j with j <= p and, given a sliding window W,
p - j < W (Hugging Face's convention: the window counts the query's own position), or given a chunk size C
(Llama4's chunked attention), j // C == p // C: only the keys of the query's own chunk, the chunks counted from
the sequence's first stored token (Hugging Face's chunked mask counts them from the first non-padding one).
"""

import torch


def gather_kv(cache: torch.Tensor, block_table: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Read the first `seq_len` tokens of one sequence out of a paged cache.

    Returns: [seq_len, num_kv_heads, head_dim]
    """
    block_size = cache.shape[1]
    num_blocks = -(-seq_len // block_size)
    blocks = cache[block_table[:num_blocks].long()]  # (nb, bs, Hkv, D)
    return blocks.reshape(-1, *cache.shape[2:])[:seq_len]


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
    sinks: torch.Tensor | None = None,
    expand=None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Varlen causal attention of packed queries over paged K/V (decode is the case q_len_s == 1).

    Args:
        query: [num_tokens, num_q_heads, head_dim], the queries of all sequences packed back to back.
        sinks: [num_q_heads] attention sinks (gpt-oss's `s_aux`): one more logit per head in each softmax's
            denominator, attached to no value.
        expand: for caches of latents (multi-head latent attention): the model's `expand_kv(k, v)`, which turns a
            sequence's cached [1, Hc, L, Dc] pair into its K [1, Hkv, L, D] and V [1, Hkv, L, Dv].
        chunk_size: chunked attention (module docstring); not together with sliding_window.
    Returns:
        [num_tokens, num_q_heads, Dv] in the query's dtype (Dv: the values' head_dim); computed in float32.
    """
    num_tokens, num_q_heads, head_dim = query.shape
    out = None
    assert sliding_window is None or chunk_size is None, "give a sliding window or a chunk size, not both"
    seq_lens_l = seq_lens.tolist()
    cu_l = cu_seqlens_q.tolist()
    for s, seq_len in enumerate(seq_lens_l):
        q_start, q_end = cu_l[s], cu_l[s + 1]
        q_len = q_end - q_start
        if q_len == 0:
            continue
        assert q_len <= seq_len, f"sequence {s}: {q_len} queries but only {seq_len} tokens of context"
        k = gather_kv(key_cache, block_tables[s], seq_len).transpose(0, 1)  # (Hkv, L, D)
        v = gather_kv(value_cache, block_tables[s], seq_len).transpose(0, 1)
        if expand is not None:
            k, v = (t[0] for t in expand(k[None], v[None]))
        assert num_q_heads % k.shape[0] == 0, (num_q_heads, k.shape[0])
        group = num_q_heads // k.shape[0]
        k = k.float().repeat_interleave(group, dim=0)  # (Hq, L, D)
        v = v.float().repeat_interleave(group, dim=0)
        if out is None:
            out = query.new_zeros(num_tokens, num_q_heads, v.shape[-1])
        q = query[q_start:q_end].float().transpose(0, 1)  # (Hq, q_len, D)
        scores = torch.matmul(q, k.transpose(1, 2)) * scale  # (Hq, q_len, L)
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        q_pos = torch.arange(seq_len - q_len, seq_len, device=query.device)[:, None]
        k_pos = torch.arange(seq_len, device=query.device)[None, :]
        visible = k_pos <= q_pos
        if sliding_window is not None:
            visible &= (q_pos - k_pos) < sliding_window
        if chunk_size is not None:
            visible &= k_pos >= q_pos - q_pos % chunk_size
        scores = scores.masked_fill(~visible, float("-inf"))
        probs = softmax_with_sinks(scores, sinks)
        out[q_start:q_end] = torch.matmul(probs, v).transpose(0, 1).to(query.dtype)
    return query.new_zeros(num_tokens, num_q_heads, head_dim) if out is None else out  # None: no queries at all


def softmax_with_sinks(scores: torch.Tensor, sinks: torch.Tensor | None) -> torch.Tensor:
    """Softmax over the last axis of scores [..., Hq, Q, L]; with sinks [Hq], each head's sink joins the
    denominator as one more logit and its own probability is dropped."""
    if sinks is None:
        return torch.softmax(scores, dim=-1)
    sink = sinks.to(scores.dtype).view(-1, 1, 1).expand(*scores.shape[:-1], 1)
    return torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]


def write_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Store key/value [num_tokens, num_kv_heads, head_dim] into the cache slots of `slot_mapping` (-1: skip)."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    key_cache.view(-1, *key_cache.shape[2:])[slots] = key[keep].to(key_cache.dtype)
    value_cache.view(-1, *value_cache.shape[2:])[slots] = value[keep].to(value_cache.dtype)


def copy_blocks(key_cache: torch.Tensor, value_cache: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> None:
    """Copy whole blocks src[i] -> dst[i] in both caches (copy-on-write)."""
    key_cache[dst] = key_cache[src]
    value_cache[dst] = value_cache[src]
