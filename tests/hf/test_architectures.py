"""Paged generate equals the default DynamicCache, token for token and score for score, on every architecture."""

import pytest
import torch

import hf_paged  # noqa: F401
from tests.tiny import CONFIGS, ragged_batch, tiny_model


def _generate(model, ids, mask, **kwargs):
    return model.generate(
        ids, attention_mask=mask, max_new_tokens=16, pad_token_id=0, eos_token_id=None,
        return_dict_in_generate=True, output_scores=True, **kwargs,
    )


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_greedy_ragged_batch_matches_dynamic_cache(arch):
    model = tiny_model(arch)
    ids, mask = ragged_batch([9, 14, 5], seed=1)
    ref = _generate(model, ids, mask, do_sample=False)
    out = _generate(model, ids, mask, do_sample=False, cache_implementation="paged", cache_config={"block_size": 4})
    torch.testing.assert_close(torch.stack(out.scores), torch.stack(ref.scores), rtol=1e-4, atol=1e-4)
    assert torch.equal(out.sequences, ref.sequences)


@pytest.mark.parametrize("arch", ["mistral", "gemma2", "gpt2"])
def test_seeded_sampling_matches_dynamic_cache(arch):
    model = tiny_model(arch)
    ids, mask = ragged_batch([6, 11], seed=2)
    torch.manual_seed(123)
    ref = _generate(model, ids, mask, do_sample=True, top_k=20)
    torch.manual_seed(123)
    out = _generate(model, ids, mask, do_sample=True, top_k=20, cache_implementation="paged")
    assert torch.equal(out.sequences, ref.sequences)


def test_attention_setting_restored_after_generate():
    model = tiny_model("llama")
    before = model.config._attn_implementation
    ids, mask = ragged_batch([4, 6])
    model.generate(ids, attention_mask=mask, max_new_tokens=3, pad_token_id=0, cache_implementation="paged")
    assert model.config._attn_implementation == before != "paged"


def test_paged_turns_on_the_cache_a_config_turns_off():
    """MPT's config says use_cache=False (stock generate then re-feeds the whole sequence every step): asking for
    the paged cache asks for a cache, with the same tokens; an explicit use_cache=False is refused."""
    from transformers import GenerationConfig

    model = tiny_model("mpt")
    assert model.generation_config.use_cache is False
    ids, mask = ragged_batch([9, 14, 5], seed=3)
    kwargs = dict(attention_mask=mask, max_new_tokens=8, pad_token_id=0, eos_token_id=None)
    cache = hf_paged.PagedCache(model.config, num_blocks=64, block_size=4)
    assert torch.equal(model.generate(ids, cache=cache, **kwargs), model.generate(ids, **kwargs))
    assert cache.stats().tokens_stored > 0 and model.generation_config.use_cache is False
    for explicit in (dict(use_cache=False), dict(generation_config=GenerationConfig(use_cache=False))):
        with pytest.raises(ValueError, match="needs use_cache=True"):
            model.generate(ids, cache_implementation="paged", **{**kwargs, **explicit})
