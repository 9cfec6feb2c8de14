"""OpenAI response bodies and stream chunks, built from the engine's RequestOutputs.

A response covers one or more prompts of n outputs each; choice `index` is `prompt_index * n + output.index`, as
OpenAI numbers the choices of a batched completion.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass

from hf_paged.engine.request import CompletionOutput, RequestOutput
from hf_paged.server.protocol import APIError

logger = logging.getLogger(__name__)

MIN_LOGPROB = -9999.0  # JSON has no -inf; vLLM clamps the same way
DONE = "data: [DONE]\n\n"


def event(body: dict) -> str:
    return f"data: {json.dumps(body)}\n\n"


def usage(finals: Iterable[RequestOutput]) -> dict:
    finals = list(finals)
    prompt = sum(len(f.prompt_token_ids) for f in finals)
    completion = sum(len(o.token_ids) for f in finals for o in f.outputs)
    return {
        "prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": sum(f.num_cached_tokens for f in finals)},
    }


@dataclass(slots=True)
class _Cursor:
    """How much of one choice a stream has sent."""

    text: int = 0
    tokens: int = 0
    done: bool = False


def _stable_end(text: str, holdback: int) -> int:
    """How much of a running output's text can be sent: not a tail a stop string may still cut, nor a tail of
    U+FFFD (bytes of a character whose other bytes have not been generated yet)."""
    end = len(text) - holdback
    while end > 0 and text[end - 1] == "\ufffd":
        end -= 1
    return end


class Render:
    """Builds one response's JSON; `CompletionRender` and `ChatRender` supply the per-choice shapes."""

    object_full = object_chunk = ""

    def __init__(self, request_id: str, model: str, tokenizer, *, n: int, logprobs: int | None, stop: list[str],
                 include_usage: bool = False, return_token_ids: bool = False):
        self.request_id, self.model, self.tokenizer, self.n = request_id, model, tokenizer, n
        self.logprobs, self.include_usage, self.return_token_ids = logprobs, include_usage, return_token_ids
        self.holdback = max((len(s) for s in stop), default=1) - 1
        self.created = int(time.time())

    def _envelope(self, obj: str, choices: list[dict]) -> dict:
        return {"id": self.request_id, "object": obj, "created": self.created, "model": self.model,
                "choices": choices}

    def full(self, finals: list[RequestOutput]) -> dict:
        """The non-streamed response for the final output of every prompt."""
        choices = []
        for p, final in enumerate(finals):
            for out in final.outputs:
                choice = self._choice(p * self.n + out.index, out.text, out, 0, len(out.token_ids), 0, delta=False)
                if self.return_token_ids:
                    choice["prompt_token_ids"] = final.prompt_token_ids
                choices.append(choice)
        return {**self._envelope(self.object_full, choices), "usage": usage(finals)}

    async def stream(self, first: tuple[int, RequestOutput],
                     rest: AsyncIterator[tuple[int, RequestOutput]]) -> AsyncIterator[str]:
        """SSE events for (prompt index, output) pairs as they come, then usage if asked, then [DONE]."""
        cursors: dict[int, _Cursor] = {}
        finals: dict[int, RequestOutput] = {}
        try:
            for body in self._opening():
                yield event(body)
            item = first
            while item is not None:
                p, output = item
                finals[p] = output
                for out in output.outputs:
                    index = p * self.n + out.index
                    chunk = self._delta(cursors.setdefault(index, _Cursor()), index, out)
                    if chunk is not None:
                        yield event(chunk)
                item = await anext(rest, None)
            if self.include_usage:
                yield event({**self._envelope(self.object_chunk, []), "usage": usage(finals.values())})
        except Exception as exc:  # the engine failed this request after the response had started
            logger.exception("request %s failed while streaming", self.request_id)
            yield event(server_error(exc).body())
        yield DONE

    def _opening(self) -> list[dict]:
        return []

    def _delta(self, cursor: _Cursor, index: int, out: CompletionOutput) -> dict | None:
        if cursor.done:
            return None
        finished = out.finish_reason is not None
        end = len(out.text) if finished else _stable_end(out.text, self.holdback)
        text = out.text[cursor.text : end] if end > cursor.text else ""
        new_tokens = len(out.token_ids) > cursor.tokens and (self.logprobs is not None or self.return_token_ids)
        if not (text or finished or new_tokens):
            return None
        choice = self._choice(index, text, out, cursor.tokens, len(out.token_ids), cursor.text, delta=True)
        cursor.text, cursor.tokens, cursor.done = max(cursor.text, end), len(out.token_ids), finished
        body = self._envelope(self.object_chunk, [choice])
        if self.include_usage:
            body["usage"] = None
        return body

    def _choice(self, index: int, text: str, out: CompletionOutput, start: int, end: int, offset: int,
                delta: bool) -> dict:
        """One choice with `text` and the tokens out.token_ids[start:end] (their logprobs, their ids)."""
        ids = out.token_ids[start:end]
        tops = out.logprobs[start:end] if out.logprobs is not None and self.logprobs is not None else None
        choice = {"index": index, **self._content(text, delta),
                  "logprobs": None if tops is None else self._logprobs(ids, tops, offset),
                  "finish_reason": out.finish_reason, "stop_reason": out.stop_reason}
        if self.return_token_ids:
            choice["token_ids"] = ids
        return choice

    def _token(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def _content(self, text: str, delta: bool) -> dict:
        raise NotImplementedError

    def _logprobs(self, ids: list[int], tops: list[dict[int, float]], offset: int) -> dict:
        raise NotImplementedError


class CompletionRender(Render):
    object_full, object_chunk = "text_completion", "text_completion"

    def _content(self, text, delta):
        return {"text": text}

    def _logprobs(self, ids, tops, offset):
        """OpenAI's legacy logprobs object; `text_offset` counts from the start of the generated text."""
        tokens, token_logprobs, top_logprobs, text_offset = [], [], [], []
        for token_id, top in zip(ids, tops):
            token = self._token(token_id)
            tokens.append(token)
            token_logprobs.append(max(top[token_id], MIN_LOGPROB))
            top_logprobs.append({self._token(t): max(lp, MIN_LOGPROB) for t, lp in top.items()})
            text_offset.append(offset)
            offset += len(token)
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
                "text_offset": text_offset}


class ChatRender(Render):
    object_full, object_chunk = "chat.completion", "chat.completion.chunk"

    def _opening(self):
        """OpenAI's first chunk of every choice carries the role."""
        return [self._envelope(self.object_chunk, [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                    "logprobs": None, "finish_reason": None}])
                for i in range(self.n)]

    def _content(self, text, delta):
        if delta:
            return {"delta": {"content": text} if text else {}}
        return {"message": {"role": "assistant", "content": text}}

    def _logprobs(self, ids, tops, offset):
        def entry(token_id: int, logprob: float) -> dict:
            token = self._token(token_id)
            return {"token": token, "logprob": max(logprob, MIN_LOGPROB), "bytes": list(token.encode())}

        return {"content": [
            {**entry(token_id, top[token_id]),
             "top_logprobs": [entry(t, lp) for t, lp in sorted(top.items(), key=lambda kv: -kv[1])[: self.logprobs]]}
            for token_id, top in zip(ids, tops)
        ]}


def server_error(exc: BaseException, what: str = "the engine failed while running this request") -> APIError:
    return APIError(500, f"{what}: {type(exc).__name__}: {exc}", type="server_error")
