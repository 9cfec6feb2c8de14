"""Live servers on loopback: uvicorn in a background thread, a tiny random Llama and a word-level tokenizer."""

import socket
import threading
import time

import pytest
import uvicorn

from hf_paged import LLM
from hf_paged.server import build_app
from tests.tiny import tiny_model, tiny_tokenizer

MODEL_NAME = "tiny-llama"
START_TIMEOUT_S = 10.0
IDLE_TIMEOUT_S = 10.0


def tiny_llm(seed: int = 0, **kwargs) -> LLM:
    kwargs.setdefault("block_size", 4)
    kwargs.setdefault("num_blocks", 512)
    return LLM(tiny_model("llama", seed=seed), tiny_tokenizer(), **kwargs)


class LiveServer:
    """An app served on 127.0.0.1 at a free port, in a daemon thread."""

    def __init__(self, app):
        self.app, self.server = app, app.state.server
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.uvicorn = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.uvicorn.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.uvicorn.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError(f"uvicorn did not start within {START_TIMEOUT_S} s")
            time.sleep(0.01)

    def stop(self) -> None:
        self.uvicorn.should_exit = True
        self.thread.join(timeout=10)

    def wait_idle(self):
        """Wait until no request is in flight and the engine holds no request and no block; returns its stats."""
        deadline = time.monotonic() + IDLE_TIMEOUT_S
        while True:
            stats = self.server.front.last_stats
            idle = (self.server.in_flight == 0 and not self.server.engine.has_unfinished_requests()
                    and stats.blocks_in_use == 0 and stats.num_running == 0 and stats.num_waiting == 0)
            if idle:
                return stats
            if time.monotonic() > deadline:
                raise AssertionError(f"not idle after {IDLE_TIMEOUT_S} s: {self.server.in_flight} in flight, {stats}")
            time.sleep(0.01)


@pytest.fixture(scope="module")
def start_server():
    """Start servers on tiny engines: start_server(api_key=..., max_queue=..., seed=..., **LLM kwargs)."""
    started = []

    def start(api_key=None, max_queue=None, seed=0, **llm_kwargs):
        app = build_app(tiny_llm(seed, **llm_kwargs).engine, MODEL_NAME, api_key=api_key, max_queue=max_queue)
        started.append(LiveServer(app))
        return started[-1]

    yield start
    for live in started:
        live.stop()


@pytest.fixture(scope="module")
def live(start_server):
    """The shared server: no API key, the default max_queue, the seed-0 tiny Llama."""
    return start_server()


@pytest.fixture(scope="module")
def reference():
    """An LLM over the same model as `live`, for reference outputs (run it only while servers are idle)."""
    return tiny_llm()
