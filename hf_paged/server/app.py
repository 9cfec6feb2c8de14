"""The OpenAI-compatible HTTP server: routes, admission, client disconnects (FastAPI over AsyncLLMEngine).

Every generation request runs as one engine request per prompt. A client that goes away aborts them: a stream's
body iterator is cancelled by Starlette on disconnect, and a non-streamed request races its generation against the
ASGI `http.disconnect` message. Either way the engine stream is closed, which aborts the request and frees its
blocks between two steps.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import jinja2
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from hf_paged.engine.async_engine import AsyncLLMEngine
from hf_paged.engine.engine import LLMEngine, RequestError
from hf_paged.engine.params import SamplingParams
from hf_paged.engine.request import RequestOutput
from hf_paged.server.metrics import make_registry
from hf_paged.server.protocol import APIError, ChatCompletionRequest, CompletionRequest, bad_request, parse
from hf_paged.server.responses import ChatRender, CompletionRender, Render, server_error

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
QUEUE_PER_SEQ = 4  # the default max_queue: this many requests in flight per sequence the engine runs at once
CLIENT_CLOSED = 499  # nginx's "client closed request": never seen by the client, shows in access logs

logger = logging.getLogger(__name__)


class _ClientGone(Exception):
    """The client disconnected before its response was ready."""


class OpenAIServer:
    """The handlers of one app: one engine, one served model name, a bound on requests in flight."""

    def __init__(self, llm_engine: LLMEngine, model_name: str, max_queue: int | None = None, step_sync=None):
        if max_queue is None:  # room for a full running batch and as many again waiting, several times over
            max_queue = QUEUE_PER_SEQ * llm_engine.config.max_num_seqs
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        if llm_engine.tokenizer is None:
            raise ValueError("the server needs an engine with a tokenizer (to encode prompts and decode outputs)")
        self.engine, self.model_name, self.max_queue = llm_engine, model_name, max_queue
        self.front = AsyncLLMEngine(llm_engine, sync=step_sync)
        self.in_flight = 0
        stats = self.front.last_stats
        self.capacity = stats.num_blocks * llm_engine.config.block_size  # tokens the whole KV pool holds
        self.registry = make_registry(lambda: self.front.last_stats, lambda: self.in_flight)

    # ------------------------------------------------------------------------------------------ routes
    async def completions(self, request: Request) -> Response:
        body = parse(CompletionRequest, await request.body())
        self._check_model(body.model)
        prompts = body.prompts()
        max_tokens = COMPLETION_DEFAULT_MAX_TOKENS if body.max_tokens is None else body.max_tokens
        params = body.sampling_params(max_tokens, body.logprobs)
        render = CompletionRender(f"cmpl-{uuid.uuid4().hex}", self.model_name, self.engine.tokenizer,
                                  **_render_options(body, params, body.logprobs))
        return await self._respond(request, prompts, params, render, body.stream)

    async def chat_completions(self, request: Request) -> Response:
        body = parse(ChatCompletionRequest, await request.body())
        self._check_model(body.model)
        prompt_ids = self._chat_prompt(body.template_messages())
        max_tokens = body.requested_max_tokens()
        if max_tokens is None:  # as vLLM: whatever room the model (and the KV pool, for n outputs) leaves
            room = min(self.engine.max_model_len, self.capacity // max(body.n, 1))  # n itself is checked below
            max_tokens = max(1, room - len(prompt_ids))
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        params = body.sampling_params(max_tokens, logprobs)
        render = ChatRender(f"chatcmpl-{uuid.uuid4().hex}", self.model_name, self.engine.tokenizer,
                            **_render_options(body, params, logprobs))
        return await self._respond(request, [prompt_ids], params, render, body.stream)

    async def models(self) -> dict:
        return {"object": "list", "data": [self._card()]}

    async def model(self, model_id: str) -> dict:
        self._check_model(model_id)
        return self._card()

    async def metrics(self) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)

    # ------------------------------------------------------------------------------------------ helpers
    def _card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": 0, "owned_by": "hf_paged",
                "max_model_len": self.engine.max_model_len}

    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(404, f"The model `{model}` does not exist (this server serves `{self.model_name}`)",
                           param="model", code="model_not_found")

    def _chat_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        tokenizer = self.engine.tokenizer
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise bad_request("the model's tokenizer has no chat template; use /v1/completions")
        try:
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except jinja2.TemplateError as err:  # templates raise on conversations they reject (role order, ...)
            raise bad_request(f"the chat template rejected the messages: {err}", "messages") from None
        # The template writes the special tokens (BOS, ...) itself.
        return tokenizer.encode(text, add_special_tokens=False)

    def _admit(self) -> Callable[[], None]:
        """Count a request in flight, or answer 429 past max_queue; returns the release function."""
        if self.in_flight >= self.max_queue:
            raise APIError(429, f"the server is at its limit of {self.max_queue} requests in flight; retry later",
                           type="rate_limit_error", code="rate_limit_exceeded")
        self.in_flight += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released, self.in_flight = True, self.in_flight - 1

        return release

    async def _respond(self, request: Request, prompts: list, params: SamplingParams, render: Render,
                       stream: bool) -> Response:
        release = self._admit()
        streams = [self.front.generate(p, params, f"{render.request_id}-{i}") for i, p in enumerate(prompts)]
        outputs = _merge(streams)
        handed_off = False
        try:
            if not stream:
                finals = await _generation(request, _finals(outputs, len(prompts)))
                return JSONResponse(render.full(finals))
            # The first output (or the request's error) comes before the headers: a bad request gets a 4xx.
            first = await _generation(request, anext(outputs))
            events = render.stream(first, outputs)

            async def close() -> None:
                try:
                    await events.aclose()
                    await outputs.aclose()
                finally:
                    release()

            handed_off = True
            return _EventStream(events, close)
        finally:
            if not handed_off:
                await outputs.aclose()
                release()


class _EventStream(StreamingResponse):
    """An SSE response that runs `on_close` however it ends (done, client gone, or never started)."""

    def __init__(self, events: AsyncIterator[str], on_close: Callable[[], Awaitable[None]]):
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.on_close()


async def _merge(streams: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleave engine streams as (index, output); an error in one ends all; closing it aborts them all."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[RequestOutput]) -> None:
        try:
            async for output in stream:
                queue.put_nowait((index, output))
        except Exception as exc:
            queue.put_nowait((index, exc))
        queue.put_nowait((index, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            index, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()  # a cancelled engine stream aborts its request
        await asyncio.gather(*tasks, return_exceptions=True)


async def _finals(outputs: AsyncIterator[tuple[int, RequestOutput]], count: int) -> list[RequestOutput]:
    last: dict[int, RequestOutput] = {}
    async for index, output in outputs:
        last[index] = output
    return [last[i] for i in range(count)]


async def _generation(request: Request, work: Awaitable):
    """Await `work` (engine output); if the client disconnects first, cancel it (aborting its engine requests).

    Raises:
        _ClientGone: the client went away.
        RequestError: the engine refused the request (answered 400).
        APIError: 500, the engine failed while running it (its loop goes on).
    """
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        raise _ClientGone()
    error = task.exception()
    if error is None:
        return task.result()
    if isinstance(error, RequestError):
        raise error
    # NOTE: an APIError is answered without re-raising; a bare exception would make uvicorn drop the connection.
    logger.error("a request failed in the engine", exc_info=error)
    raise server_error(error) from error


async def _disconnect(request: Request) -> None:
    # NOTE: the body has been read, so the next ASGI message is http.disconnect (when the client goes away).
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _render_options(body, params: SamplingParams, logprobs: int | None) -> dict:
    return dict(n=params.n, logprobs=logprobs, stop=params.stop, return_token_ids=body.return_token_ids,
                include_usage=body.stream_options is not None and body.stream_options.include_usage)


def _api_key_check(api_key: str) -> Callable[[Request], Awaitable[None]]:
    expected = f"Bearer {api_key}".encode()

    async def check(request: Request) -> None:
        given = request.headers.get("authorization")
        if given is None:
            raise APIError(401, "missing API key: send the header `Authorization: Bearer <key>`",
                           code="invalid_api_key")
        if not secrets.compare_digest(given.encode(), expected):
            raise APIError(401, "Incorrect API key provided", code="invalid_api_key")

    return check


def _error(exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


def _install_error_handlers(app: FastAPI) -> None:
    """Every error answers OpenAI's shape; FastAPI's 422 becomes 400."""

    @app.exception_handler(APIError)
    async def api_error(request, exc: APIError):
        return _error(exc)

    @app.exception_handler(RequestError)
    async def request_error(request, exc: RequestError):
        return _error(bad_request(str(exc)))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(part) for part in first["loc"])
        return _error(bad_request(f"{where}: {first['msg']}" if where else first["msg"]))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc: StarletteHTTPException):
        return _error(APIError(exc.status_code, str(exc.detail), code=None))

    @app.exception_handler(_ClientGone)
    async def client_gone(request, exc: _ClientGone):
        return Response(status_code=CLIENT_CLOSED)

    @app.exception_handler(Exception)
    async def internal_error(request, exc: Exception):  # a bug: Starlette re-raises it for the log after this
        return _error(server_error(exc, "internal server error"))


def build_app(
    llm_engine: LLMEngine, model_name: str, api_key: str | None = None, max_queue: int | None = None, step_sync=None
) -> FastAPI:
    """The OpenAI-compatible app over `llm_engine` (which it drives from the app's event loop).

    Args:
        llm_engine: the engine; the app owns it from now on (one app per engine).
        model_name: the name clients pass as `model` (and `/v1/models` lists).
        api_key: when given, every route but `/health` needs `Authorization: Bearer <api_key>`.
        max_queue: generation requests in flight at most; more are answered 429 (default: 4 x the engine's
            max_num_seqs).
        step_sync: tensor parallelism: rank 0's `hf_paged.engine.tp.StepSync` (the other ranks follow it).

    Example:
        >>> llm = hf_paged.LLM(model, tokenizer)
        >>> uvicorn.run(build_app(llm.engine, "my-model"), host="127.0.0.1", port=8000)
    """
    server = OpenAIServer(llm_engine, model_name, max_queue, step_sync)
    app = FastAPI(title="hf_paged OpenAI-compatible server")
    app.state.server = server
    router = APIRouter(dependencies=[Depends(_api_key_check(api_key))] if api_key else [])
    router.add_api_route("/v1/completions", server.completions, methods=["POST"])
    router.add_api_route("/v1/chat/completions", server.chat_completions, methods=["POST"])
    router.add_api_route("/v1/models", server.models, methods=["GET"])
    router.add_api_route("/v1/models/{model_id:path}", server.model, methods=["GET"])
    router.add_api_route("/metrics", server.metrics, methods=["GET"])
    app.include_router(router)

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200)

    _install_error_handlers(app)
    return app
