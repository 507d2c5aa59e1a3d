"""The server's Prometheus metrics, through prometheus_client (one registry per app)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
BATCH_TEXT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    """Requests by path and status, their latency, and what the scheduler ran.

    Its own registry (not prometheus_client's global one), so that several apps in one
    process (the tests) keep separate counts; ``_created`` series are left out."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        reg = self.registry
        self.requests = Counter(
            "m3_requests", "HTTP requests answered, by path and status", ("path", "status"), registry=reg
        )
        self.latency = Histogram(
            "m3_request_seconds",
            "seconds from the request's first byte to its answer's last, by path",
            ("path",),
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.texts = Counter("m3_texts", "texts (or rerank pairs) run through the model", registry=reg)
        self.tokens = Counter("m3_tokens", "tokens run through the model (padding not counted)", registry=reg)
        self.batches = Counter("m3_batches", "forward passes run", registry=reg)
        self.batch_texts = Histogram(
            "m3_batch_texts", "texts per forward pass", buckets=BATCH_TEXT_BUCKETS, registry=reg
        )
        self.queue = Gauge("m3_queue_texts", "texts waiting in the scheduler's queue", registry=reg)

    def observe(self, path: str, status: int, seconds: float) -> None:
        self.requests.labels(path, str(status)).inc()
        self.latency.labels(path).observe(seconds)

    def on_batch(self, texts: int, tokens: int) -> None:
        """The scheduler's callback after each forward pass."""
        self.batches.inc()
        self.texts.inc(texts)
        self.tokens.inc(tokens)
        self.batch_texts.observe(texts)

    def watch_queue(self, depth: Callable[[], float]) -> None:
        self.queue.set_function(depth)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
