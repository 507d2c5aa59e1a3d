"""Concurrent forward passes on the CPU: which form keeps both cores busy (issue: every core busy).

    python benchmarks/concurrency.py [PACKAGE] [--variant int8] [--repeats 3] [--memory]

Times, in interleaved passes (every configuration once per pass, so each ratio
compares neighbours on a VM that drifts 10-17% between runs), M3Model on one
package with all three outputs:

- ``seq``:      one session, ONNX Runtime's default threads, one run at a time (today)
- ``1t x N``:   one session with one intra-op thread, N runs at once from N threads
- ``Nt x N``:   one session with default threads, N runs at once
- ``1t x 1``:   one session with one intra-op thread, one run at a time: N times its
  tokens/s is what N one-thread runs could reach if they did not slow each other
  (shared caches, memory bandwidth), so the script also prints that bound per workload

on 64 short queries (5-20 words, several batches), 16 passages (120-250 words, each
its own batch under the CPU's 256-token budget) and one 2,048-token text (a lone
batch: concurrency cannot help it, threads can). ``--memory`` instead runs each
configuration on the queries in its own process and prints its peak RSS (VmHWM).
N is the number of CPUs here.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from run import _peak_mb, make_texts  # noqa: E402

N = os.cpu_count() or 2
# name: (intra-op threads, workers)
CONFIGS = {"seq": (0, 1), f"1t x {N}": (1, N), f"{N}t x {N}": (0, N), "1t x 1": (1, 1)}


def _model(package: Path, variant: str, config: str):
    from m3_runtime import M3Model

    threads, workers = CONFIGS[config]
    return M3Model(package, variant=variant, intra_op_threads=threads, workers=workers)  # type: ignore[arg-type]


def _workloads(model) -> dict[str, list[str]]:
    texts = make_texts(64, 16)
    long = model.tokenizer.encode(texts["long"], 2048)[0]
    texts["long"] = [model.tokenizer._tok.decode(long[1:-1])]
    return texts


def memory(package: Path, variant: str, config: str) -> None:
    model = _model(package, variant, config)
    texts = _workloads(model)["queries"]
    for _ in range(3):
        model.encode(texts, return_sparse=True, return_colbert_vecs=True)
    print(json.dumps({"config": config, "peak_mb": round(_peak_mb(), 1)}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("package", type=Path, nargs="?", default=HERE / ".cache" / "bge-m3-random-pkg")
    parser.add_argument("--variant", default="int8")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--memory", action="store_true")
    parser.add_argument("--memory-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_worker:
        memory(args.package, args.variant, args.memory_worker)
        return
    if args.memory:
        for config in CONFIGS:
            cmd = [sys.executable, __file__, str(args.package), "--variant", args.variant, "--memory-worker", config]
            print(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip())
        return

    models = {c: _model(args.package, args.variant, c) for c in CONFIGS}
    texts = _workloads(models["seq"])
    tokens = {w: sum(len(x) for x in models["seq"].tokenizer.encode(t, 8192)) for w, t in texts.items()}
    every = {"return_sparse": True, "return_colbert_vecs": True}
    for m in models.values():
        m.encode(texts["queries"][:4], **every)  # warm-up
    speed: dict[tuple[str, str], list[float]] = {}
    for rep in range(args.repeats):
        for workload, batch in texts.items():
            names = list(models)
            for config in names[rep % len(names) :] + names[: rep % len(names)]:  # no config always first
                model = models[config]
                start = time.perf_counter()
                model.encode(batch, **every)
                tps = tokens[workload] / (time.perf_counter() - start)
                speed.setdefault((workload, config), []).append(tps)
                print(f"pass {rep + 1} {workload:8} {config:13} {tps:8.0f} tokens/s", flush=True)
    print(f"\n{'workload':9} {'config':13} {'tokens/s':>9} {'x seq (median of passes, min-max)':>36}")
    for workload in texts:
        base = speed[(workload, "seq")]
        for config in CONFIGS:
            ratios = [a / b for a, b in zip(speed[(workload, config)], base, strict=True)]
            print(
                f"{workload:9} {config:13} {statistics.median(speed[(workload, config)]):9.0f} "
                f"{statistics.median(ratios):8.2f}x ({min(ratios):.2f}-{max(ratios):.2f})"
            )
    print(f"\nbound for 1t x {N} if the runs did not slow each other ({N} x 1t x 1, per pass):")
    for workload in texts:
        bound = [N * a / b for a, b in zip(speed[(workload, "1t x 1")], speed[(workload, "seq")], strict=True)]
        got = [a / (N * b) for a, b in zip(speed[(workload, f"1t x {N}")], speed[(workload, "1t x 1")], strict=True)]
        print(
            f"{workload:9} {statistics.median(bound):.2f}x seq ({min(bound):.2f}-{max(bound):.2f}); "
            f"1t x {N} reaches {statistics.median(got):.0%} of it"
        )


if __name__ == "__main__":
    main()
