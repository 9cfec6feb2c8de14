"""Requests and sequences: the engine's state, as plain dataclasses with an Enum status."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from hf_paged.blocks import BlockTable
from hf_paged.engine.params import BeamSearchParams, SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    finished: bool  # set on each member below: read for every sequence at every step, so a plain attribute


for _status in SequenceStatus:
    _status.finished = _status.name.startswith("FINISHED_")


@dataclass(slots=True, eq=False)
class Sequence:
    """One stream of tokens with its own block table (a request has n of them, or beam_width)."""

    seq_id: int
    request_id: str
    index: int  # which of the request's outputs this is
    prompt_ids: list[int]
    params: SamplingParams
    arrival: float
    output_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    table: BlockTable | None = None
    num_computed_tokens: int = 0
    generator: torch.Generator | None = None
    cumulative_logprob: float = 0.0
    logprobs: list[dict[int, float]] | None = None
    text: str = ""
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    num_preemptions: int = 0
    # Number of prompt tokens found in the prefix cache at admission.
    num_cached_tokens: int = 0
    extra_keys: tuple = ()  # prefix-cache key parts beyond the tokens (e.g. a LoRA adapter)
    adapter: str | None = None  # the PEFT adapter this sequence runs with (None: the model's active one)
    swapped: BlockTable | None = None  # its KV while preempted by swapping: a table in the CPU pool
    max_len: int = 1 << 62  # the model's max_model_len: the sequence stops there
    # Overlapped scheduling: a token sampled by the step in flight, not read back yet. It counts in num_tokens (so
    # the scheduler can plan its decode) but not in token_ids; the runner takes it from row `pending_row` of that
    # step's device tokens.
    num_pending: int = 0
    pending_row: int = 0

    @property
    def token_ids(self) -> list[int]:
        """The tokens known on the host (a pending token is not among them)."""
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids) + self.num_pending

    @property
    def stops_at_pending(self) -> bool:
        """Its pending token is its last (max_tokens or max_len reached): nothing more to schedule."""
        return self.num_pending > 0 and (
            len(self.output_ids) + self.num_pending >= self.params.max_tokens or self.num_tokens >= self.max_len
        )

    @property
    def num_uncomputed(self) -> int:
        return self.num_tokens - self.num_computed_tokens


@dataclass(slots=True)
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, float]] | None
    finish_reason: str | None = None
    stop_reason: str | int | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True)
class RequestOutput:
    """What the engine hands back for a request (vLLM's shape)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0


@dataclass(slots=True, eq=False)
class Request:
    """A user's request: a prompt and its parameters; its sequences appear once the prompt is prefilled."""

    request_id: str
    prompt: str | None
    prompt_ids: list[int]
    params: SamplingParams | BeamSearchParams
    arrival: float = field(default_factory=time.monotonic)
    sequences: list[Sequence] = field(default_factory=list)
    extra_keys: tuple = ()  # prefix-cache key parts beyond the tokens (e.g. a LoRA adapter)
    adapter: str | None = None
    beam: object | None = None  # BeamState for beam search requests

    @property
    def finished(self) -> bool:
        return bool(self.sequences) and all(s.status.finished for s in self.sequences)


def request_output(request: Request, tokenizer=None) -> RequestOutput:
    """The request's outputs so far (its beams, best first, once a beam search is done), detokenized."""

    def decode(ids: list[int], skip_special_tokens: bool = True) -> str:
        return tokenizer.decode(ids, skip_special_tokens=skip_special_tokens) if tokenizer is not None else ""

    if request.beam is not None and request.finished:
        outputs = [CompletionOutput(i, decode(h.token_ids), h.token_ids, h.score, None, "length")
                   for i, h in enumerate(request.beam.results())]
    else:
        outputs = []
        for seq in sorted(request.sequences, key=lambda s: s.index):
            stopped_on_text = isinstance(seq.stop_reason, str)
            text = seq.text if stopped_on_text else decode(seq.output_ids, seq.params.skip_special_tokens)
            outputs.append(CompletionOutput(seq.index, text, list(seq.output_ids), seq.cumulative_logprob,
                                            seq.logprobs, seq.finish_reason, seq.stop_reason))
    cached = max((s.num_cached_tokens for s in request.sequences), default=0)
    return RequestOutput(request.request_id, request.prompt, request.prompt_ids, outputs, request.finished, cached)
