"""Turn the next-token logits of many sequences into tokens, vLLM's order of processing with HF's semantics.

Per step, for every sequence (row) of the batch:
  1. repetition penalty over prompt + output tokens (HF's `RepetitionPenaltyLogitsProcessor`),
  2. presence and frequency penalties over output tokens (OpenAI / vLLM),
  3. min_tokens: EOS and stop token ids masked while the output is shorter than `min_tokens`,
  4. greedy rows: argmax; the others: temperature, top-k, top-p, min-p (HF's warpers, in HF's order), then a
     draw from the softmax with the row's own generator.
The returned log-probabilities are those of the raw logits, before any of the above (as vLLM returns them).

Every step is applied to all rows at once with per-row parameter tensors, and skipped when no row uses it.
NOTE: a seeded row draws its randomness only from its own generator, so its token does not depend on which
other rows share the batch; rows without a generator share the global RNG of the logits' device.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from hf_paged.engine.params import SamplingParams
from hf_paged.transfer import to_device, to_host

NEG_INF = float("-inf")


@dataclass(slots=True)
class SamplingState:
    """What the sampler needs to know of one sequence for one step."""

    params: SamplingParams
    prompt_ids: list[int]
    output_ids: list[int]
    generator: torch.Generator | None
    eos_token_ids: tuple[int, ...] = ()


@dataclass(slots=True)
class SampleResult:
    token: int
    logprob: float  # log_softmax of the raw logits at `token`
    top_logprobs: dict[int, float] | None  # the chosen token first, then the top `params.logprobs` raw tokens


def _token_counts(id_lists: list[list[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """How often each token occurs in each list. Returns (len(id_lists), vocab) float32."""
    counts = torch.zeros(len(id_lists), vocab, device=device)
    lengths = torch.tensor([len(ids) for ids in id_lists])
    if int(lengths.sum()) == 0:
        return counts
    rows = to_device(torch.arange(len(id_lists)).repeat_interleave(lengths).numpy(), torch.long, device)  # (N,)
    ids = to_device(list(itertools.chain.from_iterable(id_lists)), torch.long, device)  # (N,)
    return counts.index_put_((rows, ids), torch.ones(len(ids), device=device), accumulate=True)


def _column(values: list[float], device: torch.device) -> torch.Tensor:
    return to_device(values, torch.float32, device)[:, None]  # (R, 1)


def _index(logits: torch.Tensor, rows: list[int]) -> slice | torch.Tensor:
    """Index of `rows`: a slice when they are all the rows (so `logits[index]` is a view, edited in place)."""
    return slice(None) if len(rows) == logits.shape[0] else to_device(rows, torch.long, logits.device)


def _is_copy(index: slice | torch.Tensor) -> bool:
    """Whether `logits[index]` is a copy that must be written back."""
    return isinstance(index, torch.Tensor)


def apply_penalties(logits: torch.Tensor, states: list[SamplingState]) -> torch.Tensor:
    """Repetition, then presence and frequency penalties, in place on float32 `logits` (S, V)."""
    vocab = logits.shape[-1]
    rep = [i for i, s in enumerate(states) if s.params.repetition_penalty != 1.0]
    if rep:
        index = _index(logits, rep)
        sub = logits[index]  # (R, V)
        seen = _token_counts([states[i].prompt_ids + states[i].output_ids for i in rep], vocab, logits.device) > 0
        penalty = _column([states[i].params.repetition_penalty for i in rep], logits.device)
        penalised = torch.where(sub < 0, sub * penalty, sub / penalty)
        logits[index] = torch.where(seen, penalised, sub)
    pf = [i for i, s in enumerate(states) if s.params.presence_penalty != 0.0 or s.params.frequency_penalty != 0.0]
    if pf:
        index = _index(logits, pf)
        sub = logits[index]  # (R, V)
        counts = _token_counts([states[i].output_ids for i in pf], vocab, logits.device)
        sub -= _column([states[i].params.frequency_penalty for i in pf], logits.device) * counts
        sub -= _column([states[i].params.presence_penalty for i in pf], logits.device) * (counts > 0)
        if _is_copy(index):
            logits[index] = sub
    return logits


def apply_min_tokens(logits: torch.Tensor, states: list[SamplingState]) -> torch.Tensor:
    """Mask stop token ids (and EOS unless ignore_eos) of rows that have not reached min_tokens, in place."""
    vocab = logits.shape[-1]
    rows, cols = [], []
    for i, s in enumerate(states):
        if len(s.output_ids) < s.params.min_tokens:
            stops = s.params.stop_token_ids + ([] if s.params.ignore_eos else list(s.eos_token_ids))
            stops = [t for t in set(stops) if 0 <= t < vocab]  # an id outside the vocabulary cannot be drawn
            rows += [i] * len(stops)
            cols += stops
    if rows:
        logits[to_device(rows, torch.long, logits.device), to_device(cols, torch.long, logits.device)] = NEG_INF
    return logits


def apply_temperature(logits: torch.Tensor, temperature: list[float]) -> torch.Tensor:
    """HF's TemperatureLogitsWarper per row (every temperature > 0), in place."""
    if any(t != 1.0 for t in temperature):
        logits /= _column(temperature, logits.device)
    return logits


def apply_top_k(logits: torch.Tensor, top_k: list[int]) -> torch.Tensor:
    """HF's TopKLogitsWarper per row (0 = off): drop logits below the row's k-th largest (ties kept), in place."""
    vocab = logits.shape[-1]
    k = [0 if kk >= vocab else kk for kk in top_k]
    if not any(k):
        return logits
    largest = logits.topk(max(k), dim=-1).values  # (S, max_k)
    kth = largest.gather(1, to_device([max(kk - 1, 0) for kk in k], torch.long, logits.device)[:, None])  # (S, 1)
    kth.masked_fill_(to_device(k, torch.long, logits.device)[:, None] == 0, NEG_INF)
    return logits.masked_fill_(logits < kth, NEG_INF)


def apply_top_p(logits: torch.Tensor, top_p: list[float]) -> torch.Tensor:
    """HF's TopPLogitsWarper per row (1 = off): keep the most likely tokens reaching top_p mass, in place."""
    if all(p >= 1.0 for p in top_p):
        return logits
    sorted_logits, sorted_index = logits.sort(dim=-1)  # ascending, (S, V)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove = cumulative <= _column([1.0 - p for p in top_p], logits.device)
    remove[:, -1] = False  # always keep the most likely token
    return logits.masked_fill_(remove.scatter(1, sorted_index, remove), NEG_INF)


def apply_min_p(logits: torch.Tensor, min_p: list[float]) -> torch.Tensor:
    """HF's MinPLogitsWarper per row (0 = off): drop tokens less likely than min_p x the top one, in place."""
    if not any(min_p):
        return logits
    probs = logits.softmax(dim=-1)  # (S, V)
    threshold = _column(min_p, logits.device) * probs.amax(dim=-1, keepdim=True)  # (S, 1); the top token stays
    return logits.masked_fill_(probs < threshold, NEG_INF)


def process_logits(logits: torch.Tensor, states: list[SamplingState]) -> torch.Tensor:
    """The float32 logits each row is drawn from: penalties and min_tokens for all rows, the warpers for the
    non-greedy rows (greedy rows take the argmax). `logits` (S, V) is left untouched.
    """
    assert logits.dim() == 2 and logits.shape[0] == len(states), (tuple(logits.shape), len(states))
    out = logits.to(torch.float32, copy=True)  # (S, V)
    apply_min_tokens(apply_penalties(out, states), states)
    rows = [i for i, s in enumerate(states) if not s.params.greedy]
    if rows:
        index = _index(out, rows)
        sub = out[index]  # (R, V)
        params = [states[i].params for i in rows]
        apply_temperature(sub, [p.temperature for p in params])
        apply_top_k(sub, [p.top_k for p in params])
        apply_top_p(sub, [p.top_p for p in params])
        apply_min_p(sub, [p.min_p for p in params])
        if _is_copy(index):
            out[index] = sub
    return out


def _draw(probs: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
    """One token per row of `probs` (R, V), by the exponential race: argmax(p / E) with E ~ Exp(1) i.i.d. picks
    token i with probability p_i. Seeded rows draw their E from their own generator only."""
    vocab = probs.shape[-1]
    noise = torch.empty_like(probs)  # (R, V)
    unseeded = [i for i, g in enumerate(generators) if g is None]
    if len(unseeded) == len(generators):
        noise.exponential_()
    elif unseeded:
        noise[to_device(unseeded, torch.long, probs.device)] = torch.empty(
            len(unseeded), vocab, device=probs.device).exponential_()
    for i, g in enumerate(generators):
        if g is not None:
            noise[i] = torch.empty(vocab, device=g.device).exponential_(generator=g).to(probs.device)
    noise.clamp_min_(torch.finfo(torch.float32).tiny)
    return (probs / noise).argmax(dim=-1)


@dataclass(slots=True)
class SampledBatch:
    """A step's chosen tokens, still on their way to the host; `results()` waits for them.

    `tokens` stays on the device: the next step reads its input ids from it without a host round trip.
    """

    tokens: torch.Tensor  # (S,) int64 on the logits' device
    _host: tuple[torch.Tensor, ...]  # (tokens, chosen logprobs[, top values, top ids]), copies in flight
    _event: torch.cuda.Event | None
    _wanted: list[int | None]  # per row, how many top logprobs it asked for

    def results(self) -> list[SampleResult]:
        if self._event is not None:
            self._event.synchronize()
        tokens, chosen = self._host[0].tolist(), self._host[1].tolist()
        if len(self._host) == 2:
            tops = [None if w is None else {} for w in self._wanted]
        else:
            values, index = self._host[2].tolist(), self._host[3].tolist()
            tops = [None if w is None else dict(zip(ids[:w], vals[:w]))
                    for w, ids, vals in zip(self._wanted, index, values)]
        return [SampleResult(t, lp, None if top is None else {t: lp, **top})
                for t, lp, top in zip(tokens, chosen, tops)]


def launch(logits: torch.Tensor, states: list[SamplingState], agree=None) -> SampledBatch:
    """Choose the next token of every row on the logits' device, without waiting for the result.

    Args:
        logits: (S, V) next-token logits, any float dtype, any device.
        states: one SamplingState per row.
        agree: optional in-place hook on the (S,) device tokens before they are read back (tensor parallelism:
            every rank takes rank 0's tokens).
    """
    raw_logprobs = torch.log_softmax(logits.float(), dim=-1)  # (S, V)
    if all(_plain_greedy(s) for s in states):  # the common case: no copy of the logits, one argmax
        tokens = logits.argmax(dim=-1)  # (S,)
    else:
        tokens = _choose(logits, states)
    if agree is not None:
        agree(tokens)
    chosen = raw_logprobs.gather(1, tokens[:, None])[:, 0]  # (S,)
    wanted = [min(s.params.logprobs, raw_logprobs.shape[-1]) if s.params.logprobs is not None else None
              for s in states]
    k = max((w for w in wanted if w is not None), default=0)
    device_parts = [tokens, chosen]
    if k:
        values, index = raw_logprobs.topk(k, dim=-1)  # (S, k)
        device_parts += [values, index]
    host = tuple(to_host(t) for t in device_parts)
    event = None
    if logits.is_cuda:
        event = torch.cuda.Event()
        event.record()
    return SampledBatch(tokens, host, event, wanted)


def _plain_greedy(state: SamplingState) -> bool:
    """Greedy, and nothing of steps 1-3 applies: the token is the raw logits' argmax."""
    params = state.params
    return params.greedy and not params.penalized and len(state.output_ids) >= params.min_tokens


def _choose(logits: torch.Tensor, states: list[SamplingState]) -> torch.Tensor:
    """Each row's token after steps 1-4 (module docstring). Returns (S,) int64 on the logits' device."""
    processed = process_logits(logits, states)  # (S, V) float32
    tokens = torch.empty(len(states), dtype=torch.long, device=logits.device)
    greedy = [i for i, s in enumerate(states) if s.params.greedy]
    if greedy:
        index = _index(processed, greedy)
        tokens[index] = processed[index].argmax(dim=-1)
    rows = [i for i, s in enumerate(states) if not s.params.greedy]
    if rows:
        index = _index(processed, rows)
        probs = processed[index].softmax(dim=-1)  # (R, V)
        tokens[index] = _draw(probs, [states[i].generator for i in rows])
    return tokens


def sample(logits: torch.Tensor, states: list[SamplingState]) -> list[SampleResult]:
    """Choose the next token of every row and wait for it (see `launch`). Returns one SampleResult per row."""
    return launch(logits, states).results()


def beam_candidates(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's k most likely next tokens for beam search, in float32.

    Args:
        logits: (S, V) next-token logits of the running beams.
        k: candidates per beam (2 * beam_width holds every candidate of HF's global top 2 * beam_width).
    Returns:
        (log-probabilities (S, k) float32, token ids (S, k) int64), best first.
    """
    log_probs = torch.log_softmax(logits.float(), dim=-1)  # (S, V)
    values, tokens = log_probs.topk(min(k, log_probs.shape[-1]), dim=-1)  # (S, k)
    return values, tokens
