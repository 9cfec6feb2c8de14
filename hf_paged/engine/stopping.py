"""When a sequence stops: EOS, a stop token id, a stop string, `max_tokens` or the model's length.

The engine calls `check_stop` after appending each sampled token; vLLM's rules: EOS and stop ids count only once
`min_tokens` are out (EOS not at all with `ignore_eos`); a stop string ends the text where it starts, or after it
with `include_stop_str_in_output`; `max_tokens` and `max_model_len` end it with reason "length".
"""

from __future__ import annotations

from hf_paged.engine.request import Sequence, SequenceStatus


def check_stop(seq: Sequence, token: int, eos_token_ids: tuple[int, ...], tokenizer, max_model_len: int) -> bool:
    """Whether `token`, just appended to `seq.output_ids`, ends it; sets its status, stop_reason and finish_reason
    (and, for a stop string, its text)."""
    params = seq.params
    if len(seq.output_ids) >= params.min_tokens:
        if token in eos_token_ids and not params.ignore_eos:
            seq.status = SequenceStatus.FINISHED_STOPPED
        elif token in params.stop_token_ids:
            seq.status, seq.stop_reason = SequenceStatus.FINISHED_STOPPED, token
        elif params.stop and tokenizer is not None:
            text = tokenizer.decode(seq.output_ids, skip_special_tokens=params.skip_special_tokens)
            for stop in params.stop:
                at = text.find(stop)
                if at >= 0:
                    seq.status, seq.stop_reason = SequenceStatus.FINISHED_STOPPED, stop
                    seq.text = text[: at + (len(stop) if params.include_stop_str_in_output else 0)]
                    break
    if not seq.status.finished and (
        len(seq.output_ids) >= params.max_tokens or len(seq.prompt_ids) + len(seq.output_ids) >= max_model_len
    ):
        seq.status = SequenceStatus.FINISHED_LENGTH
    if seq.status.finished:
        seq.finish_reason = seq.status.value
    return seq.status.finished


def eos_token_ids(model, tokenizer) -> tuple[int, ...]:
    """The model's EOS ids (its generation config's, else the tokenizer's)."""
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None and tokenizer is not None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)
