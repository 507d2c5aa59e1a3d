"""The server's scheduler on a real engine (tiny package), without HTTP: the short lane."""

from __future__ import annotations

import asyncio
import itertools
import os
import sys
import threading
import time

import numpy as np
import pytest
from m3_runtime import M3Model
from m3_runtime.scheduler import Scheduler

LONG = ["long passage " * 150, "another long passage " * 120, "a third long one " * 140, "the fourth " * 200]
SHORT = [f"short query {i}" for i in range(6)]


def _timed(engine, hold_long_s: float, hold_short_s: float = 0.0):
    """Wraps ``engine.run`` (the scheduler's only way to the model): records each pass's
    start, end, padded tokens, the running thread's nice value and whether it ran on the
    long-pass session, and holds passes so that overlaps are decided by the scheduler,
    not by how fast the tiny model is."""
    real, runs, lock = engine.run, [], threading.Lock()

    def run(batch, outputs, *, long_session=False):
        start = time.perf_counter()
        time.sleep(hold_long_s if batch.input_ids.size > engine.max_batch_tokens else hold_short_s)
        out = real(batch, outputs, long_session=long_session)
        nice = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        with lock:
            runs.append((start, time.perf_counter(), batch.input_ids.size, nice, long_session))
        return out

    engine.run = run
    return runs


async def _serve(model, workers: int, **options):
    engine = model.engine
    scheduler = Scheduler(max_queue=100, max_wait_ms=5, workers=workers, **options)
    scheduler.start()
    await scheduler.prepare(engine)
    outputs = engine.outputs
    longs = [asyncio.create_task(scheduler.encode(engine, [t], max_length=8192, outputs=outputs)) for t in LONG]
    await asyncio.sleep(0.05)  # the passages are queued and running first
    shorts = []
    for text in SHORT:
        shorts.append(asyncio.create_task(scheduler.encode(engine, [text], max_length=8192, outputs=outputs)))
        await asyncio.sleep(0.03)
    got = [(await t)[0] for t in longs + shorts]
    await scheduler.close()
    return got


def _threads() -> dict[int, int]:
    """This process's threads: native id -> nice value."""
    return {int(t): os.getpriority(os.PRIO_PROCESS, int(t)) for t in os.listdir("/proc/self/task")}


def test_two_workers_run_short_passes_in_lanes_and_passages_on_nicer_threads(package_dir):
    model = M3Model(package_dir, variant="fp32", intra_op_threads=1)
    engine = model.engine
    assert all(len(x) > engine.max_batch_tokens for x in engine.tokenize(LONG, 8192))
    runs = _timed(engine, hold_long_s=0.4)
    got = asyncio.run(_serve(model, workers=2))

    long_runs = [r for r in runs if r[2] > engine.max_batch_tokens]
    short_runs = [r for r in runs if r[2] <= engine.max_batch_tokens]
    assert len(long_runs) == len(LONG) and short_runs
    overlapping = [(a, b) for a in long_runs for b in long_runs if a is not b and a[0] < b[1] and b[0] < a[1]]
    assert not overlapping  # workers - 1 = one passage at a time
    # Passages on the long-pass session, short passes on the main one.
    assert engine.long_session is not None and engine.long_session is not engine.session
    assert all(r[4] for r in long_runs) and not any(r[4] for r in short_runs)
    # Every short query ran while passages were still queued or running, not after them.
    assert max(r[1] for r in short_runs) < max(r[1] for r in long_runs)
    assert sum(1 for s in short_runs for g in long_runs if g[0] < s[0] < g[1]) >= len(short_runs) - 1
    if sys.platform.startswith("linux"):  # passages at a lower CPU priority than the short lane
        base = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        assert {r[3] for r in long_runs} == {min(19, base + 10)}
        beside = [s for s in short_runs if any(g[0] < s[0] < g[1] for g in long_runs)]
        assert beside and {s[3] for s in beside} == {base}  # a short pass beside a passage: the lane's

    want = model.encode(LONG + SHORT, return_dense=True, return_sparse=True, return_colbert_vecs=True)
    for i, out in enumerate(got):
        np.testing.assert_allclose(out.dense, want["dense_vecs"][i], atol=1e-5)
        np.testing.assert_allclose(out.colbert, want["colbert_vecs"][i], atol=1e-5)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="thread priorities are per thread on Linux")
def test_the_long_pass_session_threads_take_the_long_pass_priority(package_dir):
    """ONNX Runtime's intra-op threads of the long-pass session are created by
    ``prepare`` on a long-pass thread and keep its lower priority; the main session's
    stay at the server's (what lets a short pass take the cores from a passage)."""
    base = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    before = _threads()
    model = M3Model(package_dir, variant="fp32", intra_op_threads=2)
    engine = model.engine
    loaded = _threads()
    main_pool = set(loaded) - set(before)
    assert main_pool and {loaded[t] for t in main_pool} == {base}

    async def prepare():
        scheduler = Scheduler(max_queue=10, max_wait_ms=1, workers=2)
        scheduler.start()
        await scheduler.prepare(engine)
        now = _threads()
        await scheduler.close()
        return now

    seen = set(_threads())
    after = asyncio.run(prepare())
    new = {t: nice for t, nice in after.items() if t not in seen}
    # The long-pass thread itself, and the second session's pool thread(s).
    assert len(new) >= 2 and set(new.values()) == {min(19, base + 10)}, new
    assert engine.long_session is not None


def test_long_pass_nice_zero_keeps_one_priority(package_dir):
    model = M3Model(package_dir, variant="fp32", intra_op_threads=1)
    runs = _timed(model.engine, hold_long_s=0.0)
    asyncio.run(_serve(model, workers=2, long_nice=0))
    assert {r[3] for r in runs} == {os.getpriority(os.PRIO_PROCESS, threading.get_native_id())}


def test_one_worker_runs_everything_in_turn(package_dir):
    """With one worker there is no lane: passes never overlap, and short queries still go
    ahead of the passages queued before them (shortest first)."""
    model = M3Model(package_dir, variant="fp32")
    engine = model.engine
    runs = _timed(engine, hold_long_s=0.2)
    asyncio.run(_serve(model, workers=1))
    ordered = sorted(runs)
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(ordered))
    kinds = ["long" if r[2] > engine.max_batch_tokens else "short" for r in ordered]
    # The first passage was running when the queries came; they then overtook the other three.
    assert kinds == ["long"] + ["short"] * (len(kinds) - len(LONG)) + ["long"] * (len(LONG) - 1), kinds


def test_items_past_the_age_limit_go_oldest_first(package_dir):
    """Under saturation every item is old: those past ``starve_s`` then go in arrival
    order, so passages cannot be overtaken forever by a stream of short queries."""
    model = M3Model(package_dir, variant="fp32")
    engine = model.engine
    runs = _timed(engine, hold_long_s=0.15)

    async def serve():
        scheduler = Scheduler(max_queue=100, max_wait_ms=1, workers=1, starve_s=0.05)
        scheduler.start()
        outs = engine.outputs
        tasks = [asyncio.create_task(scheduler.encode(engine, [t], max_length=8192, outputs=outs)) for t in LONG]
        await asyncio.sleep(0.01)
        tasks += [asyncio.create_task(scheduler.encode(engine, [t], max_length=8192, outputs=outs)) for t in SHORT]
        await asyncio.gather(*tasks)
        await scheduler.close()

    asyncio.run(serve())
    kinds = ["long" if r[2] > engine.max_batch_tokens else "short" for r in sorted(runs)]
    # All four passages were queued before the queries and waited past the limit behind
    # the first: they go first; by length alone the queries would have overtaken them.
    assert kinds[: len(LONG)] == ["long"] * len(LONG), kinds


def test_old_items_still_share_passes_with_the_shortest(package_dir):
    """Past the age limit a pass leads with the oldest item, and its companions are the
    shortest that fit: queued as query, passage, query, passage, ..., the queries share
    passes (in age order each would run alone beside a passage that cannot join it)."""
    model = M3Model(package_dir, variant="fp32")
    engine = model.engine
    runs = _timed(engine, hold_long_s=0.0)
    texts = [t for pair in zip(SHORT, LONG + LONG[:2], strict=True) for t in pair]

    async def serve():
        scheduler = Scheduler(max_queue=100, max_wait_ms=200, workers=1, starve_s=0.0)
        scheduler.start()
        outs = engine.outputs
        got = await asyncio.gather(*(scheduler.encode(engine, [t], max_length=8192, outputs=outs) for t in texts))
        await scheduler.close()
        return [g[0] for g in got]

    got = asyncio.run(serve())
    short_passes = [r for r in runs if r[2] <= engine.max_batch_tokens]
    assert len(runs) == len(LONG) + 2 + len(short_passes) and len(short_passes) <= 2, runs
    want = model.encode(texts, return_dense=True)["dense_vecs"]
    np.testing.assert_allclose(np.stack([g.dense for g in got]), want, atol=1e-5)


def _busy(intervals, lo: float, hi: float) -> float:
    """Seconds of [lo, hi] covered by at least one of ``intervals``."""
    total, reach = 0.0, lo
    for start, end in sorted((max(a, lo), min(b, hi)) for a, b in intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def _lanes_beside_a_passage(model, long_share: float) -> tuple[float, float]:
    """One passage (held 0.8 s) under a stream of short queries that always has some
    queued (each short pass held 40 ms): (seconds the lanes were busy during the
    passage's pass after the first ``starve_s``, that window's length)."""
    engine = model.engine
    runs = _timed(engine, hold_long_s=0.8, hold_short_s=0.04)

    async def serve():
        scheduler = Scheduler(max_queue=100, max_wait_ms=1, workers=2, starve_s=0.1, long_share=long_share)
        scheduler.start()
        await scheduler.prepare(engine)
        outs = engine.outputs
        passage = asyncio.create_task(scheduler.encode(engine, [LONG[0]], max_length=8192, outputs=outs))
        await asyncio.sleep(0.02)
        queries: set[asyncio.Task] = set()
        while not passage.done():
            while len(queries) < 6:
                text = SHORT[len(queries) % len(SHORT)]
                queries.add(asyncio.create_task(scheduler.encode(engine, [text], max_length=8192, outputs=outs)))
            _, queries = await asyncio.wait(queries, timeout=0.01, return_when=asyncio.FIRST_COMPLETED)
        await asyncio.gather(passage, *queries)
        await scheduler.close()

    asyncio.run(serve())
    (long_run,) = [r for r in runs if r[2] > engine.max_batch_tokens]
    window = (long_run[0] + 0.1, long_run[1])
    shorts = [(r[0], r[1]) for r in runs if r[2] <= engine.max_batch_tokens]
    return _busy(shorts, *window), window[1] - window[0]


def test_a_stream_of_short_queries_leaves_a_passage_its_share(package_dir):
    """Passages run nicer than the lanes, so the lanes give way: once a passage's pass
    has run ``starve_s``, the lanes hold the cores at most ``long_share`` of the time
    since it began (here half; a lane pass that started inside the share may end past
    it). With the share at 1 the same stream keeps the lanes busy throughout."""
    model = M3Model(package_dir, variant="fp32", intra_op_threads=1)
    busy, window = _lanes_beside_a_passage(model, long_share=0.5)
    assert busy <= 0.5 * (window + 0.1) + 0.06, (busy, window)
    busy, window = _lanes_beside_a_passage(model, long_share=1.0)
    assert busy >= 0.85 * window, (busy, window)
