"""The continuous-batching engine against per-prompt HF generate, on a tiny random Llama (CPU, fp32)."""

import copy
import random

import pytest
import torch

from hf_paged import BeamSearchParams, LLM, RequestError, SamplingParams
from tests.tiny import VOCAB, tiny_model


def _prompts(n, seed=0, low=2, high=40):
    rng = random.Random(seed)
    return [[rng.randrange(3, VOCAB) for _ in range(rng.randint(low, high))] for _ in range(n)]


def _hf_greedy(model, prompt, max_new_tokens):
    out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=0, eos_token_id=None)
    return out[0, len(prompt):].tolist()


GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def test_greedy_matches_per_prompt_generate_with_chunked_prefill(make_llm):
    model = tiny_model("llama")
    prompts = _prompts(18, seed=1)
    llm = make_llm(max_num_batched_tokens=48, max_num_seqs=8)
    outputs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert [o.prompt_token_ids for o in outputs] == prompts
    for prompt, output in zip(prompts, outputs):
        assert output.finished and output.outputs[0].finish_reason == "length"
        assert output.outputs[0].token_ids == _hf_greedy(model, prompt, 12)


@pytest.mark.parametrize("arch", ["mistral", "gemma2", "gpt2", "qwen3", "gpt_oss", "deepseek_v3", "jetmoe"])
def test_greedy_matches_on_other_architectures(make_llm, arch):
    model = tiny_model(arch)
    prompts = _prompts(5, seed=2, low=5, high=20)
    outputs = make_llm(arch).generate(prompts, GREEDY, use_tqdm=False)
    for prompt, output in zip(prompts, outputs):
        assert output.outputs[0].token_ids == _hf_greedy(model, prompt, 12)


def test_seeded_sampling_does_not_depend_on_the_batch(make_llm):
    llm = make_llm()
    params = SamplingParams(temperature=0.8, top_p=0.9, max_tokens=10, seed=1234, ignore_eos=True)
    target = _prompts(1, seed=3)[0]
    alone = llm.generate([target], params, use_tqdm=False)[0].outputs[0].token_ids
    others = _prompts(6, seed=4)
    mixed = llm.generate(others[:3] + [target] + others[3:],
                         [SamplingParams(temperature=1.0, max_tokens=7)] * 3 + [params]
                         + [SamplingParams(temperature=0.5, max_tokens=9)] * 3, use_tqdm=False)
    assert mixed[3].outputs[0].token_ids == alone
    again = llm.generate([target], params, use_tqdm=False)[0].outputs[0].token_ids
    assert again == alone


@pytest.mark.parametrize("length_penalty", [1.0, 0.5])
def test_beam_search_matches_hf(make_llm, length_penalty):
    model = tiny_model("llama")
    llm = make_llm()
    prompts = _prompts(3, seed=5, low=4, high=12)
    params = BeamSearchParams(beam_width=4, max_tokens=10, length_penalty=length_penalty, ignore_eos=True)
    outputs = llm.beam_search(prompts, params)
    for prompt, output in zip(prompts, outputs):
        ref = model.generate(torch.tensor([prompt]), num_beams=4, num_return_sequences=4, max_new_tokens=10,
                             do_sample=False, length_penalty=length_penalty, pad_token_id=0, eos_token_id=None,
                             return_dict_in_generate=True, output_scores=True)
        assert [o.token_ids for o in output.outputs] == ref.sequences[:, len(prompt):].tolist()
        torch.testing.assert_close(torch.tensor([o.cumulative_logprob for o in output.outputs]),
                                   ref.sequences_scores, rtol=1e-4, atol=1e-5)


def test_beam_search_with_eos_matches_hf():
    model = copy.deepcopy(tiny_model("llama"))
    prompt = _prompts(1, seed=6, low=6, high=6)[0]
    free = _hf_greedy(model, prompt, 8)
    finished_with_eos = 0
    for eos in free[:4]:  # tokens the beams will meet early
        model.generation_config.eos_token_id = eos
        llm = LLM(model, num_blocks=128, block_size=4)
        output = llm.beam_search([prompt], BeamSearchParams(beam_width=3, max_tokens=8))[0]
        ref = model.generate(torch.tensor([prompt]), num_beams=3, num_return_sequences=3, max_new_tokens=8,
                             do_sample=False, pad_token_id=0, eos_token_id=eos)
        # HF pads finished beams after their EOS: cut each row after its first EOS.
        expected = [row[: row.index(eos) + 1] if eos in row else row for row in ref[:, len(prompt):].tolist()]
        assert [o.token_ids for o in output.outputs] == expected
        assert llm.get_stats().blocks_in_use == 0
        finished_with_eos += any(eos in row for row in expected)
    assert finished_with_eos > 0


def test_parallel_sampling_stores_the_prompt_once(make_llm):
    llm = make_llm(block_size=4)
    prompt = _prompts(1, seed=7, low=20, high=20)[0]
    engine = llm.engine
    engine.add_request("r", prompt, SamplingParams(n=4, temperature=1.0, max_tokens=3, seed=0))
    engine.step()  # prefill + the 4 first samples
    stats = llm.get_stats()
    # 20 prompt tokens = 5 full blocks, held once by the 4 forked sequences.
    assert stats.blocks_in_use == 5
    assert stats.num_running == 4
    blocks = {tuple(seq.table.block_ids) for seq in engine.requests["r"].sequences}
    assert len(blocks) == 1
    while engine.has_unfinished_requests():
        outputs = engine.step()
    assert len(outputs[0].outputs) == 4
    assert all(len(o.token_ids) == 3 for o in outputs[0].outputs)


def test_shared_system_prompt_hits_the_prefix_cache(make_llm):
    system = _prompts(1, seed=8, low=24, high=24)[0]
    first, second = system + [5, 6, 7], system + [9, 10]
    llm = make_llm(block_size=4)
    out1 = llm.generate([first], GREEDY, use_tqdm=False)[0]
    out2 = llm.generate([second], GREEDY, use_tqdm=False)[0]
    stats = llm.get_stats()
    assert out1.num_cached_tokens == 0
    assert out2.num_cached_tokens == 24  # the 6 full blocks of the shared prefix
    assert stats.prefix_cache_hits >= 6
    plain = make_llm(block_size=4, enable_prefix_caching=False)
    ref = plain.generate([first, second], GREEDY, use_tqdm=False)
    assert [out1.outputs[0].token_ids, out2.outputs[0].token_ids] == [r.outputs[0].token_ids for r in ref]


def test_small_pool_preempts_and_still_finishes_every_request(make_llm):
    model = tiny_model("llama")
    prompts = _prompts(8, seed=9, low=10, high=20)
    llm = make_llm(num_blocks=14, block_size=4, max_num_seqs=8)
    outputs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert llm.get_stats().num_preemptions > 0
    for prompt, output in zip(prompts, outputs):
        assert output.outputs[0].token_ids == _hf_greedy(model, prompt, 12)


def test_abort_frees_every_block(make_llm):
    llm = make_llm()
    engine = llm.engine
    for i, prompt in enumerate(_prompts(4, seed=10)):
        engine.add_request(f"r{i}", prompt, SamplingParams(n=2, max_tokens=50, ignore_eos=True))
    engine.step()
    engine.step()
    assert llm.get_stats().blocks_in_use > 0
    for i in range(4):
        assert engine.abort(f"r{i}")
    assert llm.get_stats().blocks_in_use == 0
    assert not engine.abort("r0")


def test_stop_token_ids_and_max_tokens(make_llm):
    model = tiny_model("llama")
    prompt = _prompts(1, seed=11)[0]
    free = _hf_greedy(model, prompt, 12)
    llm = make_llm()
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[free[4]],
                                                ignore_eos=True), use_tqdm=False)[0].outputs[0]
    first = free.index(free[4])
    assert out.token_ids == free[: first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == free[4]


def test_bad_requests_raise_typed_errors_and_queue_nothing(make_llm):
    llm = make_llm(num_blocks=16, block_size=4, max_model_len=64)
    with pytest.raises(RequestError, match="empty"):
        llm.generate([[]], GREEDY)
    with pytest.raises(RequestError, match="at most 63"):
        llm.generate([[5] * 64], GREEDY)
    with pytest.raises(RequestError, match="outside the vocabulary"):
        llm.generate([[5, VOCAB + 3]], GREEDY)
    with pytest.raises(RequestError, match="needs up to"):
        llm.generate([[5] * 30], SamplingParams(max_tokens=33, n=2))
    with pytest.raises(RequestError, match="tokenizer"):
        llm.generate(["text prompt without tokenizer"], GREEDY)
    assert not llm.engine.has_unfinished_requests()


def test_chat_messages_use_the_template_token_ids():
    from tests.tiny import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    llm = LLM(tiny_model("llama"), tokenizer, num_blocks=64, block_size=4)
    messages = [{"role": "user", "content": "w10 w11 w12"}]
    output = llm.chat(messages, GREEDY, use_tqdm=False)[0]
    expected = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    expected = list(expected["input_ids"] if hasattr(expected, "keys") else expected)
    assert output.prompt_token_ids == expected and expected[0] == tokenizer.bos_token_id
    assert output.outputs[0].token_ids == _hf_greedy(tiny_model("llama"), expected, 12)


def test_a_failing_step_aborts_only_its_requests(make_llm, monkeypatch):
    from hf_paged.engine import StepError

    llm = make_llm(max_num_seqs=1)  # one request runs at a time: the other waits
    engine = llm.engine
    first, second = _prompts(2, seed=30)
    engine.add_request("a", first, GREEDY)
    engine.add_request("b", second, GREEDY)
    real = engine.runner.execute
    monkeypatch.setattr(engine.runner, "execute", lambda out, *_: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(StepError, match="boom") as info:
        engine.step()
    assert info.value.request_ids == ["a"]
    monkeypatch.setattr(engine.runner, "execute", real)
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()
    assert [o.request_id for o in outputs if o.finished] == ["b"]
    assert outputs[-1].outputs[0].token_ids == _hf_greedy(tiny_model("llama"), second, 12)


def test_a_model_whose_attention_bypasses_the_cache_kwargs_is_named(make_llm):
    """Falcon's attention (like GPT-NeoX's, BLOOM's, MPT's in transformers 5.24) passes no kwargs to cache.update,
    so the packed engine step cannot reach it: the step fails with that said, and every block goes back (paged
    generate serves such models, tests/hf/test_architectures.py)."""
    from hf_paged.engine import StepError

    llm = make_llm("falcon")
    with pytest.raises(StepError, match="FalconConfig: the engine needs the 'paged' attention"):
        llm.generate(_prompts(2, seed=31), GREEDY, use_tqdm=False)


def test_position_tuned_queries_cap_the_engines_lengths():
    """Llama4 (chunked attention, NoPE layers scaling queries from floor_scale = 24 positions on): a packed step
    cannot give the scale its positions, so the engine caps lengths below where it departs from 1, says so, and
    matches generate there; a longer prompt is refused."""
    model = tiny_model("llama4_text")
    with pytest.warns(RuntimeWarning, match="capped at 23"):
        llm = LLM(model, num_blocks=64, block_size=4)
    prompts = _prompts(2, seed=32, low=3, high=11)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    for prompt, output in zip(prompts, llm.generate(prompts, params, use_tqdm=False)):
        assert output.outputs[0].token_ids == _hf_greedy(model, prompt, 12)
    with pytest.raises(RequestError):
        llm.generate([_prompts(1, seed=33, low=25, high=25)[0]], params, use_tqdm=False)
    assert llm.get_stats().blocks_in_use == 0


def test_kv_sharing_between_layers_is_refused_up_front():
    """Gemma4's last layers reuse earlier layers' K/V (num_kv_shared_layers): paged generate serves it, the engine
    says it cannot before taking any request."""
    with pytest.raises(ValueError, match="does not support KV sharing between layers"):
        LLM(tiny_model("gemma4_text"), num_blocks=64, block_size=4)


def test_preemption_by_swap_keeps_the_kv_and_the_outputs(make_llm):
    model = tiny_model("llama")
    prompts = _prompts(8, seed=9, low=10, high=20)
    recompute = make_llm(num_blocks=14, block_size=4, max_num_seqs=8)
    swap = make_llm(num_blocks=14, block_size=4, max_num_seqs=8, preemption_mode="swap", swap_space=2**20)
    ref = recompute.generate(prompts, GREEDY, use_tqdm=False)
    out = swap.generate(prompts, GREEDY, use_tqdm=False)
    for prompt, output in zip(prompts, out):
        assert output.outputs[0].token_ids == _hf_greedy(model, prompt, 12)
    assert [o.outputs[0].token_ids for o in out] == [o.outputs[0].token_ids for o in ref]
    assert swap.engine.num_swapped_out > 0 and swap.get_stats().num_preemptions > 0
    # Swapped sequences come back without recomputing: fewer tokens go through the model.
    assert swap.get_stats().computed_tokens < recompute.get_stats().computed_tokens
    assert swap.engine.scheduler.cpu_manager.pool.num_free_blocks == swap.engine.scheduler.cpu_manager.pool.num_blocks
    with pytest.raises(ValueError, match="swap_space"):
        make_llm(preemption_mode="swap")


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_step_only_finished_returns_final_outputs_only(make_llm, async_scheduling):
    llm = make_llm(async_scheduling=async_scheduling)
    engine = llm.engine
    engine.add_request("short", [5, 6, 7], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
    engine.add_request("long", [8, 9, 10], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    seen = []
    while engine.has_unfinished_requests():
        seen.append([(o.request_id, o.finished) for o in engine.step(only_finished=True)])
    if async_scheduling:  # each step returns the previous step's tokens; no step past the last token is run
        assert seen == [[], [], [("short", True)], [], [], [("long", True)]]
    else:
        assert seen == [[], [("short", True)], [], [], [("long", True)]]


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_longest_first_decode_order_keeps_every_output(make_llm, monkeypatch, async_scheduling):
    """By default (HF_PAGED_DECODE_ORDER unset: longest) each decode step runs its sequences by context, longest
    first, and every request still gets the tokens it gets in scheduling order (HF_PAGED_DECODE_ORDER=sequences):
    greedy and seeded rows, pending tokens included."""
    prompts = _prompts(7, seed=9, low=2, high=30)
    params = [GREEDY if i % 2 else SamplingParams(temperature=0.9, max_tokens=12, seed=i, ignore_eos=True)
              for i in range(len(prompts))]
    monkeypatch.setenv("HF_PAGED_DECODE_ORDER", "sequences")
    in_order = make_llm(async_scheduling=async_scheduling)
    assert not in_order.engine.longest_first
    expected = in_order.generate(prompts, params, use_tqdm=False)
    monkeypatch.delenv("HF_PAGED_DECODE_ORDER")
    llm = make_llm(async_scheduling=async_scheduling)
    assert llm.engine.longest_first
    orders = []
    execute = llm.engine.runner.execute

    def recording(out, *args, **kwargs):
        if all(item.num_tokens == 1 for item in out.scheduled):
            orders.append([item.seq.num_computed_tokens for item in out.scheduled])
        return execute(out, *args, **kwargs)

    monkeypatch.setattr(llm.engine.runner, "execute", recording)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == [o.outputs[0].token_ids for o in expected]
    assert any(len(set(order)) > 1 for order in orders)  # the batches were ragged
    assert all(order == sorted(order, reverse=True) for order in orders)


def test_only_decode_steps_are_ordered_longest_first():
    """A decode-only step is sorted by context (stable for ties); a step with a prefill chunk keeps its order."""
    from types import SimpleNamespace

    from hf_paged.engine.scheduler import ScheduledSeq, SchedulerOutput

    def step(*chunks):  # (computed tokens, tokens this step)
        return SchedulerOutput([ScheduledSeq(SimpleNamespace(num_computed_tokens=c, name=i), n, True)
                                for i, (c, n) in enumerate(chunks)], [], [])

    decode = step((5, 1), (40, 1), (5, 1), (17, 1))
    decode.order_decodes_longest_first()
    assert [item.seq.name for item in decode.scheduled] == [1, 3, 0, 2]
    mixed = step((5, 1), (0, 30), (17, 1))
    mixed.order_decodes_longest_first()
    assert [item.seq.name for item in mixed.scheduled] == [0, 1, 2]
