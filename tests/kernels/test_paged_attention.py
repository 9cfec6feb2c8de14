"""Triton paged attention (decode + varlen prefill) against kernels/reference.py."""

import dataclasses

import pytest
import torch

from hf_paged.kernels import reference
from hf_paged.kernels.paged_attention import DecodeConfig, PrefillConfig, paged_attention
from hf_paged.kernels.tuning import default_prefill_config
from tests.kernels.paged_inputs import DEVICE, TOLERANCES, attention_inputs, ragged_lengths

on_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def check(q_lens, seq_lens, num_q_heads, num_kv_heads, head_dim, block_size, dtype, seed=0, window=None,
          softcap=None, config=None, max_seqlen_q=None, sinks=None):
    inputs = attention_inputs(q_lens, seq_lens, num_q_heads, num_kv_heads, head_dim, block_size, dtype, seed)
    scale = head_dim**-0.5
    out = paged_attention(**inputs, scale=scale, sliding_window=window, softcap=softcap, max_seqlen_q=max_seqlen_q,
                          config=config, sinks=sinks)
    ref = reference.paged_attention(**inputs, scale=scale, sliding_window=window, softcap=softcap, sinks=sinks)
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(out, ref, atol=atol, rtol=rtol)


# (dtype, block_size, num_q_heads, num_kv_heads, head_dim)
SHAPES = [
    (torch.float32, 8, 4, 4, 64),
    (torch.float16, 16, 4, 2, 64),
    (torch.bfloat16, 32, 8, 2, 64),
    (torch.bfloat16, 16, 6, 2, 80),  # group of 3, padded head dim
    (torch.float16, 8, 2, 1, 96),
    (torch.float32, 16, 4, 1, 128),
    (torch.bfloat16, 8, 2, 2, 256),
]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_decode_matches_reference(shape):
    dtype, block_size, hq, hkv, d = shape
    seq_lens = ragged_lengths(4, 1, 70, seed=block_size + d)
    check([1] * len(seq_lens), seq_lens, hq, hkv, d, block_size, dtype, seed=d, max_seqlen_q=1)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "two_launches"])
@pytest.mark.parametrize("num_splits", [2, 3, 4])
def test_decode_split_k_matches_reference(num_splits, fused):
    # 1..80 tokens over splits of 16-token tiles: some splits are empty, some end mid-tile.
    seq_lens = [1, 9, 16, 17, 50, 80]
    check([1] * 6, seq_lens, 8, 2, 64, 16, torch.float32, seed=num_splits,
          config=DecodeConfig(block_n=16, num_splits=num_splits, num_warps=1, num_stages=1, fused_reduce=fused))


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "two_launches"])
@pytest.mark.parametrize("num_splits, min_tiles", [(4, 2), (3, 5)])
def test_decode_splits_only_long_sequences(monkeypatch, num_splits, min_tiles, fused):
    """min_split_tiles: a sequence fills only the splits its length needs (1 token .. all of them); the others
    exit at once, and both merges must leave their partials out (here NaN: never written). With the step's own
    K/V too (the last active split's key)."""
    from hf_paged.kernels import paged_decode

    class PoisonedTorch:  # the partial buffers come out of torch.empty: NaN here, so a read of an unwritten one shows
        def __getattr__(self, name):
            return getattr(torch, name)

        @staticmethod
        def empty(*args, **kwargs):
            return torch.full(args, float("nan"), **kwargs) if kwargs.get("dtype") == torch.float32 else (
                torch.empty(*args, **kwargs))

    monkeypatch.setattr(paged_decode, "torch", PoisonedTorch())
    seq_lens = [1, 9, 16, 33, 50, 80, 200]
    config = DecodeConfig(block_n=16, num_splits=num_splits, num_warps=1, num_stages=1, fused_reduce=fused,
                          min_split_tiles=min_tiles)
    check([1] * 7, seq_lens, 8, 2, 64, 16, torch.float32, seed=num_splits, config=config)
    check_new_kv([1] * 7, seq_lens, 8, 2, 64, 16, torch.float32, seed=min_tiles, config=config, write=True)


@pytest.mark.parametrize("num_splits, fused, min_tiles", [(1, False, 1), (3, True, 1), (4, False, 2)])
def test_decode_heads_fastest_grid(num_splits, fused, min_tiles):
    """heads_fastest launches the grid (Hkv, S, splits): the same result, merges and the own token's store
    included, with more sequences than KV heads and the other way round."""
    config = DecodeConfig(block_n=16, num_splits=num_splits, num_warps=1, num_stages=1, fused_reduce=fused,
                          min_split_tiles=min_tiles, heads_fastest=True)
    seq_lens = [1, 9, 16, 33, 50, 80, 200]
    check([1] * 7, seq_lens, 8, 2, 64, 16, torch.float32, seed=num_splits, config=config)
    check([1] * 2, [40, 7], 12, 4, 64, 8, torch.float32, seed=5, config=config)
    check_new_kv([1] * 7, seq_lens, 8, 2, 64, 16, torch.float32, seed=min_tiles, config=config, write=True)


@pytest.mark.parametrize("window, softcap", [(1, None), (5, None), (24, 2.0), (None, 1.5), (100, 30.0)])
@pytest.mark.parametrize("num_splits", [1, 2])
def test_decode_sliding_window_and_softcap(window, softcap, num_splits):
    seq_lens = [3, 23, 40, 61]
    check([1] * 4, seq_lens, 4, 2, 64, 8, torch.float32, seed=7, window=window, softcap=softcap,
          config=DecodeConfig(block_n=16, num_splits=num_splits, num_warps=1, num_stages=1))


def test_decode_skips_sequences_without_queries():
    # max_seqlen_q = 1 with some q_len = 0 sequences (their rows do not exist in the packed query).
    check([1, 0, 1, 0], [5, 9, 33, 2], 4, 2, 64, 16, torch.bfloat16, seed=3, max_seqlen_q=1)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_prefill_matches_reference(shape):
    # Prefix-cache hits / chunked prefill: each sequence attends to a cached prefix plus its new tokens; a
    # q_len = 1 sequence (a decode in a mixed batch) and a prefill with no prefix ride along.
    dtype, block_size, hq, hkv, d = shape
    q_lens = [7, 1, 20, 13]
    prefix = ragged_lengths(4, 0, 30, seed=d)
    prefix[3] = 0
    check(q_lens, [q + p for q, p in zip(q_lens, prefix)], hq, hkv, d, block_size, dtype, seed=block_size)


@pytest.mark.parametrize("window, softcap", [(1, None), (6, 5.0), (None, 2.0), (40, None)])
def test_prefill_sliding_window_and_softcap(window, softcap):
    q_lens = [19, 5, 33]
    check(q_lens, [19, 30, 50], 4, 1, 64, 8, torch.float32, seed=11, window=window, softcap=softcap)


def check_new_kv(q_lens, seq_lens, hq, hkv, d, block_size, dtype, seed=0, window=None, softcap=None,
                 head_major=False, config=None, write=False, skip=(), wide_value=False, fresh=False, sinks=None):
    """The step's own K/V passed apart: the kernel must read the new tokens there, not in the caches, whose new
    slots are poisoned with NaN here; the result is the reference's on the intact caches. `write`: the kernel also
    stores them (slot_mapping), after which the caches must equal the intact ones, but for the tokens in `skip`
    (slot -1), whose slots must stay poisoned. `wide_value`: V a slice of a 3x wider row (a fused q/k/v
    projection's), K packed. `fresh`: the launcher is told no sequence has earlier context (seq_lens == q_lens)."""
    inputs = attention_inputs(q_lens, seq_lens, hq, hkv, d, block_size, dtype, seed)
    scale = d**-0.5
    ref = reference.paged_attention(**inputs, scale=scale, sliding_window=window, softcap=softcap, sinks=sinks)
    rows = {"key": [], "value": []}
    poisoned = {name: inputs[name].clone() for name in ("key_cache", "value_cache")}
    slots = []
    for s, (q_len, seq_len) in enumerate(zip(q_lens, seq_lens)):
        table = inputs["block_tables"][s]
        for name, cache in (("key", inputs["key_cache"]), ("value", inputs["value_cache"])):
            rows[name].append(reference.gather_kv(cache, table, seq_len)[seq_len - q_len :])  # (q_len, Hkv, D)
        for pos in range(seq_len - q_len, seq_len):
            block, offset = int(table[pos // block_size]), pos % block_size
            slots.append(block * block_size + offset)
            for name in poisoned:
                poisoned[name][block, offset] = float("nan")
    new = {name: torch.cat(parts) for name, parts in rows.items()}  # (T, Hkv, D)
    if head_major:  # HF's layout: [Hkv, T, D] in memory, seen as [T, Hkv, D]
        new = {name: t.transpose(0, 1).contiguous().transpose(0, 1) for name, t in new.items()}
    if wide_value:
        new["value"] = torch.cat([new["value"]] * 3, dim=1)[:, :hkv]  # (T, Hkv, D), token stride 3 * Hkv * D
    slot_mapping = None
    if write:
        slot_mapping = torch.tensor([-1 if t in skip else slot for t, slot in enumerate(slots)], device=DEVICE)
    out = paged_attention(**{**inputs, **poisoned}, scale=scale, sliding_window=window, softcap=softcap,
                          max_seqlen_q=max(q_lens), key=new["key"], value=new["value"], slot_mapping=slot_mapping,
                          fresh=fresh, config=config, sinks=sinks)
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(out, ref, atol=atol, rtol=rtol)
    if write:
        for name in poisoned:
            expected = inputs[name].clone().view(-1, hkv, d)  # (slots, Hkv, D)
            expected[[slots[t] for t in skip]] = float("nan")
            torch.testing.assert_close(poisoned[name].view(-1, hkv, d), expected, atol=0, rtol=0, equal_nan=True)


@pytest.mark.parametrize("write", [False, True], ids=["read", "write"])
@pytest.mark.parametrize("splits, fused", [(1, True), (3, True), (3, False)], ids=["one", "fused", "two_launches"])
@pytest.mark.parametrize("shape", SHAPES[:4] + SHAPES[6:], ids=str)
def test_decode_reads_the_steps_own_kv(shape, splits, fused, write):
    """A decode step's own token read from the packed K/V (its slot poisoned in the caches) and, with slots, stored
    there too; the splits merged by the last one to finish or by the reduction kernel."""
    dtype, block_size, hq, hkv, d = shape
    seq_lens = [1, 2, 9, 17, 40]  # a first token (nothing cached), tiles and splits ending mid-way
    config = DecodeConfig(block_n=16, num_splits=splits, num_warps=1, num_stages=1, fused_reduce=fused)
    check_new_kv([1] * 5, seq_lens, hq, hkv, d, block_size, dtype, seed=d, head_major=d == 64, config=config,
                 write=write)


@pytest.mark.parametrize("window, softcap", [(1, None), (5, 2.0), (None, 1.5)])
def test_decode_own_kv_sliding_window_and_softcap(window, softcap):
    config = DecodeConfig(block_n=16, num_splits=2, num_warps=1, num_stages=1)
    check_new_kv([1] * 4, [3, 23, 40, 61], 4, 2, 64, 8, torch.float32, seed=7, window=window, softcap=softcap,
                 config=config, write=True)


@pytest.mark.parametrize("tma, store_last", [(True, False), (False, False), (True, True)],
                         ids=["tma", "pointers", "tma_store_last"])
@pytest.mark.parametrize("shape", SHAPES[:4] + SHAPES[6:], ids=str)
def test_prefill_writes_the_steps_own_kv(shape, tma, store_last):
    """The prefill kernel stores its tiles' new tokens (each once) before or after it attends; slot -1 stores
    nothing."""
    dtype, block_size, hq, hkv, d = shape
    q_lens = [7, 1, 20, 13]
    prefix = ragged_lengths(4, 0, 30, seed=d + 2)
    config = dataclasses.replace(default_prefill_config(hq // hkv, d, torch.device(DEVICE)), tma=tma,
                                 store_last=store_last)
    check_new_kv(q_lens, [q + p for q, p in zip(q_lens, prefix)], hq, hkv, d, block_size, dtype, seed=block_size,
                 head_major=d == 64, config=config, write=True, skip=(3, 7))


@pytest.mark.parametrize("splits", [1, 2])
def test_decode_of_one_sequence_takes_any_token_stride(splits):
    """One token's K and V rows may differ in their (unused) token stride: a packed key after rotary and a value
    sliced from the fused q/k/v projection, as an eager engine step with one sequence has them."""
    config = DecodeConfig(block_n=16, num_splits=splits, num_warps=1, num_stages=1)
    check_new_kv([1], [21], 4, 2, 64, 8, torch.float32, seed=5, config=config, write=True, wide_value=True)


def test_own_kv_rows_of_several_tokens_need_one_layout():
    inputs = attention_inputs([1, 1], [4, 6], 4, 2, 64, 8, torch.float32)
    key = torch.zeros(2, 2, 64, device=DEVICE)
    value = torch.zeros(2, 6, 64, device=DEVICE)[:, :2]
    with pytest.raises(ValueError, match="one layout"):
        paged_attention(**inputs, scale=0.1, max_seqlen_q=1, key=key, value=value)


@pytest.mark.parametrize("write", [False, True], ids=["read", "write"])
@pytest.mark.parametrize("tma", [True, False], ids=["tma", "pointers"])
@pytest.mark.parametrize("shape", [SHAPES[1], SHAPES[3], SHAPES[6]], ids=str)
def test_prefill_of_fresh_prompts(shape, tma, write):
    """`fresh`: prompts without cached context, whose keys all come from the step's own K/V: the kernel compiled
    without its block-table loops gives the reference's attention (and stores the tokens)."""
    dtype, block_size, hq, hkv, d = shape
    q_lens = [7, 1, 40, 13]
    config = dataclasses.replace(default_prefill_config(hq // hkv, d, torch.device(DEVICE), own_kv=True), tma=tma)
    check_new_kv(q_lens, q_lens, hq, hkv, d, block_size, dtype, seed=block_size + 1, config=config, write=write,
                 fresh=True)
    # the promise reaches the kernel: broken (a cached prefix of 9 tokens), the prefix is left out of the attention
    with pytest.raises(AssertionError):
        check_new_kv(q_lens, [q + 9 for q in q_lens], hq, hkv, d, block_size, dtype, seed=block_size + 1,
                     config=config, write=write, fresh=True)


def test_decode_write_skips_padding_slots():
    """Slot -1 (a CUDA-graph padding row, say) stores nothing; the row still gets its attention."""
    check_new_kv([1] * 4, [5, 9, 33, 2], 4, 2, 64, 16, torch.float32, seed=3, write=True, skip=(1, 3),
                 config=DecodeConfig(block_n=16, num_splits=2, num_warps=1, num_stages=1))


def test_fused_reduce_leaves_the_counters_zero():
    """The last split of each (sequence, KV head) resets its arrival counter: a second launch (a graph replay)
    finds them zero and merges the same way."""
    from hf_paged.kernels import paged_decode

    inputs = attention_inputs([1] * 3, [30, 7, 52], 8, 2, 64, 8, torch.float32, seed=4)
    config = DecodeConfig(block_n=16, num_splits=4, num_warps=1, num_stages=1)
    first = paged_attention(**inputs, scale=0.125, max_seqlen_q=1, config=config)
    counters = paged_decode.arrival_counters(first.device, 6)
    assert counters.numel() >= 6 and not counters.any()
    torch.testing.assert_close(paged_attention(**inputs, scale=0.125, max_seqlen_q=1, config=config), first,
                               atol=0, rtol=0)


def test_arrival_counters_grow_and_keep_the_old_buffer():
    from hf_paged.kernels import paged_decode

    device = torch.device(DEVICE)
    small = paged_decode.arrival_counters(device, 10)
    assert paged_decode.arrival_counters(device, small.numel()) is small
    large = paged_decode.arrival_counters(device, small.numel() + 1)
    assert large.numel() > small.numel() and not large.any()
    assert any(buffer is small for buffer in paged_decode._COUNTERS[device])  # graphs may still point at it


@pytest.mark.parametrize("tma", [True, False], ids=["tma", "pointers"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_prefill_reads_the_steps_own_kv(shape, tma):
    """Prefix hits, a decode row and a prompt without prefix, with the new tokens' K/V given apart, read through
    TMA descriptors (where the head_dim is a power of 2) or by pointer."""
    dtype, block_size, hq, hkv, d = shape
    q_lens = [7, 1, 20, 13]
    prefix = ragged_lengths(4, 0, 30, seed=d + 1)
    prefix[3] = 0
    config = dataclasses.replace(default_prefill_config(hq // hkv, d, torch.device(DEVICE)), tma=tma)
    check_new_kv(q_lens, [q + p for q, p in zip(q_lens, prefix)], hq, hkv, d, block_size, dtype, seed=block_size,
                 head_major=d == 64, config=config)


def test_own_kv_mode_follows_layout():
    """TMA descriptors for power-of-2 head dims with 16-byte aligned rows; pointers otherwise or when asked."""
    from hf_paged.kernels.paged_prefill import new_kv_args as _new_kv_args

    cfg = PrefillConfig(16, 16)
    query = torch.zeros(6, 4, 64, dtype=torch.bfloat16)
    kv = torch.zeros(6, 2, 64, dtype=torch.bfloat16)
    assert _new_kv_args(query, None, None, cfg)[0] == 0
    assert _new_kv_args(query, kv, kv, cfg)[0] == 2
    assert _new_kv_args(query, kv, kv, dataclasses.replace(cfg, tma=False))[0] == 1
    odd = torch.zeros(6, 2, 80, dtype=torch.bfloat16)
    assert _new_kv_args(query, odd, odd, cfg)[0] == 1
    unaligned = torch.zeros(7, 2, 64, dtype=torch.bfloat16)[1:]  # rows start 128 bytes in: still aligned
    assert _new_kv_args(query, unaligned, unaligned, cfg)[0] == 2
    skewed = torch.zeros(6 * 2 * 64 + 1, dtype=torch.bfloat16)[1:].view(6, 2, 64)  # base 2 bytes off
    assert _new_kv_args(query, skewed, skewed, cfg)[0] == 1


@pytest.mark.parametrize("window, softcap", [(1, None), (6, 5.0), (None, 2.0), (40, None)])
def test_prefill_own_kv_sliding_window_and_softcap(window, softcap):
    check_new_kv([19, 5, 33], [19, 30, 50], 4, 1, 64, 8, torch.float32, seed=12, window=window, softcap=softcap)


def test_prefill_own_kv_tiles_straddle_the_prefix():
    """16-key tiles where prefixes end mid-tile and prompts are longer than several tiles."""
    check_new_kv([40, 3, 17], [45, 20, 17], 4, 2, 64, 8, torch.float32, seed=13,
                 config=PrefillConfig(block_m=16, block_n=16, num_warps=1, num_stages=1))


def test_own_kv_must_match_the_query():
    inputs = attention_inputs([3, 2], [5, 2], 4, 2, 64, 8, torch.float32)
    key = torch.zeros(4, 2, 64, device=DEVICE)
    with pytest.raises(ValueError, match="num_tokens"):
        paged_attention(**inputs, scale=0.1, max_seqlen_q=3, key=key, value=key)
    with pytest.raises(ValueError, match="both"):
        paged_attention(**inputs, scale=0.1, max_seqlen_q=3, key=key[:5])
    slots = torch.arange(5, device=DEVICE)
    with pytest.raises(ValueError, match="give key and value"):
        paged_attention(**inputs, scale=0.1, max_seqlen_q=3, slot_mapping=slots)
    key = torch.zeros(5, 2, 64, device=DEVICE)
    with pytest.raises(ValueError, match="slot_mapping"):
        paged_attention(**inputs, scale=0.1, max_seqlen_q=3, key=key, value=key, slot_mapping=slots[:4])
    with pytest.raises(ValueError, match="slot_mapping"):
        paged_attention(**inputs, scale=0.1, max_seqlen_q=3, key=key, value=key, slot_mapping=slots.float())


@pytest.mark.parametrize("block_m, group", [(16, 1), (16, 4), (32, 2), (16, 16)])
def test_prefill_query_tiles(block_m, group):
    # Tiles of block_m // group tokens: ragged tails, and a group as large as the tile.
    q_lens = [17, 3, 40]
    check(q_lens, [20, 3, 41], 2 * group, 2, 64, 16, torch.float32, seed=group,
          config=PrefillConfig(block_m=block_m, block_n=16, num_warps=1, num_stages=1))


def test_empty_batch_and_query():
    inputs = attention_inputs([0, 0], [4, 5], 4, 2, 64, 8, torch.float32)
    out = paged_attention(**inputs, scale=0.125)
    assert out.shape == (0, 4, 64)


def test_launcher_rejects_bad_inputs():
    inputs = attention_inputs([1, 1], [4, 5], 4, 2, 64, 8, torch.float32)
    bad = {
        "block_tables": (TypeError, inputs["block_tables"].long()),
        "key_cache": (TypeError, inputs["key_cache"].half()),
        "cu_seqlens_q": (ValueError, inputs["cu_seqlens_q"][:2]),
        "query": (ValueError, inputs["query"].transpose(1, 2).contiguous().transpose(1, 2)),
    }
    for name, (error, value) in bad.items():
        with pytest.raises(error, match=name):
            paged_attention(**{**inputs, name: value}, scale=0.125)
    with pytest.raises(ValueError, match="multiple"):
        paged_attention(**{**inputs, "query": inputs["query"][:, :3]}, scale=0.125)
    with pytest.raises(TypeError, match="PrefillConfig"):
        paged_attention(**inputs, scale=0.125, config=PrefillConfig(16, 16))


# Realistic shapes on the GPU: compiled kernels, default (tuned) configs, long contexts.
@pytest.mark.cuda
@on_gpu
@pytest.mark.parametrize("hq, hkv", [(32, 8), (32, 32), (28, 4)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("block_size", [8, 16])  # the default, and vLLM's
def test_gpu_decode_long_contexts(hq, hkv, dtype, block_size):
    seq_lens = ragged_lengths(64, 1, 4100, seed=hq + hkv)
    check([1] * 64, seq_lens, hq, hkv, 128, block_size, dtype, seed=1, max_seqlen_q=1)


@pytest.mark.cuda
@on_gpu
@pytest.mark.parametrize("num_seqs", [1, 3, 200])  # few sequences: many splits; many: none
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_gpu_decode_shapes(shape, num_seqs):
    dtype, block_size, hq, hkv, d = shape
    check([1] * num_seqs, ragged_lengths(num_seqs, 1, 3000, seed=d), hq, hkv, d, block_size, dtype, seed=d)


@pytest.mark.cuda
@on_gpu
@pytest.mark.parametrize("num_seqs", [1, 3, 200])  # 16 splits merged by the last to finish; 4; none
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_gpu_decode_writes_the_steps_own_kv(shape, num_seqs):
    """The engine's decode: one launch stores the new token, attends, and merges the splits."""
    dtype, block_size, hq, hkv, d = shape
    check_new_kv([1] * num_seqs, ragged_lengths(num_seqs, 1, 3000, seed=d + 1), hq, hkv, d, block_size, dtype,
                 seed=d, head_major=d == 64, write=True, skip=(0,) if num_seqs > 1 else ())


@pytest.mark.cuda
@on_gpu
@pytest.mark.parametrize("num_splits, fused", [(2, True), (8, False)])
def test_gpu_decode_splits_only_long_sequences(num_splits, fused):
    """DecodeConfig.min_split_tiles on the device's tiles: a serving batch's lengths (most short, a few long), the
    step's own K/V stored, the splits past a short sequence's range left empty."""
    from hf_paged.bench.workloads import serving_lengths

    config = DecodeConfig(block_n=64, num_splits=num_splits, fused_reduce=fused, min_split_tiles=4)
    check_new_kv([1] * 96, serving_lengths(96, 300, seed=num_splits), 32, 8, 128, 8, torch.bfloat16, seed=3,
                 write=True, skip=(0,), config=config)


@pytest.mark.cuda
@on_gpu
@pytest.mark.parametrize("fresh", [False, True], ids=["prefix", "fresh"])
@pytest.mark.parametrize("store_last", [True, False], ids=["store_last", "store_first"])
def test_gpu_prefill_stores_last(fresh, store_last):
    """PrefillConfig.store_last on the device's tile (the default since 2026-12-07) and off: the step's own K/V
    stored after each tile's attention, or before its queries are loaded."""
    q_lens = [1000, 1, 333, 64]
    seq_lens = q_lens if fresh else [q + p for q, p in zip(q_lens, [0, 700, 1029, 5])]
    tuned = default_prefill_config(4, 128, torch.device("cuda"), own_kv=True)
    config = dataclasses.replace(tuned, store_last=store_last)
    check_new_kv(q_lens, seq_lens, 32, 8, 128, 8, torch.bfloat16, seed=6, write=True, skip=(5, 1001), fresh=fresh,
                 config=config)


@pytest.mark.cuda
@on_gpu
def test_gpu_fused_reduce_in_a_cuda_graph():
    """Replays of one captured decode launch (16 splits, the last one merging) on new K/V each time: every replay
    matches the reference, so the arrival counters come back to zero inside the graph."""
    inputs = attention_inputs([1] * 2, [2000, 37], 32, 8, 128, 16, torch.bfloat16, seed=3)
    key, value = (torch.zeros(2, 8, 128, dtype=torch.bfloat16, device="cuda") for _ in range(2))  # (T, Hkv, D)
    slots = torch.tensor([-1, -1], device="cuda")  # nothing stored: the caches stay the reference's context
    config = DecodeConfig(block_n=64, num_splits=16)

    def launch():
        return paged_attention(**inputs, scale=128**-0.5, max_seqlen_q=1, key=key, value=value, slot_mapping=slots,
                               config=config)

    launch()  # compiles, and allocates the counters outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = launch()
    for seed in range(5):
        gen = torch.Generator(device="cuda").manual_seed(seed)
        for t in (key, value, inputs["query"]):
            t.copy_(torch.randn(t.shape, generator=gen, device="cuda"))
        graph.replay()
        k_cache, v_cache = inputs["key_cache"].clone(), inputs["value_cache"].clone()
        for s, n in enumerate([2000, 37]):  # the reference reads the new token from the caches
            block, offset = int(inputs["block_tables"][s][(n - 1) // 16]), (n - 1) % 16
            k_cache[block, offset], v_cache[block, offset] = key[s], value[s]
        ref = reference.paged_attention(**{**inputs, "key_cache": k_cache, "value_cache": v_cache},
                                        scale=128**-0.5)
        torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)


@pytest.mark.cuda
@on_gpu
@pytest.mark.parametrize("decode_config", [DecodeConfig(block_n=64, num_splits=16, fused_reduce=False),
                                           DecodeConfig(block_n=64, num_splits=2)], ids=["reduce_launch", "fused"])
def test_gpu_pdl_chain_in_a_cuda_graph(monkeypatch, decode_config):
    """HF_PAGED_PDL=1: in one CUDA graph a torch kernel writes the inputs, the prefill stores a prompt's K/V, the
    decode (and its merge launch) reads it back and a torch kernel reads the output, each attention launch started
    early and waiting for the one before: every replay equals the same launches run eagerly without PDL."""
    from hf_paged.kernels import tuning

    hq, hkv, d, bs, n = 32, 8, 128, 8, 700
    prompt = attention_inputs([n], [n], hq, hkv, d, bs, torch.bfloat16, seed=6)
    step = {**prompt, "query": prompt["query"][:1].clone(), "seq_lens": torch.tensor([n + 1], dtype=torch.int32,
            device="cuda"), "cu_seqlens_q": torch.tensor([0, 1], dtype=torch.int32, device="cuda")}
    kv = torch.zeros(n + 1, 2, hkv, d, dtype=torch.bfloat16, device="cuda")  # the prompt's K/V, then the step's
    table = prompt["block_tables"][0]
    slots = torch.tensor([int(table[p // bs]) * bs + p % bs for p in range(n + 1)], device="cuda")
    source = torch.zeros(n + 1, hq + 2 * hkv, d, dtype=torch.bfloat16, device="cuda")

    def chain():
        prompt["query"].copy_(source[:n, :hq])
        step["query"].copy_(source[n:, :hq])
        kv.copy_(source[:, hq:].view(n + 1, 2, hkv, d))
        paged_attention(**prompt, scale=d**-0.5, max_seqlen_q=n, key=kv[:n, 0], value=kv[:n, 1],
                        slot_mapping=slots[:n])
        out = paged_attention(**step, scale=d**-0.5, max_seqlen_q=1, key=kv[n:, 0], value=kv[n:, 1],
                              slot_mapping=slots[n:], config=decode_config)
        return out * 2

    def fill(seed):
        source.copy_(torch.randn(source.shape, generator=torch.Generator(device="cuda").manual_seed(seed),
                                 device="cuda"))

    expected = []
    for seed in range(3):
        fill(seed)
        expected.append(chain())
    monkeypatch.setenv("HF_PAGED_PDL", "1")
    assert tuning.use_pdl(torch.device("cuda")) == (torch.cuda.get_device_capability()[0] >= 9)
    chain()  # compiles the PDL variants, outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = chain()
    for seed in range(3):
        fill(seed)
        graph.replay()
        torch.testing.assert_close(out, expected[seed], atol=0, rtol=0)


@pytest.mark.cuda
@on_gpu
@pytest.mark.parametrize("window, softcap", [(4096, None), (255, 50.0), (None, 30.0), (1, None)])
@pytest.mark.parametrize("num_seqs", [2, 64])
def test_gpu_decode_window_softcap(window, softcap, num_seqs):
    check([1] * num_seqs, ragged_lengths(num_seqs, 1, 5000, seed=5), 16, 8, 256, 16, torch.bfloat16, seed=2,
          window=window, softcap=softcap)


@pytest.mark.cuda
@on_gpu
@pytest.mark.parametrize("own_kv", ["paged", "own_kv", "own_kv_write", "own_kv_write_fresh"])  # the engine's
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_gpu_prefill_shapes(shape, own_kv):
    dtype, block_size, hq, hkv, d = shape
    q_lens = [1000, 1, 333, 64, 1]
    seq_lens = [q + p for q, p in zip(q_lens, [0, 700, 1029, 5, 1])]
    if own_kv == "own_kv_write_fresh":  # prompts without context (the launcher told so)
        check_new_kv(q_lens, q_lens, hq, hkv, d, block_size, dtype, seed=d, head_major=True, write=True,
                     skip=(5, 1001), fresh=True)
    elif own_kv != "paged":
        check_new_kv(q_lens, seq_lens, hq, hkv, d, block_size, dtype, seed=d, head_major=True,
                     write=own_kv == "own_kv_write", skip=(5, 1001))
    else:
        check(q_lens, seq_lens, hq, hkv, d, block_size, dtype, seed=d)


@pytest.mark.cuda
@on_gpu
@pytest.mark.parametrize("window, softcap", [(4096, None), (255, 50.0), (None, 30.0), (1, None)])
def test_gpu_prefill_window_softcap(window, softcap):
    q_lens = [1500, 77, 512]
    check(q_lens, [1500, 1200, 3000], 16, 8, 128, 16, torch.bfloat16, seed=4, window=window, softcap=softcap)


@pytest.mark.cuda
@on_gpu
@pytest.mark.parametrize("hq, hkv", [(32, 8), (32, 32)])
def test_gpu_prefill_batch(hq, hkv):
    check([1024] * 8, [1024] * 8, hq, hkv, 128, 16, torch.bfloat16, seed=9)


@pytest.mark.cuda
@on_gpu
@pytest.mark.parametrize("window, softcap", [(4096, None), (255, 50.0), (1, None)])
def test_gpu_prefill_own_kv_window_softcap(window, softcap):
    check_new_kv([1500, 77, 512], [1500, 1200, 3000], 16, 8, 128, 16, torch.bfloat16, seed=4, window=window,
                 softcap=softcap)


def test_mixed_batch_split_launch_matches_reference():
    """The kernel bench's split baseline for a mixed step (decodes, then a prompt) computes the same attention."""
    from hf_paged.bench.attention_rows import _split_launch, attention_inputs

    q_lens, seq_lens = [1, 1, 1, 9], [13, 5, 21, 9]
    inputs = attention_inputs(q_lens, seq_lens, 4, 2, 16, 4, torch.float32, "cpu")
    ref = reference.paged_attention(**inputs, scale=0.25)
    torch.testing.assert_close(_split_launch(inputs, q_lens, 0.25)(), ref, rtol=1e-4, atol=1e-4)


def test_bench_new_token_slots_are_where_the_tables_put_them():
    """The kernel bench stores each row of the step's own K/V into new_token_slots: read back through the block
    tables, the last q_len positions of each sequence are those rows."""
    from hf_paged.bench.attention_rows import attention_inputs, new_token_slots

    q_lens, seq_lens = [3, 1, 5], [10, 17, 5]
    inputs = attention_inputs(q_lens, seq_lens, 4, 2, 16, 4, torch.float32, "cpu")
    rows = torch.randn(sum(q_lens), 2, 16)
    slots = new_token_slots(inputs["block_tables"], q_lens, seq_lens, 4)
    reference.write_kv(rows, rows, inputs["key_cache"], inputs["value_cache"], slots)
    read = [reference.gather_kv(inputs["key_cache"], inputs["block_tables"][s], n)[n - q:]
            for s, (q, n) in enumerate(zip(q_lens, seq_lens))]
    torch.testing.assert_close(torch.cat(read), rows, atol=0, rtol=0)


@pytest.mark.parametrize("ragged", [False, True], ids=["even", "ragged"])
def test_bench_decode_layer_row_compares_one_launch_with_three(monkeypatch, ragged):
    """The kernel bench's `decode layer` row (CUDA graphs on a GPU; here each 'graph' is one call on the
    interpreter): it times the fused launch against write_kv + decode + reduce apart, and both store the token;
    `ragged` spreads the contexts as a serving batch's."""
    import argparse

    from hf_paged.bench import attention_rows
    from hf_paged.bench.kernels import Timer
    from hf_paged.bench.workloads import serving_lengths

    calls = []
    monkeypatch.setattr(attention_rows, "_graphed", lambda fn, times: lambda: calls.append(fn()))
    rows = []
    args = argparse.Namespace(dtype="float32", head_dim=64, block_size=8)
    attention_rows.bench_decode_step(Timer(gpu=False), 3, 20, 4, 2, args, rows, sweep=not ragged, ragged=ragged)
    row, *best = rows
    assert row.kernel.startswith("decode layer") and row.vs_baseline == pytest.approx(row.ms / row.baseline_ms)
    lengths = serving_lengths(3, 20)
    assert "write_kv + decode" in row.baseline
    assert (f"3x(q1,ctx~20 ragged, max {max(lengths)})" if ragged else "3x(q1,ctx20)") in row.shape
    assert len(set(lengths)) > 1 and all(16 <= n <= 320 for n in lengths)
    # the sweep (the even batch's): 1 split, then 2-16 merged by the last split or by a second launch, then 2-8
    # splits of at least 2-8 tiles each; the best is the fastest
    assert len(best) == (0 if ragged else 1)
    for row in best:
        assert len(row.detail["sweep_ms"]) == 18 and row.ms == min(row.detail["sweep_ms"].values())
    fused, apart, *swept = calls  # the default config in one launch, the launches apart, then the sweep's
    for out in [fused, *swept]:
        torch.testing.assert_close(out, apart, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("num_seqs, num_kv_heads, splits", [(1, 8, 16), (4, 8, 8), (16, 8, 2), (4, 32, 2),
                                                             (16, 32, 1), (64, 8, 1)])
def test_default_decode_split_rule(monkeypatch, num_seqs, num_kv_heads, splits):
    """About one program per SM (132 here), at most 16 splits; the last split merges only two (measured on an H200,
    docs/kernels.md), a second launch merges more."""
    from hf_paged.kernels import tuning

    monkeypatch.setattr(tuning, "_num_sms", lambda device: 132)
    cfg = tuning.default_decode_config(num_seqs, num_kv_heads, 128, torch.device("cuda"))
    assert (cfg.num_splits, cfg.fused_reduce) == (splits, splits <= 2)


@pytest.mark.parametrize("value, num_seqs, expected", [
    ("4:4", 64, (4, 4, False)),  # unsplit by the rule: 4 splits, only for sequences of 16+ tiles
    ("4:2", 1, (16, 2, False)),  # the rule's 16 splits stay, each of at least 2 tiles
    ("2:8", 64, (2, 8, True)),
])
def test_long_splits_switch(monkeypatch, value, num_seqs, expected):
    """HF_PAGED_LONG_SPLITS=S:M raises the decode's splits to at least S, each at least M tiles."""
    from hf_paged.kernels import tuning

    monkeypatch.setattr(tuning, "_num_sms", lambda device: 132)
    monkeypatch.setenv("HF_PAGED_LONG_SPLITS", value)
    cfg = tuning.default_decode_config(num_seqs, 8, 128, torch.device("cuda"))
    assert (cfg.num_splits, cfg.min_split_tiles, cfg.fused_reduce) == expected
    for bad in ("4", "0:2", "4:0", "a:b", "32:1"):
        monkeypatch.setenv("HF_PAGED_LONG_SPLITS", bad)
        with pytest.raises(ValueError, match="expected S:M"):
            tuning.default_decode_config(num_seqs, 8, 128, torch.device("cuda"))
    monkeypatch.delenv("HF_PAGED_LONG_SPLITS")
    assert tuning.default_decode_config(num_seqs, 8, 128, torch.device("cuda")).min_split_tiles == 1


def test_decode_order_switch(monkeypatch):
    """HF_PAGED_DECODE_ORDER: unset (longest) and heads launch the decode grid KV heads first, sequences as before."""
    from hf_paged.kernels import ops, tuning

    monkeypatch.setattr(tuning, "_num_sms", lambda device: 132)
    cuda = torch.device("cuda")
    monkeypatch.delenv("HF_PAGED_DECODE_ORDER", raising=False)
    assert ops.decode_order() == "longest" and tuning.default_decode_config(64, 8, 128, cuda).heads_fastest
    for value, heads_fastest in (("heads", True), ("longest", True), ("Sequences", False)):
        monkeypatch.setenv("HF_PAGED_DECODE_ORDER", value)
        assert ops.decode_order() == value.lower()
        assert tuning.default_decode_config(64, 8, 128, cuda).heads_fastest == heads_fastest
    monkeypatch.setenv("HF_PAGED_DECODE_ORDER", "shortest")
    with pytest.raises(ValueError, match="HF_PAGED_DECODE_ORDER"):
        tuning.default_decode_config(64, 8, 128, cuda)


def test_pdl_is_an_opt_in_for_hopper(monkeypatch):
    from hf_paged.kernels import tuning

    monkeypatch.setattr(tuning, "hopper_or_newer", lambda device: True)
    monkeypatch.delenv("HF_PAGED_PDL", raising=False)
    assert not tuning.use_pdl(torch.device("cuda"))
    monkeypatch.setenv("HF_PAGED_PDL", "1")
    assert tuning.use_pdl(torch.device("cuda")) and not tuning.use_pdl(torch.device("cpu"))


@pytest.mark.parametrize("value, flags", [("prefill", "True False"), ("1", "True True"), ("decode", "False True"),
                                          ("bogus", None)])
def test_kv_pipeline_switch(value, flags):
    """HF_PAGED_KV_PIPELINE picks the pipelined kernels at import; an unknown value is a ValueError, not a default."""
    import os
    import subprocess
    import sys

    code = ("from hf_paged.kernels.attention_tile import PIPELINE_DECODE, PIPELINE_PREFILL; "
            "print(bool(PIPELINE_PREFILL), bool(PIPELINE_DECODE))")
    done = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_PAGED_KV_PIPELINE": value})
    if flags is None:
        assert done.returncode != 0 and "ValueError" in done.stderr and "expected prefill" in done.stderr
    else:
        assert done.returncode == 0, done.stderr[-2000:]
        assert done.stdout.split() == flags.split()


def sink_logits(num_q_heads, seed=0):
    """Attention sinks as gpt-oss learns them: one logit a head, some far above the scores, some far below."""
    return (torch.randn(num_q_heads, generator=torch.Generator().manual_seed(seed)) * 3).to(DEVICE)


@pytest.mark.parametrize("splits, fused", [(1, True), (2, True), (3, False)], ids=["one", "fused", "two_launches"])
@pytest.mark.parametrize("window", [None, 5])
def test_decode_attention_sinks(splits, fused, window):
    """Sinks join each head's denominator once: in the one split's normalisation, or in either merge of the
    splits' partials; with the step's own K/V stored too."""
    config = DecodeConfig(block_n=16, num_splits=splits, num_warps=1, num_stages=1, fused_reduce=fused)
    seq_lens = [1, 9, 17, 40]
    check([1] * 4, seq_lens, 8, 2, 64, 16, torch.float32, seed=splits, window=window, config=config,
          sinks=sink_logits(8, splits))
    check_new_kv([1] * 4, seq_lens, 8, 2, 64, 16, torch.float32, seed=splits + 1, window=window, config=config,
                 write=True, sinks=sink_logits(8, splits + 1))


@pytest.mark.parametrize("window", [None, 6])
def test_prefill_attention_sinks(window):
    """The prefill's rows each add their head's sink: over block tables, the step's own K/V, and fresh prompts."""
    q_lens = [7, 1, 20, 13]
    check(q_lens, [19, 30, 50, 13], 4, 2, 64, 8, torch.float32, seed=11, window=window, sinks=sink_logits(4))
    check_new_kv(q_lens, [19, 30, 50, 13], 4, 2, 64, 8, torch.bfloat16, seed=12, window=window, write=True,
                 sinks=sink_logits(4, 1))
    check_new_kv(q_lens, q_lens, 4, 1, 64, 8, torch.float16, seed=13, window=window, write=True, fresh=True,
                 sinks=sink_logits(4, 2))


def test_sinks_of_the_wrong_shape_are_refused():
    inputs = attention_inputs([1], [5], 4, 2, 64, 8, torch.float32)
    with pytest.raises(ValueError, match="sinks must be"):
        paged_attention(**inputs, scale=0.125, sinks=torch.zeros(2, device=DEVICE))
