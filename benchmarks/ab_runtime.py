"""The same package through two checkouts of the runtime, in interleaved passes.

    python benchmarks/ab_runtime.py OLD_SRC [NEW_SRC] [--package PKG] [--variants fp32,int8] [--repeats 5]
                                    [--env-new NAME=VALUE ...] [--option-new NAME=VALUE ...]

``OLD_SRC``/``NEW_SRC`` are ``runtime/src`` folders (e.g. of a ``git worktree`` at the
commit before a refactor; ``NEW_SRC`` defaults to this checkout's). Each side runs in
its own long-lived process, loaded once; pass ``i`` of every side runs before pass
``i + 1`` of any, so each ratio compares neighbouring passes on a VM that drifts
10-17% between runs. Workloads as in ``run.py`` (64 queries, 16 passages), all three
outputs. Prints tokens/s per side and the NEW/OLD ratio per pass (median, min-max).
``--env-new`` sets environment variables for the NEW side only: with ``NEW_SRC`` the same
checkout, it times a setting such as ``MALLOC_MMAP_THRESHOLD_=131072`` against none.
``--option-new`` passes an ``M3Model`` argument (an integer) to the NEW side only, e.g.
``--option-new workers=2 --option-new intra_op_threads=1`` against an older checkout's
default.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

WORKER = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
from m3_runtime import M3Model
model = M3Model(sys.argv[2], variant=sys.argv[3], **json.loads(sys.argv[5]))
texts = json.loads(open(sys.argv[4], encoding="utf-8").read())
tokens = {w: sum(len(x) for x in model.tokenizer.encode(t, 8192)) for w, t in texts.items()}
model.encode(texts["queries"][:4], return_sparse=True, return_colbert_vecs=True)
print(json.dumps({"ready": str(sys.modules["m3_runtime"].__file__)}), flush=True)
for line in sys.stdin:
    w = line.strip()
    start = time.perf_counter()
    model.encode(texts[w], return_sparse=True, return_colbert_vecs=True)
    print(json.dumps({"tps": tokens[w] / (time.perf_counter() - start)}), flush=True)
"""


def main() -> None:
    sys.path.insert(0, str(HERE))
    from run import make_texts

    parser = argparse.ArgumentParser()
    parser.add_argument("old", type=Path)
    parser.add_argument("new", type=Path, nargs="?", default=HERE.parent / "runtime" / "src")
    parser.add_argument("--package", type=Path, default=HERE / ".cache" / "bge-m3-random-pkg")
    parser.add_argument("--variants", default="fp32,int8")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--env-new", action="append", default=[], metavar="NAME=VALUE", help="environment of the NEW side only"
    )
    parser.add_argument(
        "--option-new", action="append", default=[], metavar="NAME=VALUE", help="M3Model argument, NEW side only"
    )
    args = parser.parse_args()

    def pairs(items: list[str], flag: str, integer: bool = False) -> dict[str, str]:
        out = {}
        for item in items:
            name, sep, value = item.partition("=")
            if not sep or not name or (integer and not value.lstrip("-").isdigit()):
                parser.error(f"{flag} takes NAME={'INTEGER' if integer else 'VALUE'}, got {item!r}")
            out[name] = value
        return out

    options_new = {k: int(v) for k, v in pairs(args.option_new, "--option-new", integer=True).items()}
    env_new = {**os.environ, **pairs(args.env_new, "--env-new")}
    texts_file = Path(tempfile.mkdtemp()) / "texts.json"
    texts = make_texts(64, 16)
    texts_file.write_text(json.dumps({w: texts[w] for w in ("queries", "passages")}), encoding="utf-8")
    for variant in args.variants.split(","):
        sides = {}
        for name, src in (("old", args.old), ("new", args.new)):
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    WORKER,
                    str(src.resolve()),
                    str(args.package),
                    variant,
                    str(texts_file),
                    json.dumps(options_new if name == "new" else {}),
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                env=env_new if name == "new" else None,
            )
            assert proc.stdout is not None and proc.stdin is not None
            print(f"{variant} {name}: {json.loads(proc.stdout.readline())['ready']}", flush=True)
            sides[name] = proc
        speed: dict[tuple[str, str], list[float]] = {}
        for rep in range(args.repeats):
            for workload in ("queries", "passages"):
                for name, proc in sides.items():
                    proc.stdin.write(workload + "\n")  # type: ignore[union-attr]
                    proc.stdin.flush()  # type: ignore[union-attr]
                    tps = json.loads(proc.stdout.readline())["tps"]  # type: ignore[union-attr]
                    speed.setdefault((workload, name), []).append(tps)
                    print(f"pass {rep + 1} {variant} {workload:8} {name} {tps:8.1f} tokens/s", flush=True)
        for proc in sides.values():
            proc.stdin.close()  # type: ignore[union-attr]
            proc.wait()
        for workload in ("queries", "passages"):
            ratios = [n / o for n, o in zip(speed[(workload, "new")], speed[(workload, "old")], strict=True)]
            print(
                f"{variant} {workload:8} old {statistics.median(speed[(workload, 'old')]):8.1f} "
                f"new {statistics.median(speed[(workload, 'new')]):8.1f} tokens/s; new/old "
                f"{statistics.median(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f})",
                flush=True,
            )
        time.sleep(0.5)


if __name__ == "__main__":
    main()
