"""Scheduling forward passes across concurrent requests (the server's queue).

Every text of every request is one queue item with its own future, resolved as soon as
the forward pass that carries it returns: a request is answered when its own texts are
done, not when a merged call is. Tokenization runs off the event loop. Each forward pass
is sized by the engine's budget (``Engine.max_batch_tokens``: 256 tokens on the CPU,
16,384 on GPUs) and filled shortest item first, so a short query goes into the next pass
ahead of passages; items queued longer than ``starve_s`` go first whatever their length,
oldest first. Items are batched only with items that ask for the same outputs
(``max_length`` matters only at tokenization). Batching across requests is safe because
results do not depend on batch companions (tested to 1e-5). An item whose request was
cancelled (client gone, timeout) before its pass is dropped unrun.

With one worker, one pass runs at a time. With ``workers`` N >= 2, short passes and long
ones (a text over the budget: a passage, on the CPU) run on threads of their own: up to
N short passes at once on lane threads at the server's priority, so a short query never
waits for a passage; up to N - 1 long passes at once on threads ``long_nice`` steps
nicer (Linux, per thread), on a second session of the engine opened from one of those
threads (``prepare``). ONNX Runtime's intra-op threads keep the priority of the thread
that created their session, so every thread of a long pass is nicer than the lanes' and
a short pass started beside one takes both cores. With one session for both, the pool
thread of a passage's pass runs at the server's priority and a short pass beside it took
up to 3x its time alone (full-size int8, 2 vCPUs). The cost is a second copy of the
prepacked weights (int8: ~300 MB). So that a stream of short queries cannot hold a nicer
passage back for ever, once the long passes in flight have run ``starve_s`` the lanes
start a pass only while they have held the cores at most ``long_share`` of the time
since.
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from .batching import pad_batch, take_batch
from .engine import Batch, Engine
from .errors import Overloaded, ShuttingDown
from .heads import TextOutput, split_batch


def lower_thread_priority(nice: int) -> None:
    """Raise the calling thread's nice value by ``nice`` (Linux: the priority is per
    thread; elsewhere, or where refused, nothing). Any user may lower a priority."""
    if nice <= 0 or not sys.platform.startswith("linux"):
        return
    tid = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))
    except OSError:
        pass


@dataclass
class Stats:
    batches: int = 0
    texts: int = 0
    tokens: int = 0


@dataclass(eq=False)
class _Item:
    engine: Engine
    ids: list[int]
    outputs: tuple[str, ...]
    future: asyncio.Future[TextOutput] = field(repr=False)
    queued_at: float = field(default_factory=time.perf_counter)


class Scheduler:
    """One queue for every engine of a server (an embedder and a reranker share it)."""

    def __init__(
        self,
        *,
        max_queue: int,
        max_wait_ms: float,
        starve_s: float = 2.0,
        workers: int = 1,
        long_nice: int = 10,
        long_share: float = 0.5,
        on_batch: Callable[[int, int], None] | None = None,
    ) -> None:
        """``on_batch(texts, tokens)`` is called after each finished forward pass (the server's metrics)."""
        self.max_queue = max_queue
        self.max_wait = max_wait_ms / 1000
        self.starve_s = starve_s
        self.workers = workers
        self.long_share = long_share
        self.pending: list[_Item] = []
        self.queued_texts = 0  # items waiting, plus texts being tokenized
        self.stats = Stats()
        self.on_batch = on_batch
        self._wake = asyncio.Event()
        # With several workers: ``workers`` lane threads at the server's priority take
        # the short passes, and ``workers - 1`` threads ``long_nice`` steps nicer take the
        # long ones, on the engines' long-pass sessions (``prepare``; module docstring).
        # With one: one thread takes everything in turn.
        lane = workers > 1
        self._lane = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="m3-run-lane") if lane else None
        self._runs = ThreadPoolExecutor(
            max_workers=workers - 1 if lane else 1,
            thread_name_prefix="m3-run",
            initializer=lower_thread_priority,
            initargs=(long_nice if lane else 0,),
        )
        self._tokenize = ThreadPoolExecutor(max_workers=1, thread_name_prefix="m3-tokenize")
        self._tasks: list[asyncio.Task] = []
        self._closing = False
        self._lane_busy = 0  # passes in flight on ``_lane``
        self._runs_busy = 0  # passes in flight on ``_runs``
        # The long passes' share: since ``_long_since`` (the first of the long passes in
        # flight began), the lanes held the cores ``_lane_held(now)`` seconds.
        self._long_since: float | None = None
        self._lane_time = 0.0
        self._lane_since: float | None = None

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        threads = 2 * self.workers - 1 if self._lane is not None else 1
        self._tasks = [loop.create_task(self._worker()) for _ in range(threads)]

    async def prepare(self, engine: Engine) -> None:
        """Before ``engine``'s first item: with a lane, open its long-pass session on a
        long-pass thread, so that ONNX Runtime's threads for it take that thread's lower
        priority (``Engine.open_long_session``). Without it long passes share the main
        session's threads, and a short pass beside one is slowed (module docstring)."""
        if self._lane is not None:
            await asyncio.get_running_loop().run_in_executor(self._runs, engine.open_long_session)

    def _reserve(self, n: int) -> None:
        if self._closing:
            raise ShuttingDown("server is shutting down")
        if self.queued_texts + n > self.max_queue:
            raise Overloaded(f"{self.queued_texts} texts already queued (limit {self.max_queue})")
        self.queued_texts += n

    async def encode(
        self, engine: Engine, texts: Sequence[str], *, max_length: int, outputs: Sequence[str]
    ) -> list[TextOutput]:
        """Each text's outputs (``outputs``: graph output names), in order."""
        texts = list(texts)
        return await self.submit(engine, len(texts), lambda: engine.tokenize(texts, max_length), outputs)

    async def submit(
        self, engine: Engine, n: int, tokenize: Callable[[], list[list[int]]], outputs: Sequence[str]
    ) -> list[TextOutput]:
        """Outputs of the ``n`` inputs that ``tokenize()`` turns into token ids (run off the event loop)."""
        self._reserve(n)
        loop = asyncio.get_running_loop()
        try:
            ids = await loop.run_in_executor(self._tokenize, tokenize)
        except BaseException:
            self.queued_texts -= n
            raise
        items = [_Item(engine, x, tuple(outputs), loop.create_future()) for x in ids]
        self.pending.extend(items)
        self._wake.set()
        try:
            return list(await asyncio.gather(*(item.future for item in items)))
        finally:
            for item in items:  # cancelled or failed: what has not run yet never runs
                if not item.future.done():
                    item.future.cancel()
                if item in self.pending:
                    self.pending.remove(item)
                    self.queued_texts -= 1

    @staticmethod
    def _long(item: _Item) -> bool:
        """A text over its engine's token budget: a forward pass of its own, the slow kind."""
        return len(item.ids) > item.engine.max_batch_tokens

    def _lane_held(self, now: float) -> float:
        return self._lane_time + (now - self._lane_since if self._lane_since is not None else 0.0)

    def _lane_may_start(self, now: float) -> bool:
        """The long passes' share: once the long passes in flight have run ``starve_s``,
        the lanes start a pass only while they have held the cores at most
        ``long_share`` of the time since (a long pass is nicer than the lanes, so
        without this a stream of short queries could hold it back for ever)."""
        if self._long_since is None:
            return True
        ran = now - self._long_since
        return ran < self.starve_s or self._lane_held(now) <= self.long_share * ran

    def _eligible(self, now: float) -> list[_Item]:
        """What a free worker may take now: with a lane, short items while a lane thread
        is free (and the long passes' share allows), long ones while a long-pass thread
        is; with one worker, everything."""
        if self._lane is None:
            return self.pending
        long_ok = self._runs_busy < self.workers - 1
        short_ok = self._lane_busy < self.workers and self._lane_may_start(now)
        return [i for i in self.pending if (long_ok if self._long(i) else short_ok)]

    def _retry_in(self, now: float) -> float | None:
        """Seconds until the long passes' share lets the idle lanes start again (None: an
        event will tell, a pass finishing or an item arriving)."""
        # While a lane pass runs, the lanes' time grows faster than the share: only its end helps.
        if self._long_since is None or self._lane_busy or self._lane_may_start(now):
            return None
        if not any(not self._long(i) for i in self.pending):
            return None
        return max(self.starve_s, self._lane_held(now) / self.long_share) - (now - self._long_since) + 1e-3

    async def _next(self) -> tuple[list[_Item], ThreadPoolExecutor] | None:
        """The next batch's items and the threads it runs on, or None once closing with
        nothing queued (no items: another worker took them)."""
        # Items of cancelled requests have left ``pending`` already (``_submit``'s finally).
        while not (eligible := self._eligible(time.perf_counter())):
            if self._closing and not self.pending:
                return None
            self._wake.clear()
            retry = self._retry_in(time.perf_counter())
            try:
                await asyncio.wait_for(self._wake.wait(), retry)
            except TimeoutError:
                pass
        first = min(eligible, key=lambda i: i.queued_at)
        deadline = first.queued_at + self.max_wait
        while time.perf_counter() < deadline and self._tokens(first) < first.engine.max_batch_tokens:
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), max(0.0, deadline - time.perf_counter()))
            except TimeoutError:
                break
        now = time.perf_counter()
        eligible = self._eligible(now)
        if not eligible:  # another worker took them while this one waited
            return [], self._runs
        # The pass leads with the oldest item queued past ``starve_s`` (by length alone a
        # passage could wait forever under saturation, when every item is old), else the
        # shortest; its companions are always the shortest that fit (in age order they
        # would be a short and a passage: a pass of one, and throughput would collapse).
        oldest = min(eligible, key=lambda i: i.queued_at)
        by_length = sorted(eligible, key=lambda i: (len(i.ids), i.queued_at))
        top = oldest if now - oldest.queued_at >= self.starve_s else by_length[0]
        engine = top.engine
        same = [top, *(i for i in by_length if i is not top and i.engine is engine and i.outputs == top.outputs)]
        n = take_batch(
            [len(i.ids) for i in same],
            batch_size=engine.batch_size if engine.rows_cap is None else engine.rows_cap,
            max_tokens=engine.max_batch_tokens,
            pad=engine.pad_batches,
            pad_limit=engine.pad_limit,
        )
        taken = same[:n]
        for item in taken:
            self.pending.remove(item)
        self.queued_texts -= len(taken)
        # The thread is chosen before any await, so the next worker sees it taken.
        if self._lane is not None and not self._long(taken[0]):
            if self._lane_busy == 0:
                self._lane_since = now
            self._lane_busy += 1
            return taken, self._lane
        if self._lane is not None and self._runs_busy == 0:
            self._long_since, self._lane_time = now, 0.0
            if self._lane_since is not None:
                self._lane_since = now
        self._runs_busy += 1
        return taken, self._runs

    def _tokens(self, like: _Item) -> int:
        return sum(len(i.ids) for i in self.pending if i.engine is like.engine and i.outputs == like.outputs)

    @staticmethod
    def _run(items: list[_Item], long_session: bool) -> list[TextOutput]:
        engine = items[0].engine
        input_ids, mask = pad_batch([i.ids for i in items], engine.special.pad)
        batch = Batch(np.arange(len(items)), input_ids, mask)
        results = engine.run(batch, items[0].outputs, long_session=long_session)
        return split_batch(results, input_ids, batch.lengths, engine.special.unused_for_sparse)

    async def _worker(self) -> None:
        loop = asyncio.get_running_loop()
        while (taken := await self._next()) is not None:
            items, pool = taken
            if not items:
                continue
            try:
                outs = await loop.run_in_executor(pool, self._run, items, self._lane is not None and pool is self._runs)
            except Exception as exc:
                self._finished(pool)
                for item in items:
                    if not item.future.done():
                        item.future.set_exception(exc)
                continue
            self._finished(pool)
            self.stats.batches += 1
            self.stats.texts += len(items)
            tokens = sum(len(i.ids) for i in items)
            self.stats.tokens += tokens
            if self.on_batch is not None:
                self.on_batch(len(items), tokens)
            for item, out in zip(items, outs, strict=True):
                if not item.future.done():
                    item.future.set_result(out)

    def _finished(self, pool: ThreadPoolExecutor) -> None:
        now = time.perf_counter()
        if pool is self._lane:
            self._lane_busy -= 1
            if self._lane_busy == 0 and self._lane_since is not None:
                self._lane_time += now - self._lane_since
                self._lane_since = None
        else:
            self._runs_busy -= 1
            if self._runs_busy == 0:
                self._long_since = None
        self._wake.set()  # items held back while their threads were full may go now

    async def close(self) -> None:
        """Finish what is queued, then stop."""
        self._closing = True
        self._wake.set()
        await asyncio.gather(*self._tasks)
        self._runs.shutdown(wait=True)
        if self._lane is not None:
            self._lane.shutdown(wait=True)
        self._tokenize.shutdown(wait=True)
