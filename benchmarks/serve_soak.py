"""Soak test of ``m3 serve``: concurrency 32 of mixed requests for N minutes, every answer checked.

    python benchmarks/serve_soak.py PACKAGE [--minutes 20] [--variant int8] [--workers N]
        [--intra-op-threads N] [--concurrency 32] [--json benchmarks/soak_results.json]

Starts ``m3 serve PACKAGE`` on a free loopback port and keeps ``--concurrency`` requests
in flight for ``--minutes``, each drawn at random from:

- ``/encode`` (70%): 1-4 texts from a pool of short queries (5-20 words) and passages
  (120-250 words), 4:1, all three outputs; ColBERT as base64 float32 or nested lists,
  sparse as ``{id: weight}`` or ``{indices, values}``;
- ``/v1/embeddings`` (15%): 1-4 texts, ``float`` or ``base64``;
- ``/score`` (15%): one of a fixed set of 1-3 (query, passage) pairs.

Every answer is checked against this process's direct ``M3Model`` outputs (dense and
ColBERT within 1e-5, same lexical keys with weights within 1e-5, token counts equal,
``compute_score`` within 1e-5 absolute and relative). The server's resident memory
(``VmRSS`` of its process, ``/proc/PID/status``) is sampled every ``--rss-every`` s; the
growth is that of the envelope: the highest sample in the last ``--window-s`` (60) of the
load over the highest in the first ``--window-s`` after the warm-up (``--warmup-s``,
default a fifth of the run, at most 300 s: with two short lanes and a passage in flight
the envelope still rose over minutes 2-4 of the 20-min runs). The server's CPU sessions give their free
memory back after every forward pass, so one sample reads whatever was in flight at
that instant (samples 495-665 MB in one 20-min run); the sample after the warm-up and
the last one are printed too. Targets: zero wrong answers, zero
5xx (counted by this client and by the server's own ``/metrics``), zero dropped
connections, RSS growth < 5%. Prints a line a minute, a summary, writes JSON, and exits
1 if a target is missed.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from serve_load import ATOL, Pool, Server, check_row, client, direct_reference, make_texts, rss_mb  # noqa: E402

RSS_GROWTH_TARGET = 0.05
MIX = (("encode", 0.70), ("embeddings", 0.15), ("score", 0.15))
SCORE_KEYS = ("colbert", "sparse", "dense", "sparse+dense", "colbert+sparse+dense")


class Soak:
    def __init__(self, pool: Pool, pair_sets: list[list[tuple[int, int]]], scores: list[dict], seed: int) -> None:
        self.pool, self.pair_sets, self.scores = pool, pair_sets, scores
        self.rng = np.random.default_rng(seed)
        self.counts: dict[str, int] = {}  # "endpoint status" -> requests
        self.wrong: list[str] = []  # answers that differ from the direct outputs
        self.failed: list[str] = []  # non-200 answers (the first 1,000)
        self.dropped: list[str] = []
        self.latency: dict[str, list[float]] = {"short": [], "long": [], "score": []}

    def texts(self) -> list[int]:
        """1-4 pool indices (1 most often), short and long 4:1 as in the pool."""
        n = int(self.rng.choice([1, 1, 1, 2, 3, 4]))
        return [int(k) for k in self.rng.integers(0, len(self.pool.texts), n)]

    def build(self) -> tuple[str, str, dict, Any]:
        """(kind, path, body, what the check needs)."""
        kind = str(self.rng.choice([k for k, _ in MIX], p=[p for _, p in MIX]))
        if kind == "encode":
            ids = self.texts()
            fmt = str(self.rng.choice(["base64-float32"] * 4 + ["list"]))
            sparse_fmt = str(self.rng.choice(["dict", "indices"]))
            body = {
                "texts": [self.pool.texts[k] for k in ids],
                "sparse": True,
                "colbert": True,
                "colbert_format": fmt,
                "sparse_format": sparse_fmt,
            }
            return kind, "/encode", body, ids
        if kind == "embeddings":
            ids = self.texts()
            body = {
                "input": [self.pool.texts[k] for k in ids],
                "encoding_format": str(self.rng.choice(["float", "base64"])),
            }
            return kind, "/v1/embeddings", body, ids
        s = int(self.rng.integers(0, len(self.pair_sets)))
        pairs = [[self.pool.texts[q], self.pool.texts[p]] for q, p in self.pair_sets[s]]
        return kind, "/score", {"pairs": pairs}, s

    def check(self, kind: str, data: dict, need: Any) -> str:
        pool = self.pool
        if kind == "encode":
            rows = data.get("results", [])
            if len(rows) != len(need):
                return f"/encode: {len(rows)} results for {len(need)} texts"
            if data.get("usage", {}).get("tokens") != int(pool.tokens[need].sum()):
                return f"/encode: usage.tokens {data.get('usage')} != {int(pool.tokens[need].sum())}"
            return next((p for p in (check_row(r, pool, k) for r, k in zip(rows, need, strict=True)) if p), "")
        if kind == "embeddings":
            rows = data.get("data", [])
            if [r.get("index") for r in rows] != list(range(len(need))):
                return f"/v1/embeddings: indices {[r.get('index') for r in rows]} for {len(need)} texts"
            if data.get("usage", {}).get("prompt_tokens") != int(pool.tokens[need].sum()):
                return f"/v1/embeddings: usage {data.get('usage')} != {int(pool.tokens[need].sum())} tokens"
            for r, k in zip(rows, need, strict=True):
                vec = r["embedding"]
                got = (
                    np.frombuffer(base64.b64decode(vec), "<f4") if isinstance(vec, str) else np.asarray(vec, np.float32)
                )
                if got.shape != pool.dense[k].shape or np.abs(got - pool.dense[k]).max() > ATOL:
                    return f"/v1/embeddings: text {k}: dense differs from direct encode"
            return ""
        want = self.scores[need]
        for key in SCORE_KEYS:
            got = np.asarray(data.get(key, []), dtype=np.float64)
            if got.shape != (len(want[key]),) or not np.allclose(got, want[key], rtol=ATOL, atol=ATOL):
                return f"/score set {need}: {key} {got.tolist()} != compute_score {want[key]}"
        return ""

    async def worker(self, c: Any, url: str, stop_at: float) -> None:
        import httpx

        while time.perf_counter() < stop_at:
            kind, path, body, need = self.build()
            t0 = time.perf_counter()
            try:
                res = await c.post(url + path, json=body)
            except httpx.HTTPError as exc:
                self.dropped.append(f"{path}: {type(exc).__name__}: {exc}")
                self.counts[f"{path} transport-error"] = self.counts.get(f"{path} transport-error", 0) + 1
                continue
            seconds = time.perf_counter() - t0
            key = f"{path} {res.status_code}"
            self.counts[key] = self.counts.get(key, 0) + 1
            if res.status_code != 200:
                if len(self.failed) < 1000:
                    self.failed.append(f"{path}: HTTP {res.status_code}: {res.text[:200]}")
                continue
            problem = self.check(kind, res.json(), need)
            if problem:
                self.wrong.append(problem)
            if kind == "score":
                self.latency["score"].append(seconds)
            else:
                self.latency["long" if self.pool.long[need].any() else "short"].append(seconds)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def status_count(self, prefix: str) -> int:
        return sum(n for k, n in self.counts.items() if k.rsplit(" ", 1)[1].startswith(prefix))


async def soak(
    soak: Soak, server: Server, *, seconds: float, concurrency: int, warmup_s: float, rss_every: float
) -> dict[str, Any]:
    start = time.perf_counter()
    stop_at = start + seconds
    rss: list[tuple[float, float]] = [(0.0, rss_mb(server.pid))]
    warm: tuple[float, float] | None = None

    async def monitor() -> None:
        nonlocal warm
        last_line, last_total = start, 0
        while time.perf_counter() < stop_at:
            await asyncio.sleep(min(rss_every, max(0.0, stop_at - time.perf_counter())))
            now = time.perf_counter() - start
            rss.append((now, rss_mb(server.pid)))
            if warm is None and now >= warmup_s:
                warm = rss[-1]
            if time.perf_counter() - last_line >= 60:
                rate = (soak.total - last_total) / (time.perf_counter() - last_line)
                last_line, last_total = time.perf_counter(), soak.total
                print(
                    f"  {now / 60:5.1f} min: {soak.total} requests ({rate:.1f}/s), {len(soak.wrong)} wrong, {len(soak.failed)} non-200, "
                    f"{len(soak.dropped)} dropped, server RSS {rss[-1][1]:.0f} MB",
                    flush=True,
                )

    async with client(max(120.0, seconds)) as c:
        watching = asyncio.create_task(monitor())
        await asyncio.gather(*(soak.worker(c, server.url, stop_at) for _ in range(concurrency)))
        await watching
        end = (time.perf_counter() - start, rss_mb(server.pid))
        rss.append(end)
        metrics = (await c.get(server.url + "/metrics")).text
    server_5xx = 0
    for line in metrics.splitlines():
        if line.startswith("m3_requests_total{") and 'status="5' in line:
            server_5xx += int(float(line.rsplit(" ", 1)[1]))
    return {"wall_s": end[0], "rss": rss, "warm": warm or rss[0], "end": end, "server_5xx": server_5xx}


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("package", type=Path)
    parser.add_argument("--minutes", type=float, default=20)
    parser.add_argument("--variant", default=None)
    Server.add_arguments(parser)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--texts", type=int, default=200, help="texts in the pool (a passage in every five)")
    parser.add_argument("--warmup-s", type=float, default=None, help="default: a fifth of the run, at most 300 s")
    parser.add_argument("--rss-every", type=float, default=5.0, help="seconds between RSS samples")
    parser.add_argument("--window-s", type=float, default=60.0, help="seconds of samples whose highest is compared")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=HERE / "soak_results.json")
    args = parser.parse_args()
    seconds = args.minutes * 60
    if seconds <= 0 or args.concurrency < 1 or args.texts < 5:
        parser.error("--minutes must be > 0, --concurrency >= 1, --texts >= 5")
    warmup_s = min(300.0, seconds / 5) if args.warmup_s is None else args.warmup_s
    if not 0 <= warmup_s < seconds:
        parser.error(f"--warmup-s must be in [0, {seconds:g}), got {warmup_s:g}")
    if args.window_s <= 0 or args.rss_every <= 0:
        parser.error(f"--window-s and --rss-every must be > 0, got {args.window_s:g} and {args.rss_every:g}")

    from m3_runtime import M3Model

    texts, long = make_texts(args.texts)
    model = M3Model(args.package, variant=args.variant)
    variant = model.variant
    pool, _ = direct_reference(model, texts, long)
    rng = np.random.default_rng(args.seed + 1)
    short_ids, long_ids = pool.short_ids, pool.long_ids
    pair_sets = [
        [(int(rng.choice(short_ids)), int(rng.choice(long_ids if rng.random() < 0.7 else short_ids))) for _ in range(n)]
        for n in rng.integers(1, 4, size=24)
    ]
    scores = [model.compute_score([(texts[q], texts[p]) for q, p in s]) for s in pair_sets]
    del model
    print(
        f"reference ({variant}): {len(texts)} texts ({int(long.sum())} passages), {len(pair_sets)} score sets",
        flush=True,
    )

    runner = Soak(pool, pair_sets, scores, args.seed)
    server = Server.from_args(args, variant)
    with server:
        print(f"soak: concurrency {args.concurrency} for {args.minutes:g} min (warm-up {warmup_s:g} s)", flush=True)
        run = asyncio.run(
            soak(
                runner,
                server,
                seconds=seconds,
                concurrency=args.concurrency,
                warmup_s=warmup_s,
                rss_every=args.rss_every,
            )
        )
        alive = server.proc is not None and server.proc.poll() is None

    warm_mb, end_mb = run["warm"][1], run["end"][1]
    warm_s, end_s = run["warm"][0], run["end"][0]
    first = [m for t, m in run["rss"] if warm_s <= t < warm_s + args.window_s]
    last = [m for t, m in run["rss"] if t >= end_s - args.window_s]
    growth = max(last) / max(first) - 1
    client_5xx = runner.status_count("5")
    non_200 = runner.total - runner.status_count("200") - len(runner.dropped)
    wrong_answers = len(runner.wrong)
    lat = {k: np.asarray(v) * 1e3 for k, v in runner.latency.items()}
    latency = {
        k: {"n": len(v), **({f"p{q}_ms": float(np.percentile(v, q)) for q in (50, 95, 99)} if len(v) else {})}
        for k, v in lat.items()
    }
    targets = {
        "wrong_answers": {"value": wrong_answers, "target": 0, "met": wrong_answers == 0},
        "http_5xx_client": {"value": client_5xx, "target": 0, "met": client_5xx == 0},
        "http_5xx_server_metrics": {"value": run["server_5xx"], "target": 0, "met": run["server_5xx"] == 0},
        "other_non_200": {"value": non_200 - client_5xx, "target": 0, "met": non_200 == client_5xx},
        "dropped_connections": {"value": len(runner.dropped), "target": 0, "met": not runner.dropped},
        "rss_growth": {"value": growth, "target": RSS_GROWTH_TARGET, "met": growth < RSS_GROWTH_TARGET},
        "server_alive_at_end": {"value": int(alive), "target": 1, "met": alive},
    }
    summary = {
        "variant": variant,
        "package": str(args.package),
        "server": {"workers": args.workers, "intra_op_threads": args.intra_op_threads, "serve_args": args.serve_args},
        "cpus": os.cpu_count(),
        "minutes": args.minutes,
        "concurrency": args.concurrency,
        "wall_s": run["wall_s"],
        "requests": runner.total,
        "requests_per_s": runner.total / run["wall_s"],
        "by_endpoint_and_status": dict(sorted(runner.counts.items())),
        "latency": latency,
        "rss_mb": {
            "start": run["rss"][0][1],
            "after_warmup": warm_mb,
            "warmup_at_s": run["warm"][0],
            "end": end_mb,
            "max": max(m for _, m in run["rss"]),
            "window_s": args.window_s,
            "first_window_max": max(first),
            "last_window_max": max(last),
            "growth": growth,
            "growth_sample_to_sample": end_mb / warm_mb - 1,
            "series": [[round(t, 1), round(m, 1)] for t, m in run["rss"]],
        },
        "targets": targets,
        "problems": [*runner.wrong[:50], *runner.failed[:50], *runner.dropped[:50]],
    }
    args.json.write_text(json.dumps(summary, indent=2))

    print(
        f"{runner.total} requests in {run['wall_s']:.0f} s ({summary['requests_per_s']:.1f}/s): "
        + ", ".join(f"{k}: {n}" for k, n in sorted(runner.counts.items()))
    )
    for k, v in latency.items():
        if v["n"]:
            print(f"  {k}: p50 {v['p50_ms']:.0f} ms, p95 {v['p95_ms']:.0f}, p99 {v['p99_ms']:.0f} (n {v['n']})")
    print(
        f"server RSS: {summary['rss_mb']['start']:.0f} MB at start, {warm_mb:.0f} MB after warm-up ({run['warm'][0]:.0f} s), "
        f"{end_mb:.0f} MB at the end, max {summary['rss_mb']['max']:.0f}; highest in the first {args.window_s:g} s "
        f"after warm-up {max(first):.0f} MB, in the last {args.window_s:g} s {max(last):.0f} MB: "
        f"growth {growth * 100:+.2f}%"
    )
    print("targets:")
    for name, t in targets.items():
        print(
            f"  {name}: {t['value']:.4g} (target {'<' if name == 'rss_growth' else ''}{t['target']:g}): "
            f"{'met' if t['met'] else 'NOT met'}"
        )
    for line in summary["problems"][:10]:
        print("  " + line)
    print(f"wrote {args.json}")
    if not all(t["met"] for t in targets.values()):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
