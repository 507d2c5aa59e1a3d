"""The server's scheduler on a real engine (tiny package), without HTTP: the short lane."""

from __future__ import annotations

import asyncio
import itertools
import os
import sys
import threading
import time

import numpy as np
from m3_runtime import M3Model
from m3_runtime.scheduler import Scheduler

LONG = ["long passage " * 150, "another long passage " * 120, "a third long one " * 140, "the fourth " * 200]
SHORT = [f"short query {i}" for i in range(6)]


def _timed(engine, hold_long_s: float):
    """Wraps ``engine.run`` (the scheduler's only way to the model): records each pass's
    start, end, padded tokens and the running thread's nice value, and holds long
    passes so that overlaps are decided by the scheduler, not by how fast the tiny
    model is."""
    real, runs, lock = engine.run, [], threading.Lock()

    def run(batch, outputs):
        start = time.perf_counter()
        if batch.input_ids.size > engine.max_batch_tokens:
            time.sleep(hold_long_s)
        out = real(batch, outputs)
        nice = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        with lock:
            runs.append((start, time.perf_counter(), batch.input_ids.size, nice))
        return out

    engine.run = run
    return runs


async def _serve(model, workers: int, **options):
    engine = model.engine
    scheduler = Scheduler(max_queue=100, max_wait_ms=5, workers=workers, **options)
    scheduler.start()
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


def test_one_worker_of_two_is_a_short_lane(package_dir):
    model = M3Model(package_dir, variant="fp32", intra_op_threads=1)
    engine = model.engine
    assert all(len(x) > engine.max_batch_tokens for x in engine.tokenize(LONG, 8192))
    runs = _timed(engine, hold_long_s=0.4)
    got = asyncio.run(_serve(model, workers=2))

    long_runs = [r for r in runs if r[2] > engine.max_batch_tokens]
    short_runs = [r for r in runs if r[2] <= engine.max_batch_tokens]
    assert len(long_runs) == len(LONG) and short_runs
    overlapping = [(a, b) for a in long_runs for b in long_runs if a is not b and a[0] < b[1] and b[0] < a[1]]
    assert not overlapping  # never two passages at once: one worker stays free for short queries
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
