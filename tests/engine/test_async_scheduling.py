"""Overlapped (async) scheduling against the synchronous loop: the same tokens for every kind of request.

With async scheduling the engine schedules step N+1 before reading back step N's tokens; the tokens of the
step in flight reach the next forward on the device. Every case here runs both ways on a tiny random Llama
(CPU, fp32) and compares outputs exactly, and the fixture checks that every block came back.
"""

import random

import pytest

from hf_paged import BeamSearchParams, SamplingParams
from tests.tiny import VOCAB


def _prompts(n, seed, low=2, high=30):
    rng = random.Random(seed)
    return [[rng.randrange(3, VOCAB) for _ in range(rng.randint(low, high))] for _ in range(n)]


def _both(make_llm, prompts, params, **kwargs):
    sync = make_llm(async_scheduling=False, **kwargs).generate(prompts, params, use_tqdm=False)
    overlapped = make_llm(async_scheduling=True, **kwargs).generate(prompts, params, use_tqdm=False)
    return sync, overlapped


def _tokens(outputs):
    return [[(c.token_ids, c.finish_reason, c.stop_reason) for c in o.outputs] for o in outputs]


def test_mixed_sampling_parameters_give_the_same_tokens(make_llm):
    prompts = _prompts(12, seed=1)
    params = [
        SamplingParams(temperature=0, max_tokens=9, ignore_eos=True),
        SamplingParams(temperature=0.9, top_k=20, max_tokens=14, seed=7),  # EOS may stop it early
        SamplingParams(temperature=0, max_tokens=30),  # may stop at EOS (id 2)
        SamplingParams(temperature=0.7, top_p=0.8, max_tokens=11, seed=3, logprobs=2),
        SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[5, 9, 17, 40]),
        SamplingParams(temperature=0, max_tokens=10, repetition_penalty=1.3, ignore_eos=True),
        SamplingParams(temperature=0.8, max_tokens=8, presence_penalty=0.5, seed=11),
        SamplingParams(temperature=0, max_tokens=13, min_tokens=6, stop_token_ids=[5, 9, 17, 40]),
        SamplingParams(temperature=1.0, n=3, max_tokens=7, seed=5, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=1, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=16, ignore_eos=True),
        SamplingParams(temperature=0.6, max_tokens=5, seed=2, ignore_eos=True),
    ]
    sync, overlapped = _both(make_llm, prompts, params, max_num_batched_tokens=40, max_num_seqs=6)
    assert _tokens(overlapped) == _tokens(sync)
    assert [[c.logprobs for c in o.outputs] for o in overlapped] == [[c.logprobs for c in o.outputs] for o in sync]
    assert any(c.finish_reason == "stop" for o in sync for c in o.outputs)  # the early-stop path is exercised


def test_min_tokens_boundary(make_llm):
    # Almost every token stops the request, so each output ends at the first step min_tokens stops masking them:
    # a step scheduled before the previous token is known must not mask one step too long.
    prompts = _prompts(6, seed=5)
    params = [SamplingParams(temperature=0, max_tokens=12, min_tokens=m, stop_token_ids=list(range(3, VOCAB)))
              for m in (1, 2, 3, 4, 5, 7)]
    sync, overlapped = _both(make_llm, prompts, params)
    assert _tokens(overlapped) == _tokens(sync)
    lengths = [len(o.outputs[0].token_ids) for o in sync]
    assert all(n > m for n, m in zip(lengths, (1, 2, 3, 4, 5, 7)))
    assert sum(n == m + 1 for n, m in zip(lengths, (1, 2, 3, 4, 5, 7))) >= 4  # mostly the first unmasked token


def test_max_model_len_and_preemption(make_llm):
    prompts = _prompts(8, seed=2, low=10, high=20)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    sync, overlapped = _both(make_llm, prompts, params, num_blocks=22, block_size=4, max_model_len=44)
    assert _tokens(overlapped) == _tokens(sync)
    assert all(len(p) + len(o.outputs[0].token_ids) == 44 for p, o in zip(prompts, sync))


def test_beam_search_is_unchanged(make_llm):
    prompts = _prompts(3, seed=3, low=4, high=12)
    params = BeamSearchParams(beam_width=3, max_tokens=8)
    sync = make_llm(async_scheduling=False).beam_search(prompts, params)
    overlapped = make_llm(async_scheduling=True).beam_search(prompts, params)
    assert [[(c.token_ids, c.cumulative_logprob) for c in o.outputs] for o in overlapped] == \
        [[(c.token_ids, c.cumulative_logprob) for c in o.outputs] for o in sync]


@pytest.mark.parametrize("abort_after", [1, 2, 5])
def test_abort_while_a_step_is_in_flight(make_llm, abort_after):
    llm = make_llm(async_scheduling=True)
    engine = llm.engine
    keep, drop = _prompts(2, seed=4)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    engine.add_request("keep", keep, params)
    engine.add_request("drop", drop, params)
    outputs = []
    for _ in range(abort_after):
        outputs += engine.step()
    assert engine.abort("drop")
    while engine.has_unfinished_requests():
        outputs += engine.step()
    assert not any(o.request_id == "drop" and o.finished for o in outputs)
    alone = make_llm(async_scheduling=False).generate([keep], params, use_tqdm=False)[0]
    assert outputs[-1].request_id == "keep" and outputs[-1].outputs[0].token_ids == alone.outputs[0].token_ids
