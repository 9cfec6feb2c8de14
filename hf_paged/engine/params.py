"""Per-request generation settings, with vLLM's names and defaults, checked when they are built.

A mistake in a setting raises at construction (`TypeError` for a wrong type, `ValueError` for a value out of
range), naming the field and the value, instead of surfacing steps later inside the sampler.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

# torch.Generator.manual_seed accepts [-2**63, 2**64); the engine adds the output index to the seed.
_SEED_RANGE = (-(2**63), 2**63 - 1)


def _int(name: str, value, low: int | None = None, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    value = int(value)
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be {bounds}, got {value}")
    return value


def _float(name: str, value, low: float, high: float, *, open_low: bool = False, open_high: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    value = float(value)
    ok = not math.isnan(value) and (value > low if open_low else value >= low) and (
        value < high if open_high else value <= high
    )
    if not ok:
        bounds = f"{'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}"
        raise ValueError(f"{name} must be in {bounds}, got {value}")
    return value


def _bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")
    return value


@dataclass(slots=True)
class SamplingParams:
    """How to sample the outputs of one request (vLLM's `SamplingParams`, same names and defaults).

    Args:
        n: number of output sequences for the prompt.
        temperature: divides the logits; 0 means greedy (argmax).
        top_p: keep the smallest set of most likely tokens whose probability reaches `top_p` (1 = off).
        top_k: keep the `top_k` most likely tokens (0 or -1 = off; -1 is stored as 0).
        min_p: drop tokens less likely than `min_p` times the most likely one (0 = off).
        repetition_penalty: HF's penalty over prompt and output tokens (> 1 discourages repeats; 1 = off).
        presence_penalty: subtracted from the logit of every token already in the output.
        frequency_penalty: subtracted once per occurrence of a token in the output.
        max_tokens: most tokens to generate.
        min_tokens: EOS and `stop_token_ids` are masked until this many tokens were generated.
        stop: strings that end the output when generated (a single str is accepted).
        stop_token_ids: token ids that end the output.
        ignore_eos: keep generating after EOS.
        seed: seed of this request's own random generator (reproducible whatever else is batched with it).
        logprobs: return this many top log-probabilities per generated token (0 = only the chosen token's).
        include_stop_str_in_output: keep the matched stop string in the output text.
        skip_special_tokens: drop special tokens when decoding the output text.

    Example:
        >>> SamplingParams(temperature=0.8, top_p=0.95, max_tokens=64, stop="\\n")
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    max_tokens: int = 16
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    seed: int | None = None
    logprobs: int | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        self.n = _int("n", self.n, 1)
        self.temperature = _float("temperature", self.temperature, 0.0, math.inf, open_high=True)
        self.top_p = _float("top_p", self.top_p, 0.0, 1.0, open_low=True)
        self.top_k = _int("top_k", self.top_k, -1)
        if self.top_k == -1:
            self.top_k = 0
        self.min_p = _float("min_p", self.min_p, 0.0, 1.0)
        self.repetition_penalty = _float("repetition_penalty", self.repetition_penalty, 0.0, math.inf,
                                         open_low=True, open_high=True)
        self.presence_penalty = _float("presence_penalty", self.presence_penalty, -2.0, 2.0)
        self.frequency_penalty = _float("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        self.max_tokens = _int("max_tokens", self.max_tokens, 1)
        self.min_tokens = _int("min_tokens", self.min_tokens, 0)
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})")
        self.stop = self._stop_strings(self.stop)
        self.stop_token_ids = self._stop_ids(self.stop_token_ids)
        self.ignore_eos = _bool("ignore_eos", self.ignore_eos)
        if self.seed is not None:
            self.seed = _int("seed", self.seed, *_SEED_RANGE)
        if self.logprobs is not None:
            self.logprobs = _int("logprobs", self.logprobs, 0)
        self.include_stop_str_in_output = _bool("include_stop_str_in_output", self.include_stop_str_in_output)
        self.skip_special_tokens = _bool("skip_special_tokens", self.skip_special_tokens)

    @staticmethod
    def _stop_strings(stop) -> list[str]:
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, (list, tuple)):
            raise TypeError(f"stop must be a str or a list of str, got {stop!r} ({type(stop).__name__})")
        for s in stop:
            if not isinstance(s, str):
                raise TypeError(f"stop must contain only str, got {s!r} ({type(s).__name__})")
            if not s:
                raise ValueError("stop must not contain an empty string (it would match at once)")
        return list(stop)

    @staticmethod
    def _stop_ids(ids) -> list[int]:
        if not isinstance(ids, (list, tuple)):
            raise TypeError(f"stop_token_ids must be a list of int, got {ids!r} ({type(ids).__name__})")
        return [_int("stop_token_ids[]", i, 0) for i in ids]

    @property
    def greedy(self) -> bool:
        """True when the output is the argmax: temperature 0 or top_k 1."""
        return self.temperature == 0.0 or self.top_k == 1

    @property
    def penalized(self) -> bool:
        """True when a repetition, presence or frequency penalty changes the logits (they need the output tokens)."""
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


@dataclass(slots=True)
class BeamSearchParams:
    """Beam search settings (vLLM's `BeamSearchParams`), scored as transformers' `generate(num_beams=...)`.

    Args:
        beam_width: number of beams kept, and of outputs returned.
        max_tokens: most tokens to generate.
        length_penalty: finished beams are scored sum(logprobs) / length**length_penalty.
        ignore_eos: keep generating after EOS.
        early_stopping: HF's meaning: True stops once `beam_width` hypotheses are finished; False stops when no
            better hypothesis is likely (heuristic); "never" only when none can be better (exact).
    """

    beam_width: int
    max_tokens: int
    length_penalty: float = 1.0
    ignore_eos: bool = False
    early_stopping: bool | str = False

    def __post_init__(self) -> None:
        self.beam_width = _int("beam_width", self.beam_width, 1)
        self.max_tokens = _int("max_tokens", self.max_tokens, 1)
        self.length_penalty = _float("length_penalty", self.length_penalty, -math.inf, math.inf,
                                     open_low=True, open_high=True)
        self.ignore_eos = _bool("ignore_eos", self.ignore_eos)
        if not (isinstance(self.early_stopping, bool) or self.early_stopping == "never"):
            raise ValueError(f'early_stopping must be True, False or "never", got {self.early_stopping!r}')
