"""The sampler against transformers' own logits processors / warpers, torch's softmax, and itself across batches."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.generation.logits_process import (
    MinNewTokensLengthLogitsProcessor,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from hf_paged.engine.params import SamplingParams
from hf_paged.engine.sampler import (
    SamplingState,
    apply_min_p,
    apply_min_tokens,
    apply_penalties,
    apply_temperature,
    apply_top_k,
    apply_top_p,
    beam_candidates,
    process_logits,
    sample,
)

V = 50


def state(prompt=(), output=(), generator=None, eos=(), **params):
    return SamplingState(SamplingParams(**params), list(prompt), list(output), generator, tuple(eos))


def seeded(seed):
    return torch.Generator().manual_seed(seed)


def random_ids(gen, n):
    return torch.randint(0, V, (n,), generator=gen).tolist()


def tied_logits(rows, vocab=V, seed=0):
    # rounded so that rows hold ties, the case where top-k / top-p semantics differ between implementations
    return (torch.randn(rows, vocab, generator=seeded(seed)) * 3).round(decimals=1)


def hf_chain(row_logits, params):
    """HF's warpers in generate's order, on one row (1, V)."""
    scores = row_logits.clone()
    if params.temperature != 1.0:
        scores = TemperatureLogitsWarper(params.temperature)(None, scores)
    if params.top_k:
        scores = TopKLogitsWarper(params.top_k)(None, scores)
    if params.top_p < 1.0:
        scores = TopPLogitsWarper(params.top_p)(None, scores)
    if params.min_p:
        scores = MinPLogitsWarper(params.min_p)(None, scores)
    return scores


def test_repetition_penalty_matches_hf():
    gen = seeded(1)
    logits = torch.randn(5, V, generator=gen) * 4
    penalties = [1.3, 1.0, 0.7, 2.5, 1.1]
    states = [state(random_ids(gen, 3 + 7 * i), random_ids(gen, 2 * i), repetition_penalty=p)
              for i, p in enumerate(penalties)]
    states[4].output_ids = []  # empty output: the prompt alone counts
    got = apply_penalties(logits.clone(), states)
    for i, s in enumerate(states):
        ids = torch.tensor([s.prompt_ids + s.output_ids])
        want = RepetitionPenaltyLogitsProcessor(penalties[i])(ids, logits[i : i + 1].clone())
        torch.testing.assert_close(got[i : i + 1], want, rtol=0, atol=0)
    assert not torch.equal(got[0], logits[0]) and torch.equal(got[1], logits[1])


def test_presence_and_frequency_penalties_count_output_tokens_only():
    gen = seeded(2)
    logits = torch.randn(4, V, generator=gen)
    params = [(0.5, 0.0), (0.0, 0.3), (-1.0, 1.5), (0.0, 0.0)]
    states = [state(random_ids(gen, 10), random_ids(gen, 12), presence_penalty=p, frequency_penalty=f)
              for p, f in params]
    want = logits.clone()
    for i, (p, f) in enumerate(params):
        for token in set(states[i].output_ids):
            want[i, token] -= p + f * states[i].output_ids.count(token)
    torch.testing.assert_close(apply_penalties(logits.clone(), states), want)


def test_penalties_combined_apply_repetition_first():
    gen = seeded(3)
    logits = torch.randn(2, V, generator=gen) * 3
    states = [state(random_ids(gen, 8), random_ids(gen, 6), repetition_penalty=1.4, presence_penalty=0.4,
                    frequency_penalty=0.2), state(random_ids(gen, 5), repetition_penalty=1.2)]
    for i, s in enumerate(states):
        want = RepetitionPenaltyLogitsProcessor(s.params.repetition_penalty)(
            torch.tensor([s.prompt_ids + s.output_ids]), logits[i : i + 1].clone())[0]
        for token in set(s.output_ids):
            want[token] -= s.params.presence_penalty + s.params.frequency_penalty * s.output_ids.count(token)
        torch.testing.assert_close(apply_penalties(logits.clone(), states)[i], want)


def test_min_tokens_matches_hf_min_new_tokens():
    logits = torch.randn(4, V, generator=seeded(4))
    eos = (2, 7)
    states = [
        state([1, 2, 3], [5], eos=eos, min_tokens=3, stop_token_ids=[11]),  # too short: eos and stop masked
        state([1, 2, 3], [5], eos=eos, min_tokens=3, stop_token_ids=[11], ignore_eos=True),  # stop only
        state([1, 2], [5, 6, 8], eos=eos, min_tokens=3, stop_token_ids=[11]),  # reached: untouched
        state([4], [], eos=eos, min_tokens=1, stop_token_ids=[V + 5]),  # ids outside the vocabulary ignored
    ]
    got = apply_min_tokens(logits.clone(), states)
    for i, masked in enumerate([[2, 7, 11], [11], [2, 7, 11], [2, 7]]):
        s = states[i]
        hf = MinNewTokensLengthLogitsProcessor(len(s.prompt_ids), s.params.min_tokens, masked)
        want = hf(torch.tensor([s.prompt_ids + s.output_ids]), logits[i : i + 1].clone())
        torch.testing.assert_close(got[i : i + 1], want, rtol=0, atol=0)
    assert torch.isinf(got[1, 11]) and not torch.isinf(got[1, 2])


@pytest.mark.parametrize("values", [[0.3, 1.0, 2.0], [1.0, 1.0, 1.0]])
def test_temperature_matches_hf(values):
    logits = tied_logits(3)
    got = apply_temperature(logits.clone(), values)
    for i, t in enumerate(values):
        torch.testing.assert_close(got[i : i + 1], TemperatureLogitsWarper(t)(None, logits[i : i + 1].clone()))


@pytest.mark.parametrize("values", [[1, 5, 0, V + 10], [3, 3, 3, 3], [0, 0, 0, 0], [V, 2, 49, 7]])
def test_top_k_matches_hf(values):
    logits = tied_logits(4)
    got = apply_top_k(logits.clone(), values)
    for i, k in enumerate(values):
        want = TopKLogitsWarper(k)(None, logits[i : i + 1].clone()) if k else logits[i : i + 1]
        torch.testing.assert_close(got[i : i + 1], want, rtol=0, atol=0)


@pytest.mark.parametrize("values", [[0.05, 0.5, 0.9, 1.0], [0.999, 0.3, 1.0, 0.7]])
def test_top_p_matches_hf(values):
    logits = tied_logits(4)
    got = apply_top_p(logits.clone(), values)
    for i, p in enumerate(values):
        torch.testing.assert_close(got[i : i + 1], TopPLogitsWarper(p)(None, logits[i : i + 1].clone()),
                                   rtol=0, atol=0)


@pytest.mark.parametrize("p, kept", [(0.5, 2), (0.75, 3), (0.25, 1), (1.0, 4)])
def test_top_p_boundary_mass_is_removed_as_hf(p, kept):
    logits = torch.zeros(1, 4)  # probabilities 1/4 exactly: cumulative mass lands on 1 - p exactly
    got = apply_top_p(logits.clone(), [p])
    torch.testing.assert_close(got, TopPLogitsWarper(p)(None, logits.clone()), rtol=0, atol=0)
    assert int(torch.isfinite(got).sum()) == kept


@pytest.mark.parametrize("values", [[0.0, 0.05, 0.3, 1.0], [0.1, 0.1, 0.1, 0.9]])
def test_min_p_matches_hf(values):
    logits = tied_logits(4)
    got = apply_min_p(logits.clone(), values)
    for i, m in enumerate(values):
        torch.testing.assert_close(got[i : i + 1], MinPLogitsWarper(m)(None, logits[i : i + 1].clone()),
                                   rtol=0, atol=0)


warper_params = st.builds(
    SamplingParams,
    temperature=st.sampled_from([0.0, 0.25, 0.7, 1.0, 1.6]),
    top_k=st.sampled_from([0, 1, 2, 5, 20, V]),
    top_p=st.sampled_from([0.1, 0.5, 0.8, 0.95, 1.0]),
    min_p=st.sampled_from([0.0, 0.02, 0.2, 0.6]),
)


@settings(max_examples=60, deadline=None)
@given(st.lists(warper_params, min_size=1, max_size=6), st.integers(0, 2**16))
def test_mixed_batch_warpers_match_hf_chain_per_row(params, seed):
    logits = tied_logits(len(params), seed=seed).to(torch.bfloat16)
    got = process_logits(logits, [SamplingState(p, [], [], None) for p in params])
    assert got.dtype == torch.float32
    for i, p in enumerate(params):
        row = logits[i : i + 1].float()
        want = row if p.greedy else hf_chain(row, p)  # greedy rows are only argmax-ed
        torch.testing.assert_close(got[i : i + 1], want, rtol=0, atol=0)


def test_process_logits_leaves_input_untouched():
    logits = tied_logits(2)
    before = logits.clone()
    process_logits(logits, [state([1, 2], [3], repetition_penalty=1.5, top_k=3, temperature=0.5),
                            state(top_p=0.5, presence_penalty=1.0)])
    assert torch.equal(logits, before)


def test_greedy_is_argmax_of_penalised_logits():
    gen = seeded(5)
    logits = torch.randn(6, V, generator=gen)
    states = [state(temperature=0), state(top_k=1, temperature=0.8), state(top_k=1, seed=3, generator=seeded(9)),
              state(random_ids(gen, 20), temperature=0, repetition_penalty=3.0)]
    states.append(state(temperature=0, min_tokens=2, eos=(int(logits[4].argmax()),)))
    states.append(state(temperature=0, presence_penalty=2.0, output=[int(logits[5].argmax())]))
    tokens = [r.token for r in sample(logits, states)]
    rep = RepetitionPenaltyLogitsProcessor(3.0)(torch.tensor([states[3].prompt_ids]), logits[3:4].clone())
    assert tokens[:3] == logits[:3].argmax(-1).tolist()
    assert tokens[3] == int(rep.argmax())
    assert tokens[4] == int(logits[4].topk(2).indices[1])  # eos masked: the runner-up
    assert tokens[5] == int(logits[5].topk(2).indices[1])


def test_plain_greedy_batch_takes_the_raw_argmax_without_processing(monkeypatch):
    """A batch of plain greedy rows (no penalty, min_tokens met) skips the logits' processing: the same tokens and
    log-probabilities as the processed path, ties going to the first index both ways."""
    import hf_paged.engine.sampler as sampler

    gen = seeded(6)
    logits = tied_logits(4)
    logits[1] = torch.randn(V, generator=gen)
    states = [state(temperature=0), state(temperature=0, min_tokens=1, output=[4]), state(temperature=0),
              state(temperature=0, logprobs=2)]
    fast = sample(logits, states)
    processed = []
    monkeypatch.setattr(sampler, "process_logits", lambda *a: processed.append(1) or process_logits(*a))
    sample(logits, states)
    assert not processed  # the fast path ran
    monkeypatch.setattr(sampler, "_plain_greedy", lambda s: False)
    slow = sample(logits, states)
    assert processed and [(r.token, r.logprob, r.top_logprobs) for r in fast] == [
        (r.token, r.logprob, r.top_logprobs) for r in slow]
    assert [r.token for r in fast] == logits.argmax(-1).tolist()


def test_seeded_row_is_independent_of_batch_composition():
    logits = tied_logits(1, vocab=200, seed=6)[0] / 3  # flat enough that draws vary
    target = dict(temperature=0.9, top_p=0.95)

    def run(build_batch, steps=8):
        gen, tokens = seeded(1234), []
        for _ in range(steps):
            rows, states, at = build_batch(gen)
            tokens.append(sample(torch.stack(rows), states)[at].token)
        return tokens

    alone = run(lambda g: ([logits], [state(generator=g, **target)], 0))
    other = tied_logits(5, vocab=200, seed=7)

    def crowded(g):
        states = [state(temperature=1.0), state(generator=seeded(99), top_k=5), state(generator=g, **target),
                  state(temperature=0), state(temperature=0.5, min_p=0.1), state(generator=seeded(7))]
        return [other[0], other[1], logits, other[2], other[3], other[4]], states, 2

    assert run(crowded) == alone
    assert len(set(alone)) > 1  # the draws are random, not constant
    assert run(lambda g: ([logits], [state(generator=seeded(4321), **target)], 0)) != alone


def chi_square(counts, probs):
    expected = probs * counts.sum()
    keep = expected > 0
    assert counts[~keep].sum() == 0, "a token with probability 0 was drawn"
    return float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())


# chi-square critical values at p = 1e-4 for df = 1..7, so that a correct sampler fails 1 run in 10,000
CHI2_CRIT = {1: 15.1, 2: 18.4, 3: 21.1, 4: 23.5, 5: 25.7, 6: 27.9, 7: 29.9}


@pytest.mark.parametrize("params", [dict(temperature=0.7), dict(temperature=1.3, top_k=4),
                                    dict(temperature=1.0, top_p=0.8), dict(temperature=0.9, min_p=0.15)])
@pytest.mark.parametrize("seeded_rows", [False, True])
def test_empirical_distribution_matches_softmax(params, seeded_rows):
    torch.manual_seed(0)
    logits = torch.tensor([1.0, 0.2, -0.5, 2.0, 0.0, -1.5, 1.2, 0.4])
    n = 4000 if seeded_rows else 20000
    states = [state(generator=seeded(i) if seeded_rows else None, **params) for i in range(n)]
    tokens = torch.tensor([r.token for r in sample(logits.expand(n, -1), states)])
    counts = torch.bincount(tokens, minlength=len(logits)).float()
    probs = hf_chain(logits[None], SamplingParams(**params))[0].softmax(-1)
    df = int((probs > 0).sum()) - 1
    assert chi_square(counts, probs) < CHI2_CRIT[df]


def test_logprobs_are_raw_log_softmax():
    gen = seeded(8)
    logits = (torch.randn(4, V, generator=gen) * 2).to(torch.float16)
    states = [state(random_ids(gen, 5), temperature=0.5, top_k=3, repetition_penalty=1.7, logprobs=5),
              state(temperature=0, logprobs=0), state(logprobs=None, top_p=0.3),
              state(temperature=2.0, logprobs=V + 7)]
    results = sample(logits, states)
    raw = torch.log_softmax(logits.float(), dim=-1)
    for i, r in enumerate(results):
        assert r.logprob == pytest.approx(float(raw[i, r.token]), abs=1e-6)
    top = raw[0].topk(5)
    assert list(results[0].top_logprobs)[0] == results[0].token
    assert set(results[0].top_logprobs) == {results[0].token, *top.indices.tolist()}
    for token, lp in results[0].top_logprobs.items():
        assert lp == pytest.approx(float(raw[0, token]), abs=1e-6)
    assert results[1].top_logprobs == {results[1].token: results[1].logprob}
    assert results[2].top_logprobs is None
    assert len(results[3].top_logprobs) == V


def test_beam_candidates_are_top_log_softmax_in_float32():
    logits = torch.randn(3, V, generator=seeded(10)).to(torch.bfloat16)
    values, tokens = beam_candidates(logits, 4)
    want = torch.log_softmax(logits.float(), dim=-1).topk(4)
    assert values.dtype == torch.float32 and tokens.shape == (3, 4)
    torch.testing.assert_close(values, want.values)
    assert torch.equal(tokens, want.indices)
    assert beam_candidates(logits, 2 * V)[1].shape == (3, V)


@pytest.mark.cuda
def test_cuda_logits_with_cuda_and_cpu_generators():
    logits = tied_logits(3, vocab=300, seed=11)
    on_gpu = logits.cuda().to(torch.bfloat16)

    def draws(make_gen, crowd):
        gen = make_gen()
        states = [state(temperature=0.8), state(generator=gen, top_k=40, repetition_penalty=1.2, output=[3, 4]),
                  state(temperature=0)]
        rows = [0, 1, 2] if crowd else [1]
        return [sample(on_gpu[rows], [states[r] for r in rows])[rows.index(1)].token for _ in range(6)]

    for make_gen in (lambda: torch.Generator("cuda").manual_seed(5), lambda: seeded(5)):
        assert draws(make_gen, crowd=True) == draws(make_gen, crowd=False)
    greedy = sample(on_gpu, [state(temperature=0)] * 3)
    assert [r.token for r in greedy] == logits.to(torch.bfloat16).float().argmax(-1).tolist()
