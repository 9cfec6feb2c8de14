"""The Triton attention against kernels/reference.py over random batches (hypothesis): ragged decodes, prompts,
prompts over a cached prefix, tile-aligned and odd lengths, GQA ratios, block sizes, windows and soft-caps, with
the block tables read as the kernels' pipelined loops read them (each tile's rows gathered a tile ahead, the
masked tiles of a range chosen at run time). Small shapes and a fixed example budget: the CPU interpreter runs
them (about a second an example)."""

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hf_paged.kernels import reference
from hf_paged.kernels.paged_attention import DecodeConfig, PrefillConfig, paged_attention
from tests.kernels.paged_inputs import TOLERANCES, attention_inputs

PROPERTY = settings(max_examples=20, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
# lengths around the interpreter's tiles (16 keys, 16 rows), so tiles that end exactly on a boundary come up
LENGTHS = st.sampled_from([1, 2, 15, 16, 17, 31, 32, 33, 47, 64])


@st.composite
def batches(draw, decode: bool):
    num_seqs = draw(st.integers(1, 3))
    q_lens = [1] * num_seqs if decode else [draw(LENGTHS) for _ in range(num_seqs)]
    if not decode and max(q_lens) == 1:
        q_lens[0] = 2  # a prefill launch: some sequence brings several tokens (one-token rows ride along)
    seq_lens = [q + draw(st.sampled_from([0, 0, 1, 16, 23])) for q in q_lens]  # fresh or over a cached prefix
    if decode:
        seq_lens = [max(n, 1) + draw(LENGTHS) for n in seq_lens]
    num_kv_heads, group = draw(st.sampled_from([(1, 1), (2, 2), (1, 4), (2, 3)]))
    block_size = draw(st.sampled_from([4, 8, 16]))
    window = draw(st.sampled_from([None, None, 1, 7, 20]))
    softcap = draw(st.sampled_from([None, None, 5.0]))
    return q_lens, seq_lens, num_kv_heads * group, num_kv_heads, block_size, window, softcap


def check(q_lens, seq_lens, hq, hkv, block_size, window, softcap, config, seed):
    inputs = attention_inputs(q_lens, seq_lens, hq, hkv, 64, block_size, torch.float16, seed)
    scale = 64**-0.5
    out = paged_attention(**inputs, scale=scale, sliding_window=window, softcap=softcap, max_seqlen_q=max(q_lens),
                          config=config)
    ref = reference.paged_attention(**inputs, scale=scale, sliding_window=window, softcap=softcap)
    atol, rtol = TOLERANCES[torch.float16]
    torch.testing.assert_close(out, ref, atol=atol, rtol=rtol)


@PROPERTY
@given(batch=batches(decode=True), splits=st.sampled_from([1, 2, 3]), heads_fastest=st.booleans())
def test_decode_matches_the_reference(batch, splits, heads_fastest):
    q_lens, seq_lens, hq, hkv, block_size, window, softcap = batch
    config = DecodeConfig(block_n=16, num_splits=splits, num_warps=1, num_stages=1, fused_reduce=splits == 2,
                          heads_fastest=heads_fastest)
    check(q_lens, seq_lens, hq, hkv, block_size, window, softcap, config, seed=sum(seq_lens))


@PROPERTY
@given(batch=batches(decode=False))
def test_prefill_matches_the_reference(batch):
    q_lens, seq_lens, hq, hkv, block_size, window, softcap = batch
    group = hq // hkv
    config = PrefillConfig(block_m=16 if group < 4 else 32, block_n=16, num_warps=1, num_stages=1)
    check(q_lens, seq_lens, hq, hkv, block_size, window, softcap, config, seed=sum(seq_lens))
