"""Prometheus metrics of one server: engine stats read at scrape time into the app's own registry."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from hf_paged.engine.config import EngineStats

PREFIX = "hf_paged_"
RATE_WINDOW_S = 10.0


class _Rate:
    """A counter's per-second rate over the scrapes of the last `window` seconds (since the previous scrape when
    scrapes are sparser; 0 at the first)."""

    def __init__(self, window: float):
        self.window = window
        self.samples: deque[tuple[float, int]] = deque()

    def update(self, now: float, total: int) -> float:
        # Keep the newest sample at least `window` old as the base, drop the ones before it.
        while len(self.samples) > 1 and now - self.samples[1][0] >= self.window:
            self.samples.popleft()
        base = self.samples[0] if self.samples else None
        self.samples.append((now, total))
        if base is None or now <= base[0]:
            return 0.0
        return (total - base[1]) / (now - base[0])


class EngineCollector:
    """Exports an engine's stats (as of its last step boundary) and the server's requests in flight."""

    def __init__(self, stats: Callable[[], EngineStats], in_flight: Callable[[], int]):
        self.stats, self.in_flight = stats, in_flight
        self.rate = _Rate(RATE_WINDOW_S)

    def collect(self):
        s = self.stats()
        gauges = [
            ("num_requests_in_flight", "HTTP generation requests being served (what --max-queue bounds)",
             self.in_flight()),
            ("num_seqs_running", "sequences running in the engine (a request with n > 1 runs n)", s.num_running),
            ("num_seqs_waiting", "sequences waiting for admission or preempted", s.num_waiting),
            ("kv_blocks_in_use", "KV cache blocks held by sequences", s.blocks_in_use),
            ("kv_blocks_total", "KV cache blocks in the pool", s.num_blocks),
            ("kv_cache_usage_ratio", "fraction of the KV blocks in use", s.blocks_in_use / max(s.num_blocks, 1)),
            ("prefix_cache_hit_rate", "prefix-cache hits per full-block lookup since start", s.prefix_cache_hit_rate),
            ("generation_tokens_per_second", f"tokens generated per second over the last {RATE_WINDOW_S:g} s of "
             "scrapes (since the previous scrape when sparser)", self.rate.update(time.monotonic(),
                                                                                   s.generation_tokens)),
        ]
        for name, doc, value in gauges:
            yield GaugeMetricFamily(PREFIX + name, doc, value=value)
        counters = [
            ("generation_tokens", "tokens generated", s.generation_tokens),
            ("prompt_tokens", "prompt tokens computed (prefix-cache hits excluded)", s.prompt_tokens),
            ("prefix_cache_queries", "full-block prefix-cache lookups", s.prefix_cache_queries),
            ("prefix_cache_hits", "full-block prefix-cache hits", s.prefix_cache_hits),
            ("num_preemptions", "sequence groups preempted (recomputed later)", s.num_preemptions),
        ]
        for name, doc, value in counters:
            yield CounterMetricFamily(PREFIX + name, doc, value=value)


def make_registry(stats: Callable[[], EngineStats], in_flight: Callable[[], int]) -> CollectorRegistry:
    """A registry of its own per app, so several apps in one process do not clash."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(EngineCollector(stats, in_flight))
    return registry
