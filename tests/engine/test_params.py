"""SamplingParams / BeamSearchParams: vLLM's defaults, normalisation, and validation of every field."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_paged.engine.params import BeamSearchParams, SamplingParams

# vLLM's SamplingParams defaults for the fields we carry.
VLLM_DEFAULTS = dict(n=1, temperature=1.0, top_p=1.0, top_k=0, min_p=0.0, repetition_penalty=1.0,
                     presence_penalty=0.0, frequency_penalty=0.0, max_tokens=16, min_tokens=0, stop=[],
                     stop_token_ids=[], ignore_eos=False, seed=None, logprobs=None,
                     include_stop_str_in_output=False, skip_special_tokens=True)

finite = dict(allow_nan=False, allow_infinity=False)
VALID = dict(
    n=st.integers(1, 64),
    temperature=st.floats(0.0, 100.0, **finite),
    top_p=st.floats(0.0, 1.0, exclude_min=True, **finite),
    top_k=st.integers(-1, 10**6),
    min_p=st.floats(0.0, 1.0, **finite),
    repetition_penalty=st.floats(0.0, 10.0, exclude_min=True, **finite),
    presence_penalty=st.floats(-2.0, 2.0, **finite),
    frequency_penalty=st.floats(-2.0, 2.0, **finite),
    stop=st.one_of(st.text(min_size=1), st.lists(st.text(min_size=1), max_size=3)),
    stop_token_ids=st.lists(st.integers(0, 10**6), max_size=4),
    ignore_eos=st.booleans(),
    seed=st.one_of(st.none(), st.integers(-(2**63), 2**63 - 1)),
    logprobs=st.one_of(st.none(), st.integers(0, 20)),
    include_stop_str_in_output=st.booleans(),
    skip_special_tokens=st.booleans(),
)
not_number = st.one_of(st.text(max_size=3), st.none(), st.booleans(), st.lists(st.integers(), max_size=1))
not_int = st.one_of(not_number, st.floats(**finite))
INVALID = dict(
    n=st.one_of(st.integers(max_value=0), not_int),
    temperature=st.one_of(st.floats(max_value=-1e-9, **finite), st.just(math.nan), st.just(math.inf), not_number),
    top_p=st.one_of(st.floats(max_value=0.0, **finite), st.floats(min_value=1.0, exclude_min=True, **finite),
                    st.just(math.nan), not_number),
    top_k=st.one_of(st.integers(max_value=-2), not_int),
    min_p=st.one_of(st.floats(max_value=-1e-9, **finite), st.floats(min_value=1.0, exclude_min=True, **finite),
                    not_number),
    repetition_penalty=st.one_of(st.floats(max_value=0.0, **finite), st.just(math.inf), not_number),
    presence_penalty=st.one_of(st.floats(min_value=2.0, exclude_min=True, **finite),
                               st.floats(max_value=-2.0, exclude_max=True, **finite), not_number),
    frequency_penalty=st.one_of(st.floats(min_value=2.0, exclude_min=True, **finite),
                                st.floats(max_value=-2.0, exclude_max=True, **finite), not_number),
    max_tokens=st.one_of(st.integers(max_value=0), not_int, st.just("5")),
    min_tokens=st.one_of(st.integers(max_value=-1), not_int),
    stop=st.one_of(st.just(""), st.just(["ok", ""]), st.integers(), st.lists(st.integers(), min_size=1, max_size=2)),
    stop_token_ids=st.one_of(st.integers(), st.lists(st.integers(max_value=-1), min_size=1, max_size=2),
                             st.just(["3"]), st.just([True])),
    ignore_eos=st.one_of(st.integers(), st.text(max_size=2), st.none()),
    seed=st.one_of(st.integers(min_value=2**63), st.integers(max_value=-(2**63) - 1), st.floats(**finite),
                   st.text(max_size=2), st.booleans()),
    logprobs=st.one_of(st.integers(max_value=-1), not_int.filter(lambda v: v is not None)),
    include_stop_str_in_output=st.one_of(st.integers(), st.none()),
    skip_special_tokens=st.one_of(st.integers(), st.none()),
)


def test_defaults_are_vllm_defaults():
    params = SamplingParams()
    assert {name: getattr(params, name) for name in VLLM_DEFAULTS} == VLLM_DEFAULTS
    assert not params.greedy


def test_normalisation_and_greedy():
    assert SamplingParams(stop="\n").stop == ["\n"]
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]
    assert SamplingParams(top_k=-1).top_k == 0
    assert SamplingParams(temperature=0).greedy and isinstance(SamplingParams(temperature=0).temperature, float)
    assert SamplingParams(top_k=1, temperature=0.7).greedy
    assert not SamplingParams(temperature=1e-3, top_k=2).greedy
    assert SamplingParams(stop_token_ids=(3, 4)).stop_token_ids == [3, 4]


@settings(max_examples=150, deadline=None)
@given(st.fixed_dictionaries({}, optional=VALID), st.integers(1, 4096), st.data())
def test_valid_values_are_accepted(kwargs, max_tokens, data):
    min_tokens = data.draw(st.integers(0, max_tokens))
    params = SamplingParams(max_tokens=max_tokens, min_tokens=min_tokens, **kwargs)
    for name, value in kwargs.items():
        got = getattr(params, name)
        if name == "stop" and isinstance(value, str):
            assert got == [value]
        elif name == "top_k" and value == -1:
            assert got == 0
        else:
            assert got == (list(value) if isinstance(value, tuple) else value), name
    assert params.max_tokens == max_tokens and params.min_tokens == min_tokens


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(sorted(INVALID)), st.data())
def test_invalid_values_are_rejected_naming_the_field(name, data):
    value = data.draw(INVALID[name], label=name)
    with pytest.raises((ValueError, TypeError)) as info:
        SamplingParams(**{name: value})
    assert name in str(info.value)


def test_max_tokens_as_string_is_a_type_error():
    with pytest.raises(TypeError, match="max_tokens"):
        SamplingParams(max_tokens="5")


@pytest.mark.parametrize("min_tokens, max_tokens", [(5, 4), (17, 16)])
def test_min_tokens_above_max_tokens_is_rejected(min_tokens, max_tokens):
    with pytest.raises(ValueError, match=rf"min_tokens \({min_tokens}\) must be <= max_tokens \({max_tokens}\)"):
        SamplingParams(min_tokens=min_tokens, max_tokens=max_tokens)


def test_message_names_field_and_value():
    with pytest.raises(ValueError, match=r"top_p must be in \(0.0, 1.0\], got 1.5"):
        SamplingParams(top_p=1.5)
    with pytest.raises(ValueError, match="n must be >= 1, got 0"):
        SamplingParams(n=0)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 16), st.integers(1, 512), st.floats(-5, 5, **finite), st.booleans(),
       st.sampled_from([True, False, "never"]))
def test_beam_search_params_valid(width, max_tokens, length_penalty, ignore_eos, early_stopping):
    params = BeamSearchParams(width, max_tokens, length_penalty, ignore_eos, early_stopping)
    assert (params.beam_width, params.max_tokens, params.length_penalty, params.ignore_eos,
            params.early_stopping) == (width, max_tokens, length_penalty, ignore_eos, early_stopping)


@pytest.mark.parametrize("kwargs, field", [
    (dict(beam_width=0), "beam_width"), (dict(beam_width=2.0), "beam_width"), (dict(beam_width=True), "beam_width"),
    (dict(max_tokens=0), "max_tokens"), (dict(max_tokens="8"), "max_tokens"),
    (dict(length_penalty=math.nan), "length_penalty"), (dict(length_penalty="1"), "length_penalty"),
    (dict(ignore_eos=1), "ignore_eos"), (dict(early_stopping="always"), "early_stopping"),
    (dict(early_stopping=1), "early_stopping"),
])
def test_beam_search_params_invalid(kwargs, field):
    with pytest.raises((ValueError, TypeError), match=field):
        BeamSearchParams(**{"beam_width": 2, "max_tokens": 8, **kwargs})
