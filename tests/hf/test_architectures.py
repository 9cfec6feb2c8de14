"""Paged generate equals the default DynamicCache, token for token and score for score, on every architecture."""

import pytest
import torch

import hf_paged  # noqa: F401
from tests.tiny import CONFIGS, ragged_batch, tiny_model


def _generate(model, ids, mask, **kwargs):
    return model.generate(
        ids, attention_mask=mask, max_new_tokens=24, pad_token_id=0, eos_token_id=None,
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
