"""An asyncio front for LLMEngine (what the server uses): one background task steps the engine.

The engine is single-threaded: requests and aborts are queued by the event loop and applied by the stepping task
between steps; each step itself runs in a worker thread so the loop stays responsive.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator

from hf_paged.engine.collector import frozen_heap
from hf_paged.engine.config import EngineStats, StepError
from hf_paged.engine.engine import LLMEngine
from hf_paged.engine.params import BeamSearchParams, SamplingParams
from hf_paged.engine.request import RequestOutput
from hf_paged.patches.generate import paged_attention


class AsyncLLMEngine:
    """Args:
        engine: the engine to drive (from this event loop only).
        sync: under tensor parallelism, rank 0's `StepSync`: every step's new requests and aborts are broadcast to
            the other ranks before it runs (they follow with `StepSync.follow`).
    """

    HEARTBEAT_S = 30.0  # idle rank 0 still talks to the followers so their collectives never time out

    def __init__(self, engine: LLMEngine, sync=None):
        self.engine = engine
        self.sync = sync
        self._streams: dict[str, asyncio.Queue] = {}
        self._pending: list[tuple] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._ids = itertools.count()
        self.errored: BaseException | None = None
        # NOTE: engine.stats() walks the scheduler's queues, which the stepping thread mutates; readers on the
        # event loop (the server's /metrics) read this snapshot, taken between steps.
        self.last_stats: EngineStats = engine.stats()

    def _ensure_started(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._loop())

    async def generate(
        self, prompt, params: SamplingParams | BeamSearchParams, request_id: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs; leaving the iteration early (or cancelling) aborts the request."""
        request_id = request_id or f"async-{next(self._ids)}"
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        # Validate now so the caller gets the error; the stepping task queues it between steps.
        request = self.engine.make_request(request_id, prompt, params)
        queue: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = queue
        self._pending.append(("add", request))
        self._ensure_started()
        self._wake.set()
        finished = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Abort between steps (safe to call from the event loop at any time)."""
        self._pending.append(("abort", request_id))
        self._wake.set()

    async def _loop(self) -> None:
        # The engine owns the model while it serves: switch its attention once, not at every step.
        with paged_attention(self.engine.model), frozen_heap():
            await self._serve()

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            pending, self._pending = self._pending, []
            added = [arg for op, arg in pending if op == "add"]
            aborted = [arg for op, arg in pending if op == "abort"]
            for request in added:
                self.engine.enqueue(request)
            for request_id in aborted:
                self.engine.abort(request_id)
            self.last_stats = self.engine.stats()
            step = self.engine.has_unfinished_requests()
            if self.sync is not None and (pending or step):
                await loop.run_in_executor(None, self.sync.lead, added, aborted, step)
            if not step:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), self.HEARTBEAT_S if self.sync is not None else None)
                except TimeoutError:
                    await loop.run_in_executor(None, self.sync.lead, [], [], False)
                continue
            try:
                outputs = await loop.run_in_executor(None, self.engine.step)
            except Exception as exc:  # a failing step fails the requests in it, not the loop
                self.errored = exc
                failed = exc.request_ids if isinstance(exc, StepError) else list(self._streams)
                for request_id in failed:
                    self.engine.abort(request_id)
                    queue = self._streams.get(request_id)
                    if queue is not None:
                        queue.put_nowait(exc)
                continue
            for output in outputs:
                queue = self._streams.get(output.request_id)
                if queue is not None:
                    queue.put_nowait(output)
