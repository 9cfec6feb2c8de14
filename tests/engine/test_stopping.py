"""check_stop: each stop rule on its own, against the expected status, reason and text."""

import pytest

from hf_paged import SamplingParams
from hf_paged.engine.request import Sequence, SequenceStatus
from hf_paged.engine.stopping import check_stop
from tests.tiny import tiny_tokenizer

EOS = (2,)


def run(tokens, prompt=(5, 6), max_model_len=100, tokenizer=None, **params):
    """Append `tokens` one by one as the engine does; returns the sequence and the step at which it stopped."""
    seq = Sequence(0, "r", 0, list(prompt), SamplingParams(**params), arrival=0.0)
    for step, token in enumerate(tokens, 1):
        seq.output_ids.append(token)
        if check_stop(seq, token, EOS, tokenizer, max_model_len):
            return seq, step
    return seq, None


def test_eos_waits_for_min_tokens_and_is_ignored_on_request():
    seq, step = run([2, 7, 2], max_tokens=10, min_tokens=2)
    assert step == 3 and seq.status is SequenceStatus.FINISHED_STOPPED and seq.finish_reason == "stop"
    assert seq.stop_reason is None  # EOS itself is no stop reason, as in vLLM
    assert run([2, 2, 2], max_tokens=10, ignore_eos=True)[1] is None


def test_stop_token_id_is_the_reason():
    seq, step = run([7, 9, 8], max_tokens=10, stop_token_ids=[9])
    assert step == 2 and seq.stop_reason == 9 and seq.status.finished


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_cuts_the_text(include):
    tok = tiny_tokenizer()
    ids = tok.encode("w7 w8 w9 w10", add_special_tokens=False)
    seq, step = run(ids, tokenizer=tok, max_tokens=10, stop=["w9"], include_stop_str_in_output=include)
    assert step == 3 and seq.stop_reason == "w9"
    assert seq.text == ("w7 w8 w9" if include else "w7 w8 ")


def test_length_limits():
    seq, step = run([7] * 5, max_tokens=3)
    assert step == 3 and seq.status is SequenceStatus.FINISHED_LENGTH and seq.finish_reason == "length"
    seq, step = run([7] * 5, prompt=(5, 6, 7), max_tokens=10, max_model_len=5)
    assert step == 2 and seq.finish_reason == "length"  # prompt 3 + 2 outputs reach the model's length
