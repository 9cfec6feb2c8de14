"""Paged attention for CPU tensors: one padded gather and one attention call for the whole batch.

`reference.paged_attention` walks the sequences one by one, which is clear but slow (a Python iteration per
sequence per layer per step). This is the path the "paged" attention takes on CPU: every sequence's K/V is
gathered through its block table into a zero-padded [S, L_max] batch and attended with torch's
scaled_dot_product_attention (GQA without repeating K/V) under a boolean causal / window / padding mask.
Soft-capping and attention sinks need the raw scores, so they run the same math by hand. Computed in float32,
like the reference.
A very ragged batch (padding would more than triple the gathered tokens) goes to the reference instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hf_paged.kernels import reference

MAX_PADDING = 3.0  # gathered tokens (S * L_max) over the tokens that exist, beyond which the reference runs


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
    """Same contract as `reference.paged_attention` (layouts in kernels/reference.py). With `expand` (a cache of
    latents) the whole padded batch's latents are expanded in one call."""
    num_tokens, num_q_heads, head_dim = query.shape
    num_seqs = seq_lens.shape[0]
    lens = seq_lens.long()
    q_lens = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).long()
    if num_tokens == 0 or num_seqs == 0:
        return torch.zeros_like(query)  # NOTE: no rows, so the values' head_dim (`expand`'s) is never needed
    max_len, max_q = int(lens.max()), int(q_lens.max())
    if num_seqs * max_len > MAX_PADDING * int(lens.sum()):
        return reference.paged_attention(query, key_cache, value_cache, block_tables, seq_lens, cu_seqlens_q, scale,
                                         sliding_window, softcap, sinks, expand, chunk_size)
    num_blocks, block_size = key_cache.shape[:2]
    width = -(-max_len // block_size)
    tables = block_tables[:, :width].long().clamp(0, num_blocks - 1)  # (S, nb); past a row's end: masked below
    k = key_cache[tables].flatten(1, 2)[:, :max_len].transpose(1, 2)  # (S, Hkv, L, D)
    v = value_cache[tables].flatten(1, 2)[:, :max_len].transpose(1, 2)
    if expand is not None:  # cached latents: the model's own up-projection gives K and V
        k, v = expand(k, v)
    num_kv_heads = k.shape[1]
    assert num_q_heads % num_kv_heads == 0, (num_q_heads, num_kv_heads)

    rows = torch.arange(max_q, device=query.device)
    real = rows[None, :] < q_lens[:, None]  # (S, Qmax): which padded query rows exist
    index = (cu_seqlens_q[:-1].long()[:, None] + rows[None, :]).clamp(max=num_tokens - 1)  # (S, Qmax)
    q = query[index]  # (S, Qmax, Hq, D)
    q_pos = lens[:, None] - q_lens[:, None] + rows[None, :]  # (S, Qmax) absolute positions
    k_pos = torch.arange(max_len, device=query.device)
    visible = k_pos[None, None, :] <= q_pos[:, :, None]  # (S, Qmax, L); also keeps k_pos < seq_len
    if sliding_window is not None:
        visible &= (q_pos[:, :, None] - k_pos[None, None, :]) < sliding_window
    if chunk_size is not None:
        visible &= k_pos[None, None, :] >= (q_pos - q_pos % chunk_size)[:, :, None]
    visible |= ~real[:, :, None] & (k_pos == 0)  # padding rows see one key, so no row is all -inf

    qf = q.float().transpose(1, 2)  # (S, Hq, Qmax, D)
    kf = k.float()  # (S, Hkv, L, D)
    vf = v.float()
    mask = visible[:, None]  # (S, 1, Qmax, L)
    if softcap is None and sinks is None:
        out = F.scaled_dot_product_attention(qf, kf, vf, attn_mask=mask, scale=scale,
                                             enable_gqa=num_q_heads != num_kv_heads)  # (S, Hq, Qmax, D)
    else:
        group = num_q_heads // num_kv_heads
        kf, vf = kf.repeat_interleave(group, dim=1), vf.repeat_interleave(group, dim=1)  # (S, Hq, L, D)
        scores = torch.matmul(qf, kf.transpose(-1, -2)) * scale
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        out = torch.matmul(reference.softmax_with_sinks(scores.masked_fill(~mask, float("-inf")), sinks), vf)
    return out.transpose(1, 2)[real].to(query.dtype)  # (T, Hq, D), packed order
