"""pipeline("text-generation") with one added argument, cache_implementation="paged": same results."""

import pytest
from transformers import pipeline

from hf_paged import patches
from tests.tiny import tiny_model, tiny_tokenizer

PROMPTS = ["w10 w11 w12", "w40 w41", "w7 w8 w9 w20 w30 w31", "w50"]


@pytest.fixture
def pipe():
    return pipeline("text-generation", model=tiny_model("llama"), tokenizer=tiny_tokenizer())


def test_many_prompts_run_on_the_engine_with_the_same_results(pipe):
    ref = pipe(PROMPTS, max_new_tokens=8, do_sample=False)
    out = pipe(PROMPTS, max_new_tokens=8, do_sample=False, cache_implementation="paged")
    assert out == ref
    llm = pipe.__dict__["_hf_paged_llm"]  # the list went through continuous batching
    assert llm.get_stats().generation_tokens == 8 * len(PROMPTS)
    assert llm.get_stats().blocks_in_use == 0
    assert patches.is_pipeline_patched()


def test_chats_and_new_text_only(pipe):
    chats = [[{"role": "user", "content": "w10 w11"}], [{"role": "user", "content": "w20 w21 w22"}]]
    ref = pipe(chats, max_new_tokens=6, do_sample=False)
    assert pipe(chats, max_new_tokens=6, do_sample=False, cache_implementation="paged") == ref
    ref = pipe(PROMPTS, max_new_tokens=5, do_sample=False, return_full_text=False)
    assert pipe(PROMPTS, max_new_tokens=5, do_sample=False, return_full_text=False,
                cache_implementation="paged") == ref


def test_single_prompt_and_beam_search_use_paged_generate(pipe):
    ref = pipe(PROMPTS[0], max_new_tokens=6, do_sample=False)
    assert pipe(PROMPTS[0], max_new_tokens=6, do_sample=False, cache_implementation="paged") == ref
    kwargs = dict(max_new_tokens=6, num_beams=3, num_return_sequences=2, do_sample=False)
    assert pipe(PROMPTS, cache_implementation="paged", **kwargs) == pipe(PROMPTS, **kwargs)
    assert "_hf_paged_llm" not in pipe.__dict__  # beam search kept the pipeline's own path


def test_sampling_with_num_return_sequences_returns_n_records(pipe):
    out = pipe(PROMPTS, max_new_tokens=4, do_sample=True, num_return_sequences=3, cache_implementation="paged")
    assert [len(records) for records in out] == [3] * len(PROMPTS)
    for prompt, records in zip(PROMPTS, out):
        assert all(r["generated_text"].startswith(prompt) for r in records)
