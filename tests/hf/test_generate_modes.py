"""Every generate mode gives the same tokens paged as with the default DynamicCache (tiny Llama, fp32, CPU)."""

import pytest
import torch
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

import hf_paged
from tests.tiny import ragged_batch, tiny_model

PAGED = dict(cache_implementation="paged", cache_config={"block_size": 4})


def _both(model, ids, mask=None, seed=None, **kwargs):
    """(DynamicCache output, paged output) for the same call; `seed` reseeds torch before each."""
    outs = []
    for extra in ({}, PAGED):
        if seed is not None:
            torch.manual_seed(seed)
        outs.append(model.generate(ids, attention_mask=mask, pad_token_id=0, **kwargs, **extra))
    return outs


def test_greedy_crosses_many_block_boundaries():
    model = tiny_model("llama")
    ids, mask = ragged_batch([13, 3, 8], seed=3)
    ref, out = _both(model, ids, mask, max_new_tokens=45, do_sample=False, eos_token_id=None)
    assert torch.equal(out, ref)
    cache = hf_paged.PagedCache(model.config, num_blocks=64, block_size=4)
    out2 = model.generate(ids, attention_mask=mask, cache=cache, max_new_tokens=45, do_sample=False,
                          pad_token_id=0, eos_token_id=None)
    assert torch.equal(out2, ref)
    # The last new token is never fed back, so rows hold prompt + 44 tokens (padding never stored):
    # 57, 47 and 52 tokens -> 15 + 12 + 13 blocks of 4.
    assert cache.stats().tokens_stored == 57 + 47 + 52
    assert cache.stats().blocks_in_use == 15 + 12 + 13


def test_seeded_sampling():
    model = tiny_model("llama")
    ids, mask = ragged_batch([7, 12], seed=4)
    ref, out = _both(model, ids, mask, seed=7, max_new_tokens=20, do_sample=True, temperature=0.9, top_p=0.9)
    assert torch.equal(out, ref)


def test_beam_search_with_num_return_sequences():
    model = tiny_model("llama")
    ids, mask = ragged_batch([10, 6], seed=5)
    ref, out = _both(model, ids, mask, max_new_tokens=16, num_beams=4, num_return_sequences=2, do_sample=False,
                     return_dict_in_generate=True, output_scores=True, eos_token_id=None)
    assert torch.equal(out.sequences, ref.sequences)
    torch.testing.assert_close(out.sequences_scores, ref.sequences_scores, rtol=1e-4, atol=1e-5)


def test_sampling_with_num_return_sequences():
    model = tiny_model("llama")
    ids, mask = ragged_batch([9, 5], seed=6)
    ref, out = _both(model, ids, mask, seed=11, max_new_tokens=15, do_sample=True, num_return_sequences=3)
    assert out.shape[0] == 6
    assert torch.equal(out, ref)


def test_assisted_decoding_with_small_assistant():
    model, assistant = tiny_model("llama"), tiny_model("llama", seed=1)
    ids, _ = ragged_batch([12], seed=7)
    ref, out = _both(model, ids, max_new_tokens=20, do_sample=False, assistant_model=assistant, eos_token_id=None)
    plain = model.generate(ids, max_new_tokens=20, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(out, ref)
    assert torch.equal(out, plain)  # assisted greedy is lossless


def test_prompt_lookup_decoding():
    model = tiny_model("llama")
    ids, _ = ragged_batch([6], seed=8)
    ids = ids.repeat(1, 4)  # repetitive prompt so lookups hit
    ref, out = _both(model, ids, max_new_tokens=20, do_sample=False, prompt_lookup_num_tokens=3, eos_token_id=None)
    assert torch.equal(out, ref)


def test_return_dict_with_scores_and_logits():
    model = tiny_model("llama")
    ids, mask = ragged_batch([5, 9, 2], seed=9)
    ref, out = _both(model, ids, mask, max_new_tokens=10, do_sample=False, return_dict_in_generate=True,
                     output_scores=True, output_logits=True)
    assert torch.equal(out.sequences, ref.sequences)
    torch.testing.assert_close(torch.stack(out.scores), torch.stack(ref.scores))
    torch.testing.assert_close(torch.stack(out.logits), torch.stack(ref.logits))
    assert isinstance(out.cache, hf_paged.PagedCache)


class _Collect(BaseStreamer):
    def __init__(self):
        self.chunks = []

    def put(self, value):
        self.chunks.append(value.tolist())

    def end(self):
        self.chunks.append("end")


def test_streamer_sees_the_same_tokens():
    model = tiny_model("llama")
    ids, _ = ragged_batch([8], seed=10)
    streams = [_Collect(), _Collect()]
    for streamer, extra in zip(streams, ({}, PAGED)):
        model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0, streamer=streamer, **extra)
    assert streams[0].chunks == streams[1].chunks
    assert len(streams[1].chunks) == 1 + 12 + 1  # prompt, each new token, end


class _StopOnTokens(StoppingCriteria):
    def __init__(self, tokens):
        self.tokens = torch.tensor(tokens)

    def __call__(self, input_ids, scores, **kwargs):
        return torch.isin(input_ids[:, -1], self.tokens)


def test_custom_stopping_criteria():
    model = tiny_model("llama")
    ids, mask = ragged_batch([6, 10], seed=11)
    free = model.generate(ids, attention_mask=mask, max_new_tokens=30, do_sample=False, pad_token_id=0,
                          eos_token_id=None)
    stop_tokens = free[:, ids.shape[1] + 5].tolist()  # tokens each row produces mid-way
    criteria = StoppingCriteriaList([_StopOnTokens(stop_tokens)])
    ref, out = _both(model, ids, mask, max_new_tokens=30, do_sample=False, stopping_criteria=criteria,
                     eos_token_id=None)
    assert torch.equal(out, ref)
    assert out.shape[1] < free.shape[1]


def test_paged_in_generation_config():
    model = tiny_model("llama")
    ids, mask = ragged_batch([5, 8], seed=12)
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    config = GenerationConfig(max_new_tokens=10, do_sample=False, pad_token_id=0, cache_implementation="paged")
    out = model.generate(ids, attention_mask=mask, generation_config=config, return_dict_in_generate=True)
    assert torch.equal(out.sequences, ref)
    assert isinstance(out.cache, hf_paged.PagedCache)


def test_chunked_prefill():
    model = tiny_model("llama")
    ids, mask = ragged_batch([23, 17], seed=13)
    ref, out = _both(model, ids, mask, max_new_tokens=8, do_sample=False, prefill_chunk_size=5)
    assert torch.equal(out, ref)


def test_right_padding_is_rejected():
    model = tiny_model("llama")
    ids, mask = ragged_batch([5, 8], seed=14)
    mask = mask.flip(-1)
    with pytest.raises(ValueError, match="left-padded"):
        model.generate(ids, attention_mask=mask, max_new_tokens=3, pad_token_id=0, **PAGED)


def test_both_cache_and_paged_is_rejected():
    model = tiny_model("llama")
    ids, _ = ragged_batch([5], seed=15)
    cache = hf_paged.PagedCache(model.config, num_blocks=8)
    with pytest.raises(ValueError, match="not both"):
        model.generate(ids, max_new_tokens=3, pad_token_id=0, cache=cache, cache_implementation="paged")


def test_unknown_cache_config_key_is_rejected():
    model = tiny_model("llama")
    ids, _ = ragged_batch([5], seed=16)
    with pytest.raises(ValueError, match="blocksize"):
        model.generate(ids, max_new_tokens=3, pad_token_id=0, cache_implementation="paged",
                       cache_config={"blocksize": 8})


def test_exhausted_explicit_pool_raises_typed_error():
    model = tiny_model("llama")
    ids, _ = ragged_batch([10], seed=17)
    cache = hf_paged.PagedCache(model.config, num_blocks=3, block_size=4)
    with pytest.raises(hf_paged.BlockPoolExhausted, match="exhausted"):
        model.generate(ids, max_new_tokens=10, pad_token_id=0, cache=cache)


def test_encoder_decoder_is_rejected():
    from transformers import T5Config, T5ForConditionalGeneration

    model = T5ForConditionalGeneration(T5Config(vocab_size=32, d_model=16, d_ff=32, num_layers=1, num_heads=2,
                                                d_kv=8, decoder_start_token_id=0)).eval()
    with pytest.raises(ValueError, match="encoder-decoder"):
        model.generate(torch.tensor([[3, 4, 5]]), max_new_tokens=2, cache_implementation="paged")
