"""Peak resident memory of a query workload, and the package's size on disk, per package.

    python benchmarks/memory_int8.py [PACKAGE ...] [--variant int8] [--queries 64] [--repeats 1]

For each package (default: the benchmark's ``benchmarks/.cache/bge-m3-random-pkg``), a
fresh process imports ``m3_runtime``, loads the variant, encodes one warm-up text, then
``--queries`` short queries (the benchmark's own, ``run.make_texts``) in one call with
all three outputs, ``--repeats`` times; it prints the variant's files on disk, the
resident memory after import, after load and after the queries, and the process's peak
(VmHWM from /proc/self/status: not ``ru_maxrss``, which Linux carries across exec).
``RssFile`` is the part backed by the package's files (weights ONNX Runtime maps rather
than copies: only the pages a run touched count), ``RssAnon`` the heap. A memory
measurement, not a timing one: it is fine to run beside other work. The environment
reaches the measured process, so allocator settings can be compared as they are, e.g.
``MALLOC_MMAP_THRESHOLD_=131072 python benchmarks/memory_int8.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_PACKAGE = HERE / ".cache" / "bge-m3-random-pkg"
FIELDS = ("VmRSS", "RssAnon", "RssFile", "VmHWM")


def _status() -> dict[str, float]:
    """The ``FIELDS`` of /proc/self/status in MB."""
    out: dict[str, float] = {}
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key in FIELDS:
                out[key] = int(value.split()[0]) / 1024
    return out


def worker(package: Path, variant: str, n_queries: int, repeats: int) -> dict:
    """Runs in its own process: the figures for one package."""
    sys.path.insert(0, str(HERE))
    from run import make_texts  # the benchmark's queries, same seed

    queries = make_texts(n_queries, 0)["queries"]
    before_import = _status()
    from m3_runtime import M3Model

    imported = _status()
    model = M3Model(package, variant=variant)
    loaded = _status()
    model.encode(["warm-up"], return_dense=True, return_sparse=True, return_colbert_vecs=True)
    tokens = sum(len(x) for x in model.tokenizer.encode(queries, 8192))
    for _ in range(repeats):
        out = model.encode(queries, return_dense=True, return_sparse=True, return_colbert_vecs=True)
        del out
    done = _status()
    return {
        "package": str(package),
        "variant": variant,
        "queries": len(queries),
        "tokens": tokens,
        "repeats": repeats,
        "rss_before_import_mb": before_import["VmRSS"],
        "rss_after_import_mb": imported["VmRSS"],
        "rss_after_load_mb": loaded["VmRSS"],
        "rss_after_queries_mb": done["VmRSS"],
        "rss_anon_after_queries_mb": done["RssAnon"],
        "rss_file_after_queries_mb": done["RssFile"],
        "peak_rss_mb": done["VmHWM"],
    }


def package_size_mb(package: Path, variant: str) -> float:
    from m3_runtime.contract import data_file, graph_file

    return sum((package / f).stat().st_size for f in (graph_file(variant), data_file(variant))) / 1e6  # type: ignore[arg-type]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("packages", nargs="*", type=Path, default=[DEFAULT_PACKAGE])
    parser.add_argument("--variant", default="int8")
    parser.add_argument("--queries", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=1, help="passes over the queries (the benchmark does 3)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.repeats < 1 or args.queries < 1:
        parser.error(f"--queries and --repeats must be at least 1, got {args.queries} and {args.repeats}")
    if args.worker:
        print(json.dumps(worker(args.worker, args.variant, args.queries, args.repeats)))
        return

    results = []
    for package in args.packages:
        if not (package / "manifest.json").is_file():
            parser.error(f"{package} is not a model package (no manifest.json)")
        cmd = [sys.executable, __file__, "--worker", str(package), "--variant", args.variant]
        cmd += ["--queries", str(args.queries), "--repeats", str(args.repeats)]
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
        proc = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        res["size_on_disk_mb"] = package_size_mb(package, args.variant)
        results.append(res)
        print(
            f"{package} ({args.variant}): {res['size_on_disk_mb']:.1f} MB on disk; "
            f"{res['queries']} queries ({res['tokens']} tokens) x {res['repeats']}, all three outputs\n"
            f"  RSS after import {res['rss_after_import_mb']:.0f} MB, after load {res['rss_after_load_mb']:.0f} MB, "
            f"after the queries {res['rss_after_queries_mb']:.0f} MB "
            f"(heap {res['rss_anon_after_queries_mb']:.0f} MB, file-backed {res['rss_file_after_queries_mb']:.0f} MB)\n"
            f"  peak RSS (VmHWM) {res['peak_rss_mb']:.0f} MB",
            flush=True,
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
