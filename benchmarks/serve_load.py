"""Load test of ``m3 serve`` over loopback, against direct ``encode`` in the same run.

    python benchmarks/serve_load.py PACKAGE [--variant int8] [--requests 96] [--concurrency 1,8,32]

1. Direct: ``M3Model.encode`` on all request texts, in this process: tokens/s.
2. Server: starts ``m3 serve PACKAGE`` on a free loopback port, then for each
   concurrency level sends the same fixed set of ``/encode`` requests (all three
   outputs, ColBERT as base64 float32 as a production client would take it; a mix
   of short queries and passages) with that many in flight, bounded
   in count and time. Every response is checked against the direct output
   (dense within 1e-4, same lexical keys); any error or mismatch fails the run.
3. Prints throughput (tokens/s, and the ratio to direct), p50/p95/p99 latency per
   level, the p99 of short queries at concurrency 8 against a lone short query's
   latency, and writes JSON.

Targets of the server issue: >= 80% of direct throughput at concurrency 32; short
query p99 at concurrency 8 < 3x its single-request latency.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def make_requests(n: int) -> list[list[str]]:
    from run import make_texts

    texts = make_texts(n, max(4, n // 6))
    out = []
    for i in range(n):
        if i % 6 == 5:  # one request in six carries a passage
            out.append([texts["passages"][(i // 6) % len(texts["passages"])]])
        else:
            out.append([texts["queries"][i]])
    return out


async def run_level(url: str, requests: list[list[str]], concurrency: int, deadline_s: float) -> dict:
    import httpx

    latencies: list[tuple[float, bool]] = []
    results: list[dict | None] = [None] * len(requests)
    sem = asyncio.Semaphore(concurrency)
    start = time.perf_counter()
    async with httpx.AsyncClient(timeout=deadline_s) as client:

        async def one(i: int) -> None:
            async with sem:
                t0 = time.perf_counter()
                res = await client.post(
                    url + "/encode",
                    json={"texts": requests[i], "sparse": True, "colbert": True, "colbert_format": "base64-float32"},
                )
                res.raise_for_status()
                latencies.append((time.perf_counter() - t0, len(requests[i][0]) < 200))
                results[i] = res.json()

        await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(len(requests)))), deadline_s)
    wall = time.perf_counter() - start
    lat = np.array([x for x, _ in latencies])
    short = np.array([x for x, s in latencies if s])
    return {
        "concurrency": concurrency,
        "wall_s": wall,
        "p50_ms": float(np.percentile(lat, 50) * 1e3),
        "p95_ms": float(np.percentile(lat, 95) * 1e3),
        "p99_ms": float(np.percentile(lat, 99) * 1e3),
        "short_p99_ms": float(np.percentile(short, 99) * 1e3),
        "short_p50_ms": float(np.percentile(short, 50) * 1e3),
        "results": results,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("package", type=Path)
    parser.add_argument("--variant", default=None)
    parser.add_argument("--requests", type=int, default=96)
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--deadline", type=float, default=600, help="seconds allowed per level")
    parser.add_argument("--json", type=Path, default=HERE / "serve_results.json")
    args = parser.parse_args()

    from m3_runtime import M3Model
    from m3_runtime.testing import free_port, wait_until_healthy

    requests = make_requests(args.requests)
    flat = [t for r in requests for t in r]
    model = M3Model(args.package, variant=args.variant)
    tokens = sum(len(x) for x in model.tokenizer.encode(flat, model.passage_max_length))
    model.encode(["warm-up"], return_sparse=True, return_colbert_vecs=True)
    t0 = time.perf_counter()
    direct = model.encode(flat, return_sparse=True, return_colbert_vecs=True)
    direct_tps = tokens / (time.perf_counter() - t0)
    variant = model.variant
    del model
    print(f"direct encode ({variant}): {tokens} tokens, {direct_tps:.1f} tokens/s", flush=True)

    port = free_port()
    cmd = [
        str(Path(sys.executable).parent / "m3"),
        "serve",
        str(args.package),
        "--port",
        str(port),
        "--variant",
        variant,
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    levels = []
    try:
        wait_until_healthy(url, 300)
        for c in (int(x) for x in args.concurrency.split(",")):
            level = asyncio.run(run_level(url, requests, c, args.deadline))
            k = 0
            for rows in level.pop("results"):
                for row in rows["results"]:
                    if np.abs(np.array(row["dense"]) - direct["dense_vecs"][k]).max() > 1e-4:
                        raise SystemExit(f"response for text {k} differs from direct encode")
                    if row["sparse"].keys() != direct["lexical_weights"][k].keys():
                        raise SystemExit(f"lexical weights of text {k} differ from direct encode")
                    k += 1
            level["tokens_per_s"] = tokens / level["wall_s"]
            level["ratio_vs_direct"] = level["tokens_per_s"] / direct_tps
            levels.append(level)
            print(
                f"concurrency {c:3}: {level['tokens_per_s']:8.1f} tokens/s ({level['ratio_vs_direct']:.2f}x direct); "
                f"latency p50 {level['p50_ms']:.0f} ms, p95 {level['p95_ms']:.0f}, p99 {level['p99_ms']:.0f}; "
                f"short queries p50 {level['short_p50_ms']:.0f}, p99 {level['short_p99_ms']:.0f}",
                flush=True,
            )
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    single = next((lv for lv in levels if lv["concurrency"] == 1), None)
    eight = next((lv for lv in levels if lv["concurrency"] == 8), None)
    summary = {"variant": variant, "tokens": tokens, "direct_tokens_per_s": direct_tps, "levels": levels}
    if single and eight:
        summary["short_p99_c8_over_single_p50"] = eight["short_p99_ms"] / single["short_p50_ms"]
        print(f"short-query p99 at concurrency 8 / lone short query: {summary['short_p99_c8_over_single_p50']:.2f}x")
    args.json.write_text(json.dumps(summary, indent=2))
    print(f"wrote {args.json} (0 errors, every response matched direct encode)")


if __name__ == "__main__":
    main()
