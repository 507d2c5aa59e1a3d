"""OpenVINO's own runtime against the kit's int8 on the CPU, in interleaved passes (issue 23, option a).

    PYTHONPATH=runtime/src /work/venv-ov/bin/python benchmarks/openvino_cpu.py PACKAGE OV_DIR
        [--engines int8,ov:int8_sym:32] [--queries 64] [--passages 16] [--long] [--repeats 5]
        [--warmup 1] [--bound-seconds 2] [--json PATH]

``PACKAGE``: the kit's package (full-size BGE-M3); ``OV_DIR``: the IRs of
``openvino_model.py convert`` made from the same checkpoint. Engines, each in its own
long-lived process, loaded once:

- ``VARIANT[:NAME=VALUE]...``: ``M3Model(PACKAGE, variant=VARIANT, **options)``, e.g.
  ``int8`` (its default: one run at a time, ONNX Runtime's thread count) or
  ``int8:workers=2:intra_op_threads=1``;
- ``ov:MODE:GROUP[:threads=N]``: ``openvino_model.OVEncoder`` on ``OV_DIR/ov-MODE/model.xml``,
  ``DYNAMIC_QUANTIZATION_GROUP_SIZE=GROUP``, ``N`` inference threads (default 2), one stream.

The first engine is the reference of every ratio. Workloads are ``run.py``'s
(``make_texts``: ``--queries`` short queries, ``--passages`` passages, with ``--long`` one
text truncated at 8,192 tokens), all three outputs, the kit's batch plan for both runtimes.
Each workload gets ``--warmup`` untimed passes per engine (OpenVINO builds its kernels per
new shape), then ``--repeats`` timed passes, interleaved (pass i of every engine, in
alternating order, before pass i + 1 of any), so every ratio is taken pass by pass between
neighbours: median and min-max. Before and after the passes ``gemm_bound.rate`` times bare
uint8 x int8 ``MatMulInteger`` (M x 1024 x 4096, M = 64, 256, 1024, two threads) for
``--bound-seconds`` each (0: skipped); the int8 products' bound in tokens/s is the best of
them over BGE-M3's 0.604 GOP per token, as in issue 23, and each engine's share of it is printed.
Run it alone on the machine (``flock -x /tmp/coord/timing.lock`` here).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from run import _parse_value, _peak_mb, _rss_mb, make_texts  # noqa: E402

MAX_LENGTH = 8192
ENV = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}


def parse_engine(spec: str) -> tuple[str, dict[str, Any]]:
    """``"ov:int8_sym:32:threads=2"`` -> ``("ov", {"mode": "int8_sym", "group_size": 32, "threads": 2})``;
    ``"int8:workers=2"`` -> ``("int8", {"workers": 2})``."""
    head, *rest = spec.split(":")
    options: dict[str, Any] = {}
    if head == "ov":
        if len(rest) < 2 or "=" in rest[0] or "=" in rest[1]:
            raise ValueError(f"engine {spec!r}: expected ov:MODE:GROUP[:threads=N]")
        options = {"mode": rest[0], "group_size": int(rest[1]), "threads": 2}
        rest = rest[2:]
    for item in rest:
        name, eq, value = item.partition("=")
        if not eq or not name:
            raise ValueError(f"engine {spec!r}: option {item!r} is not NAME=VALUE")
        options[name] = _parse_value(value)
    return head, options


def _load(spec: str, package: Path, ov_dir: Path) -> tuple[Any, Any]:
    kind, options = parse_engine(spec)
    if kind == "ov":
        from openvino_model import OVEncoder, ir_path

        enc = OVEncoder(package, ir_path(ov_dir, options.pop("mode")), group_size=options.pop("group_size"), **options)
        return enc.tokenizer, lambda texts: enc.encode(texts, max_length=MAX_LENGTH)
    from m3_runtime import M3Model

    model = M3Model(package, variant=kind, **options)
    return model.tokenizer, lambda texts: model.encode(
        texts, max_length=MAX_LENGTH, return_dense=True, return_sparse=True, return_colbert_vecs=True
    )


def worker(spec: str, package: Path, ov_dir: Path, texts_file: Path) -> None:
    """Answer JSON lines on stdin (``{"workload": W}``: one pass; ``{}``: exit with the peak RSS)."""
    answers = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    texts = json.loads(texts_file.read_text(encoding="utf-8"))
    try:
        start = time.perf_counter()
        tokenizer, encode = _load(spec, package, ov_dir)
        load_s = time.perf_counter() - start
        rss = _rss_mb()
        start = time.perf_counter()
        encode(["warm-up"])
        first_s = time.perf_counter() - start
    except Exception:
        answers.write(json.dumps({"error": traceback.format_exc()}) + "\n")
        return
    answers.write(json.dumps({"load_s": load_s, "first_call_s": first_s, "rss_after_load_mb": rss}) + "\n")
    for line in sys.stdin:
        cmd = json.loads(line)
        if "workload" not in cmd:
            answers.write(json.dumps({"peak_rss_mb": _peak_mb()}) + "\n")
            return
        batch = texts[cmd["workload"]]
        try:
            tokens = sum(len(x) for x in tokenizer.encode(batch, MAX_LENGTH))
            result = None
            start = time.perf_counter()
            result = encode(batch)
            seconds = time.perf_counter() - start
            del result
            answers.write(json.dumps({"tokens": tokens, "seconds": seconds}) + "\n")
        except Exception:
            answers.write(json.dumps({"error": traceback.format_exc()}) + "\n")
            return


class Worker:
    def __init__(self, spec: str, argv: list[str]) -> None:
        self.spec = spec
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--worker", spec, *argv],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            encoding="utf-8",
            env=ENV,
        )
        self.info = self._read()

    def _read(self) -> dict:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.spec} exited (status {self.proc.wait()}); see its stderr")
        msg = json.loads(line)
        if "error" in msg:
            raise RuntimeError(f"worker {self.spec} failed:\n{msg['error']}")
        return msg

    def ask(self, **cmd: Any) -> dict:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> float:
        peak = float(self.ask()["peak_rss_mb"])
        self.proc.wait(timeout=60)
        return peak


def bound(seconds: float) -> dict[str, float]:
    """Bare uint8 x int8 MatMulInteger (two threads) -> TOPS per M and the best tokens/s it allows."""
    from gemm_bound import OPS_PER_TOKEN, rate

    tops = {str(m): rate(True, m, 2, seconds) / 1e12 for m in (64, 256, 1024)}
    return {**{f"tops_m{m}": v for m, v in tops.items()}, "tokens_per_s": max(tops.values()) * 1e12 / OPS_PER_TOKEN}


def _stats(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("package", type=Path)
    parser.add_argument("ov_dir", type=Path)
    parser.add_argument("--engines", default="int8,ov:int8_sym:32", help="comma-separated; the first is the reference")
    parser.add_argument("--queries", type=int, default=64)
    parser.add_argument("--passages", type=int, default=16)
    parser.add_argument("--long", action="store_true", help="also one text of 8,192 tokens")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--bound-seconds", type=float, default=2.0)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--texts", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.package, args.ov_dir, args.texts)
        return
    specs = [s for s in args.engines.split(",") if s]
    for spec in specs:
        try:
            parse_engine(spec)
        except ValueError as exc:
            parser.error(str(exc))
    if len(specs) < 2 or args.repeats < 1 or args.warmup < 0 or args.queries < 0 or args.passages < 0:
        parser.error("--engines needs two or more; --repeats >= 1; --warmup, --queries, --passages >= 0")

    texts = make_texts(args.queries, args.passages)
    workloads = [w for w, n in (("queries", args.queries), ("passages", args.passages)) if n] + (
        ["long"] if args.long else []
    )
    texts_file = Path(f"/tmp/openvino_cpu_texts_{os.getpid()}.json")
    texts_file.write_text(json.dumps({w: texts[w] for w in workloads}), encoding="utf-8")
    report: dict[str, Any] = {"engines": specs, "settings": vars(args) | {"package": str(args.package)}}
    report["settings"] = {k: str(v) for k, v in report["settings"].items()}
    workers: dict[str, Worker] = {}
    try:
        if args.bound_seconds > 0:
            report["bound_before"] = bound(args.bound_seconds)
            print(f"int8 products' bound before: {report['bound_before']}", flush=True)
        for spec in specs:
            workers[spec] = Worker(spec, [str(args.package), str(args.ov_dir), "--texts", str(texts_file)])
            print(f"{spec}: {workers[spec].info}", flush=True)
        runs: dict[str, dict[str, list[float]]] = {s: {} for s in specs}
        tokens: dict[str, int] = {}
        for w in workloads:
            for _ in range(args.warmup):
                for spec in specs:
                    workers[spec].ask(workload=w)
            for i in range(args.repeats):
                for spec in specs if i % 2 == 0 else specs[::-1]:
                    got = workers[spec].ask(workload=w)
                    tokens[w] = got["tokens"]
                    runs[spec].setdefault(w, []).append(got["tokens"] / got["seconds"])
                    print(f"  {w} pass {i + 1}/{args.repeats} {spec:<36}{runs[spec][w][-1]:9.1f} tokens/s", flush=True)
        peaks = {spec: workers[spec].close() for spec in specs}
        if args.bound_seconds > 0:
            report["bound_after"] = bound(args.bound_seconds)
            print(f"int8 products' bound after: {report['bound_after']}", flush=True)
    finally:
        for wk in workers.values():
            if wk.proc.poll() is None:
                wk.proc.kill()
        texts_file.unlink(missing_ok=True)

    ref = specs[0]
    bounds = [report[k]["tokens_per_s"] for k in ("bound_before", "bound_after") if k in report]
    limit = statistics.mean(bounds) if bounds else None
    report["results"] = {}
    print(
        f"\n{'engine':<36}{'workload':<10}{'tokens':>7}{'tokens/s':>10}  {'x ' + ref + ' [min-max]':<24}"
        f"{'share of bound':>15}{'load s':>8}{'peak MB':>9}"
    )
    for spec in specs:
        for w in workloads:
            tps = runs[spec][w]
            ratios = [a / b for a, b in zip(tps, runs[ref][w], strict=True)]
            entry = {
                "tokens": tokens[w],
                "runs_tokens_per_s": tps,
                "tokens_per_s": _stats(tps),
                "ratio": _stats(ratios) | {"passes": ratios},
                "load_s": workers[spec].info["load_s"],
                "first_call_s": workers[spec].info["first_call_s"],
                "peak_rss_mb": peaks[spec],
            }
            if limit:
                entry["share_of_bound"] = entry["tokens_per_s"]["median"] / limit
            report["results"].setdefault(spec, {})[w] = entry
            r = entry["ratio"]
            share = f"{entry['share_of_bound']:.2f}" if limit else "-"
            print(
                f"{spec:<36}{w:<10}{tokens[w]:>7}{entry['tokens_per_s']['median']:>10.1f}  "
                f"{r['median']:.2f} [{r['min']:.2f}-{r['max']:.2f}]{'':<11}{share:>15}"
                f"{entry['load_s']:>8.1f}{peaks[spec]:>9.0f}"
            )
    if limit:
        print(f"bound: {limit:.0f} tokens/s (mean of before/after: {', '.join(f'{b:.0f}' for b in bounds)})")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
