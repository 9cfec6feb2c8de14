"""The OpenAI request bodies the server accepts, their checks, and their mapping to `SamplingParams`.

Types are checked strictly by pydantic (`"max_tokens": "5"` is an error, as with OpenAI); values are checked by
`SamplingParams` itself, so the server and the engine share one set of limits and messages. Fields of vLLM's
OpenAI server beyond OpenAI's (top_k, min_p, repetition_penalty, ...) are accepted with vLLM's names; unknown
fields are ignored; known OpenAI features the server does not implement are rejected by name.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from hf_paged.engine.params import SamplingParams

MAX_LOGPROBS = 20  # as vLLM's default max_logprobs
MAX_N = 128  # OpenAI's limit on choices per request
CHAT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class APIError(Exception):
    """A request the server answers with an OpenAI-style error: `{"error": {message, type, param, code}}`."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param)


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    include_usage: bool = False


class _SamplingRequest(BaseModel):
    """The fields completions and chat share."""

    model_config = ConfigDict(strict=True, extra="ignore")

    model: str | None = None
    max_tokens: int | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    stop: Any = None  # str | list[str]; SamplingParams checks it with a clearer message than a pydantic union
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stream: bool = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # vLLM's extra sampling fields.
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    return_token_ids: bool = False

    def check(self) -> None:
        """Reject what the types allow but the server cannot honour."""
        if self.stream_options is not None and not self.stream:
            raise bad_request("stream_options is only allowed with stream=true", "stream_options")
        if self.logit_bias:
            raise bad_request("logit_bias is not supported", "logit_bias")
        if self.n > MAX_N:
            raise bad_request(f"n must be <= {MAX_N}, got {self.n}", "n")

    def sampling_params(self, max_tokens: int, logprobs: int | None) -> SamplingParams:
        """The engine's SamplingParams; a bad value raises APIError 400 naming the field."""
        fields = dict(
            n=self.n, temperature=_or(self.temperature, 1.0), top_p=_or(self.top_p, 1.0), top_k=_or(self.top_k, 0),
            min_p=_or(self.min_p, 0.0), repetition_penalty=_or(self.repetition_penalty, 1.0),
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            max_tokens=max_tokens, min_tokens=self.min_tokens, stop=_or(self.stop, []),
            stop_token_ids=_or(self.stop_token_ids, []), ignore_eos=self.ignore_eos, seed=self.seed,
            logprobs=logprobs, include_stop_str_in_output=self.include_stop_str_in_output,
            skip_special_tokens=self.skip_special_tokens,
        )
        try:
            return SamplingParams(**fields)
        except (TypeError, ValueError) as err:
            # SamplingParams' messages start with the field's name ("top_p must be in (0.0, 1.0], got 1.5").
            name = str(err).split(" ", 1)[0].removesuffix("[]")
            raise bad_request(str(err), name if name in fields else None) from None


class CompletionRequest(_SamplingRequest):
    prompt: Any  # str | list[str] | list[int] | list[list[int]], checked by `prompts()`
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def check(self) -> None:
        super().check()
        if self.echo:
            raise bad_request("echo is not supported", "echo")
        if self.suffix:
            raise bad_request("suffix is not supported", "suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise bad_request(f"best_of is not supported (it must equal n={self.n} or be left out)", "best_of")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise bad_request(f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}", "logprobs")

    def prompts(self) -> list[str | list[int]]:
        """The prompts of the request: one string or token-id list each."""
        prompt = self.prompt
        if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt)):
            prompt = [prompt]
        if not isinstance(prompt, list) or not all(
            isinstance(p, str) or (isinstance(p, list) and all(_is_int(t) for t in p)) for p in prompt
        ):
            raise bad_request("prompt must be a string, a list of strings, a list of token ids or a list of lists "
                              "of token ids", "prompt")
        if not prompt or any(len(p) == 0 for p in prompt):
            raise bad_request("the prompt is empty", "prompt")
        return prompt


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: str
    content: Any = None  # str | list of {"type": "text", "text": str}; None only for assistant turns

    def to_template(self, index: int) -> dict[str, str]:
        """The message as the chat template sees it: {"role", "content": str}."""
        if self.role not in CHAT_ROLES:
            raise bad_request(f"messages[{index}].role must be one of {', '.join(CHAT_ROLES)}, got {self.role!r}",
                              "messages")
        return {"role": CHAT_ROLES[self.role], "content": self._text(index)}

    def _text(self, index: int) -> str:
        content = self.content
        if isinstance(content, str):
            return content
        if content is None and self.role == "assistant":
            return ""
        if isinstance(content, list) and content:
            for part in content:
                if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                    kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                    raise bad_request(f"messages[{index}].content: only text parts are supported, got {kind!r}",
                                      "messages")
            return "\n".join(part["text"] for part in content)
        raise bad_request(f"messages[{index}].content must be a string or a list of text parts", "messages")


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    functions: list[Any] | None = None
    response_format: dict[str, Any] | None = None

    def check(self) -> None:
        super().check()
        if not self.messages:
            raise bad_request("messages must not be empty", "messages")
        if self.tools or self.functions:
            raise bad_request("tools and functions are not supported", "tools")
        if self.response_format is not None and self.response_format.get("type") != "text":
            raise bad_request("response_format other than {\"type\": \"text\"} is not supported", "response_format")
        if self.top_logprobs is not None:
            if not self.logprobs:
                raise bad_request("top_logprobs needs logprobs=true", "top_logprobs")
            if not 0 <= self.top_logprobs <= MAX_LOGPROBS:
                raise bad_request(f"top_logprobs must be in [0, {MAX_LOGPROBS}], got {self.top_logprobs}",
                                  "top_logprobs")

    def template_messages(self) -> list[dict[str, str]]:
        return [m.to_template(i) for i, m in enumerate(self.messages)]

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


def parse(model: type[_SamplingRequest], raw: bytes) -> _SamplingRequest:
    """Validate a JSON body into `model` and run its checks; every problem is an APIError 400."""
    try:
        request = model.model_validate_json(raw)
    except ValidationError as err:
        first = err.errors(include_url=False)[0]
        if first["type"] == "json_invalid":
            raise bad_request(f"the request body is not valid JSON: {first['msg']}") from None
        if not first["loc"]:
            raise bad_request("the request body must be a JSON object") from None
        where = ".".join(str(part) for part in first["loc"])
        raise bad_request(f"{where}: {first['msg']}", str(first["loc"][0])) from None
    request.check()
    return request


def _or(value, default):
    return default if value is None else value


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
