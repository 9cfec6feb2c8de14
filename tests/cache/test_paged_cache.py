"""PagedCache memory: beam-search sharing, waste, stats, reset; the Cache API pieces generate relies on."""

import copy

import pytest
import torch
from transformers import DynamicCache

import hf_paged
from hf_paged import patches
from hf_paged.blocks import DEFAULT_BLOCK_SIZE
from tests.tiny import ragged_batch, tiny_model


def _dynamic_bytes(cache: DynamicCache) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def test_beam_search_keeps_55_percent_fewer_kv_bytes():
    model = tiny_model("llama")
    ids, _ = ragged_batch([256], seed=20)
    kwargs = dict(max_new_tokens=24, num_beams=4, do_sample=False, pad_token_id=0, eos_token_id=None,
                  return_dict_in_generate=True)
    ref = model.generate(ids, **kwargs)
    out = model.generate(ids, cache_implementation="paged", **kwargs)
    assert torch.equal(out.sequences, ref.sequences)
    dynamic_bytes, paged_bytes = _dynamic_bytes(ref.cache), out.cache.stats().bytes_in_use
    saving = 1 - paged_bytes / dynamic_bytes
    print(f"beam search width 4, 256-token prompt: DynamicCache {dynamic_bytes} B, PagedCache {paged_bytes} B, "
          f"{saving:.1%} fewer")
    assert saving >= 0.55


def test_num_return_sequences_stores_prompt_once():
    model = tiny_model("llama")
    ids, _ = ragged_batch([64], seed=21)
    torch.manual_seed(0)
    out = model.generate(ids, max_new_tokens=1, do_sample=True, num_return_sequences=4, pad_token_id=0,
                         cache_implementation="paged", return_dict_in_generate=True)
    stats = out.cache.stats()
    # Only the prefill ran: 64 prompt tokens in 64 / block_size full blocks, shared by the 4 rows.
    assert stats.blocks_in_use == 64 // DEFAULT_BLOCK_SIZE and stats.tokens_stored == 64


def test_waste_below_block_size_over_mean_length_on_ragged_batch():
    model = tiny_model("llama")
    lengths = [3, 17, 30, 9, 41, 22]
    ids, mask = ragged_batch(lengths, seed=22)
    cache = hf_paged.PagedCache(model.config, num_blocks=64, block_size=16)
    model.generate(ids, attention_mask=mask, cache=cache, max_new_tokens=12, do_sample=False, pad_token_id=0,
                   eos_token_id=None)
    stats = cache.stats()
    stored = [n + 11 for n in lengths]
    assert stats.tokens_stored == sum(stored)  # padding is never stored
    bound = 16 / (sum(stored) / len(stored))
    print(f"waste {stats.waste:.3f} < bound {bound:.3f}")
    assert stats.waste < bound
    assert stats.blocks_in_use == sum(-(-n // 16) for n in stored)


def test_stats_bytes_and_reset_returns_every_block():
    model = tiny_model("llama")
    ids, _ = ragged_batch([10, 10], seed=23)
    cache = hf_paged.PagedCache(model.config, num_blocks=16, block_size=4)
    model.generate(ids, cache=cache, max_new_tokens=5, pad_token_id=0, eos_token_id=None)
    stats = cache.stats()
    # 2 layers x (K + V) x 4 tokens x 2 kv heads x 16 head dim x 4 bytes
    assert stats.bytes_per_block == 2 * 2 * 4 * 2 * 16 * 4
    assert stats.bytes_in_use == stats.blocks_in_use * stats.bytes_per_block
    assert stats.bytes_reserved == 16 * stats.bytes_per_block
    cache.reset()
    assert cache.stats().blocks_in_use == 0
    # The same cache serves a second generation after reset.
    ref = model.generate(ids, max_new_tokens=5, pad_token_id=0, eos_token_id=None)
    assert torch.equal(model.generate(ids, cache=cache, max_new_tokens=5, pad_token_id=0, eos_token_id=None), ref)


def test_kv_cache_memory_budget_sets_block_count():
    model = tiny_model("llama")
    per_block = 2 * 2 * 16 * 2 * 16 * 4  # layers x (K, V) x block_size x kv heads x head dim x fp32
    cache = hf_paged.PagedCache(model.config, kv_cache_memory=10 * per_block + 5, block_size=16, dtype=torch.float32)
    assert cache.stats().num_blocks == 10
    with pytest.raises(ValueError, match="exactly one"):
        hf_paged.PagedCache(model.config, num_blocks=4, kv_cache_memory=10)
    with pytest.raises(ValueError, match="holds no block"):
        hf_paged.PagedCache(model.config, kv_cache_memory=10)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_paged_cache_serves_other_attention_implementations(attn):
    model = copy.deepcopy(tiny_model("llama"))
    model.set_attn_implementation(attn)
    ids, mask = ragged_batch([7, 12], seed=24)
    kwargs = dict(attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=None)
    ref = model.generate(ids, **kwargs)
    # output_attentions keeps the model's attention: the PagedCache hands it contiguous K/V.
    out = model.generate(ids, cache_implementation="paged", output_attentions=True, return_dict_in_generate=True,
                         **kwargs)
    assert torch.equal(out.sequences, ref)
    assert model.config._attn_implementation == attn


def test_latent_cache_stores_latents_at_the_configs_bytes():
    """Multi-head latent attention (DeepSeek-V3) caches its latent and rotary key, one "head" each: the blocks'
    bytes are those, as estimated from the config, and the tokens DynamicCache's."""
    model = tiny_model("deepseek_v3")
    ids, mask = ragged_batch([6, 13], seed=26)
    kwargs = dict(attention_mask=mask, max_new_tokens=7, do_sample=False, pad_token_id=0, eos_token_id=None)
    ref = model.generate(ids, **kwargs)
    cache = hf_paged.PagedCache(model.config, num_blocks=32, block_size=4)
    assert cache.stats().bytes_per_block == 2 * 4 * (16 + 8) * 4  # layers x tokens x (latent + rotary key) x fp32
    assert torch.equal(model.generate(ids, cache=cache, **kwargs), ref)
    stats = cache.stats()
    assert stats.bytes_in_use == stats.blocks_in_use * stats.bytes_per_block
    assert [tuple(layer.keys.shape[2:]) + tuple(layer.values.shape[2:]) for layer in cache.layers] == [(1, 16, 1, 8)] * 2


@pytest.mark.parametrize("arch", ["llama", "gpt_oss"])
def test_paged_attention_without_paged_cache_matches_the_default(arch):
    """DynamicCache with the "paged" attention's contiguous fallback: sdpa's result, or with attention sinks
    (gpt-oss, whose default is eager) the sinks' softmax."""
    model = copy.deepcopy(tiny_model(arch))
    ids, mask = ragged_batch([5, 11], seed=25)
    kwargs = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    ref = model.generate(ids, **kwargs)
    model.set_attn_implementation("paged")
    assert torch.equal(model.generate(ids, **kwargs), ref)  # DynamicCache + the "paged" attention's fallback


def test_crop_and_reorder():
    model = tiny_model("llama")
    cache = hf_paged.PagedCache(model.config, num_blocks=32, block_size=4)
    ids, mask = ragged_batch([6, 3], seed=26)
    cache.begin_generate(mask, batch_size=2)
    with torch.no_grad():
        model(ids, attention_mask=mask, cache=cache)
    assert cache.get_seq_length() == 6
    assert [t.num_tokens for t in cache.tables] == [6, 3]
    cache.reorder_cache(torch.tensor([0, 0]))
    assert cache.tables[0].block_ids == cache.tables[1].block_ids
    assert cache.pad_counts == [0, 0]
    assert cache.pool.ref_cnt(cache.tables[0].block_ids[0]) == 2
    cache.crop(-2)
    assert cache.get_seq_length() == 4 and [t.num_tokens for t in cache.tables] == [4, 4]
    with pytest.raises(ValueError, match="negative"):
        cache.crop(3)


def test_patches_are_idempotent_and_in_effect():
    from transformers.generation.utils import GenerationMixin

    generate = GenerationMixin.generate
    patches.apply()
    patches.apply()
    assert GenerationMixin.generate is generate
    assert patches.is_generate_patched() and patches.is_attention_registered()


def test_unsupported_transformers_version_is_named():
    with pytest.raises(patches.UnsupportedTransformersVersion, match="found 4.57.0"):
        patches.check_transformers_version("4.57.0")
    patches.check_transformers_version("5.24.0")


@pytest.mark.parametrize("model_type, config", [("diffllama", {})])
def test_models_that_reshape_kv_after_the_update_are_refused(model_type, config):
    """DiffLlama splits the V cache.update returns before attending; paged, that would be silently wrong, so
    generate and the engine refuse it by name (before anything is stored)."""
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM

    from tests.tiny import COMMON

    model = AutoModelForCausalLM.from_config(CONFIG_MAPPING[model_type](**COMMON, num_key_value_heads=2, **config))
    ids, mask = ragged_batch([5, 8], seed=27)
    with pytest.raises(ValueError, match="does not support .* yet"):
        model.generate(ids, attention_mask=mask, max_new_tokens=2, pad_token_id=0, cache_implementation="paged")
    with pytest.raises(ValueError, match="does not support .* yet"):
        hf_paged.LLM(model, num_blocks=16, block_size=4)
