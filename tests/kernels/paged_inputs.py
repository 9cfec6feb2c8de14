"""Random paged K/V and packed queries for the kernel tests: blocks shuffled, tables padded with -1."""

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (atol, rtol) of a Triton kernel against the float32 reference, by dtype.
TOLERANCES = {torch.float32: (1e-4, 1e-4), torch.float16: (3e-3, 3e-3), torch.bfloat16: (2e-2, 2e-2)}


def paged_kv(seq_lens, num_kv_heads, head_dim, block_size, dtype, gen, spare_blocks=3):
    """K/V caches holding seq_lens[s] tokens of each sequence in randomly placed blocks.

    Returns: key_cache, value_cache [num_blocks, block_size, Hkv, D], block_tables [S, max_blocks + 1] int32.
    """
    per_seq = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(per_seq) + spare_blocks
    order = torch.randperm(num_blocks, generator=gen)
    block_tables = torch.full((len(seq_lens), max(per_seq, default=0) + 1), -1, dtype=torch.int32)
    taken = 0
    for s, n in enumerate(per_seq):
        block_tables[s, :n] = order[taken : taken + n]
        taken += n
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    key_cache = torch.randn(shape, generator=gen).to(dtype)
    value_cache = torch.randn(shape, generator=gen).to(dtype)
    return key_cache, value_cache, block_tables


def attention_inputs(q_lens, seq_lens, num_q_heads, num_kv_heads, head_dim, block_size, dtype, seed=0):
    """Everything `paged_attention` takes but scale, on DEVICE, as a dict."""
    gen = torch.Generator().manual_seed(seed)
    key_cache, value_cache, block_tables = paged_kv(seq_lens, num_kv_heads, head_dim, block_size, dtype, gen)
    cu = torch.zeros(len(q_lens) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(q_lens).cumsum(0)
    query = torch.randn(int(cu[-1]), num_q_heads, head_dim, generator=gen).to(dtype)  # (T, Hq, D)
    tensors = dict(query=query, key_cache=key_cache, value_cache=value_cache, block_tables=block_tables,
                   seq_lens=torch.tensor(seq_lens, dtype=torch.int32), cu_seqlens_q=cu)
    return {name: t.to(DEVICE) for name, t in tensors.items()}


def ragged_lengths(num_seqs, low, high, seed):
    """Sequence lengths in [low, high], odd ones included."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(low, high + 1, (num_seqs,), generator=gen).tolist()
