"""Beam search bookkeeping for one request, step for step the algorithm of transformers' `_beam_search`.

The engine runs the beams as sequences whose block tables are forks of each other; this class only decides,
from each step's log-probabilities, which parent beam every new beam continues and with which token, and which
hypotheses are finished. Keeping HF's exact rules (top 2*W candidates, finished hypotheses only from the top W,
the length-penalised early-stop heuristic) makes `LLM.beam_search` return the beams `generate(num_beams=W)` does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hf_paged.engine.params import BeamSearchParams

NEG = -1.0e9


@dataclass(slots=True)
class BeamHypothesis:
    token_ids: list[int]  # generated tokens only
    score: float  # length-penalised sum of log-probs


class BeamState:
    def __init__(self, params: BeamSearchParams, prompt_len: int, eos_token_ids: tuple[int, ...]):
        self.params = params
        self.width = params.beam_width
        self.prompt_len = prompt_len
        self.cur_len = prompt_len
        self.max_length = prompt_len + params.max_tokens
        self.eos = () if params.ignore_eos else tuple(eos_token_ids)
        self.keep = max(2, 1 + len(self.eos)) * self.width
        self.running: list[list[int]] = [[] for _ in range(self.width)]
        self.running_scores = torch.full((self.width,), NEG)
        self.running_scores[0] = 0.0
        self.finished: list[list[int]] = [[] for _ in range(self.width)]
        self.finished_scores = torch.full((self.width,), NEG)
        self.is_finished = torch.zeros(self.width, dtype=torch.bool)
        self.improvable = True
        self.done = False

    def step(self, logits: torch.Tensor) -> list[int]:
        """Advance one token. `logits`: [num_running, V] (1 row on the first step, the beams after).

        Returns, for each new running beam, the index of the row (beam) it continues; its new token is the last of
        `self.running[k]`. Sets `self.done` when the search is over.
        """
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        if log_probs.shape[0] == 1 and self.width > 1:
            log_probs = log_probs.expand(self.width, -1)  # the W rows generate starts from are copies
        vocab = log_probs.shape[-1]
        acc = (log_probs + self.running_scores[:, None]).reshape(-1)  # (W * V,)
        top_scores, top_index = torch.topk(acc, k=min(self.keep, acc.numel()))
        parents = (top_index // vocab).tolist()
        tokens = (top_index % vocab).tolist()
        candidates = [self.running[p] + [t] for p, t in zip(parents, tokens)]
        at_max = self.cur_len + 1 >= self.max_length
        hits = torch.tensor([at_max or t in self.eos for t in tokens])

        # Running beams for the next step: the best candidates that did not stop.
        running_scores = top_scores + hits.float() * NEG
        next_index = torch.topk(running_scores, k=self.width).indices.tolist()
        new_parents = [parents[i] for i in next_index]
        self.running = [candidates[i] for i in next_index]
        self.running_scores = running_scores[next_index]

        # Finished hypotheses: only candidates ranked in the top W may enter, with the length penalty applied.
        in_top = torch.arange(len(tokens)) < self.width
        just_finished = hits & in_top
        scores = top_scores / ((self.cur_len + 1 - self.prompt_len) ** self.params.length_penalty)
        if bool(self.is_finished.all()) and self.params.early_stopping is True:
            scores = scores + NEG
        if not self.improvable:
            scores = scores + NEG
        scores = scores + (~just_finished).float() * NEG
        merged_scores = torch.cat([self.finished_scores, scores])
        merged = self.finished + candidates
        merged_done = torch.cat([self.is_finished, just_finished])
        best = torch.topk(merged_scores, k=self.width).indices.tolist()
        self.finished = [merged[i] for i in best]
        self.finished_scores = merged_scores[best]
        self.is_finished = merged_done[best]

        self.cur_len += 1
        self._update_stop(bool(hits.all()))
        return new_parents

    def _update_stop(self, all_hit: bool) -> None:
        lp = self.params.length_penalty
        if self.params.early_stopping == "never" and lp > 0.0:
            best_len = self.max_length - self.prompt_len
        else:
            best_len = self.cur_len - self.prompt_len
        best_possible = float(self.running_scores[0]) / (best_len**lp)
        worst = torch.where(self.is_finished, self.finished_scores.min(), torch.tensor(NEG))
        self.improvable = self.improvable and bool((best_possible > worst).any())
        open_beam = not (bool(self.is_finished.all()) and self.params.early_stopping is True)
        self.done = not (self.improvable and open_beam and not all_hit)

    def results(self) -> list[BeamHypothesis]:
        """The finished beams, best first (HF's `sequences` with num_return_sequences = beam_width)."""
        return [BeamHypothesis(tokens, float(score)) for tokens, score in zip(self.finished, self.finished_scores)]
