"""Dynamic batching across concurrent requests, for the server.

Requests queue texts; one worker takes the oldest request, gathers more requests
with the same options for up to ``max_wait_ms`` or until ``max_batch_tokens`` tokens,
runs ``M3Model.encode`` once off the event loop, and hands each request its own
slice in its own order. Merging is safe because the runtime's results do not depend
on batch companions (tested to 1e-5). A request cancelled while queued is dropped
before it runs; one cancelled while running simply has its slice discarded.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from .model import M3Model


class QueueFull(Exception):
    """More texts are waiting than the server accepts."""


@dataclass(frozen=True)
class Options:
    max_length: int
    dense: bool
    sparse: bool
    colbert: bool


@dataclass
class _Job:
    texts: list[str]
    tokens: int
    options: Options
    future: asyncio.Future = field(repr=False)
    queued_at: float = field(default_factory=time.perf_counter)


@dataclass
class Stats:
    batches: int = 0
    texts: int = 0
    tokens: int = 0
    batch_sizes: list[int] = field(default_factory=list)


class Batcher:
    def __init__(self, model: M3Model, *, max_batch_tokens: int, max_wait_ms: float, max_queue: int) -> None:
        self.model = model
        self.max_batch_tokens = max_batch_tokens
        self.max_wait = max_wait_ms / 1000
        self.max_queue = max_queue
        self.starve_s = 2.0
        self.pending: list[_Job] = []
        self.queued_texts = 0
        self.stats = Stats()
        self._wake = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="m3-model")
        self._task: asyncio.Task | None = None
        self._closing = False

    def count_tokens(self, texts: Sequence[str], max_length: int) -> int:
        return sum(len(ids) for ids in self.model.tokenizer.encode(texts, max_length))

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def run_exclusive(self, fn, *args: Any) -> Any:
        """Run other model work (scoring) on the same single model thread."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def encode(self, texts: list[str], options: Options) -> tuple[dict[str, Any], int]:
        """The request's ``encode`` result and its token count (counted once, for batching and usage)."""
        if self._closing:
            raise QueueFull("server is shutting down")
        if self.queued_texts + len(texts) > self.max_queue:
            raise QueueFull(f"{self.queued_texts} texts already queued (limit {self.max_queue})")
        loop = asyncio.get_running_loop()
        job = _Job(texts, self.count_tokens(texts, options.max_length), options, loop.create_future())
        self.pending.append(job)
        self.queued_texts += len(texts)
        self._wake.set()
        try:
            return await job.future, job.tokens
        finally:
            if job in self.pending:  # cancelled while queued: never runs
                self.pending.remove(job)
                self.queued_texts -= len(job.texts)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self.pending:
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
            first = min(self.pending, key=lambda j: j.queued_at)
            deadline = first.queued_at + self.max_wait
            while time.perf_counter() < deadline and self._batch_tokens(first.options) < self.max_batch_tokens:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), max(0.0, deadline - time.perf_counter()))
                except TimeoutError:
                    break
            jobs = self._take(first.options)
            texts = [t for job in jobs for t in job.texts]
            if not texts:
                continue
            try:
                result = await loop.run_in_executor(self._executor, self._encode_now, texts, first.options)
            except Exception as exc:
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(exc)
                continue
            self.stats.batches += 1
            self.stats.texts += len(texts)
            self.stats.tokens += sum(job.tokens for job in jobs)
            self.stats.batch_sizes.append(len(texts))
            start = 0
            for job in jobs:
                part = {k: (None if v is None else v[start : start + len(job.texts)]) for k, v in result.items()}
                start += len(job.texts)
                if not job.future.done():
                    job.future.set_result(part)

    def _encode_now(self, texts: list[str], o: Options) -> dict[str, Any]:
        return self.model.encode(
            texts, max_length=o.max_length, return_dense=o.dense, return_sparse=o.sparse, return_colbert_vecs=o.colbert
        )

    def _batch_tokens(self, options: Options) -> int:
        return sum(job.tokens for job in self.pending if job.options == options)

    def _take(self, options: Options) -> list[_Job]:
        """Shortest requests first, so a short query does not wait behind passages;
        a request waiting longer than ``starve_s`` goes first whatever its size."""
        taken: list[_Job] = []
        tokens = 0
        now = time.perf_counter()
        order = sorted(self.pending, key=lambda j: (now - j.queued_at < self.starve_s, j.tokens))
        for job in order:
            if job.options != options or job.future.done():
                continue
            if taken and tokens + job.tokens > self.max_batch_tokens:
                break
            taken.append(job)
            tokens += job.tokens
            self.pending.remove(job)
            self.queued_texts -= len(job.texts)
        return taken

    async def close(self) -> None:
        """Finish what is queued, then stop."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await self._task
        self._executor.shutdown(wait=True)
