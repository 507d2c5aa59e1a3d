"""CPU benchmark: FlagReranker fp32 at batch 128 and 16 against each M3Reranker variant, in one run.

    python benchmarks/rerank.py [--variants fp32,int8[:workers=2:intra_op_threads=1],...]
                                [--pairs 64] [--repeats 3] [--flag-batch-sizes 128,16] [--no-flag]
                                [--checkpoint DIR] [--package DIR] [--json benchmarks/rerank_results.json]

What it does:
1. builds, once, a full-size bge-reranker-v2-m3 checkpoint with random weights
   (``benchmarks/full_reranker.py``) and exports it with ``m3-export`` (both cached
   under ``benchmarks/.cache``; the package is re-exported when the exporter's code
   changed, ``run.ensure_package``);
2. makes ``--pairs`` (query, passage) pairs from ``models/source/multilingual.txt``
   (``run.make_texts``: queries of 5-20 words, passages of 120-250 words; the tiny
   tokenizer makes most pairs hit the 512-token cut);
3. starts one long-lived worker process per engine, each loaded once: FlagEmbedding
   1.4.2's ``FlagReranker(use_fp16=False, devices="cpu")`` at each ``--flag-batch-sizes``
   (with ``--flag-python``, ``.venv-flag``: FlagEmbedding needs transformers<5, which the
   runtime's environment need not have) and ``M3Reranker`` for each ``--variants`` spec
   (``VARIANT[:key=value...]``, keys passed to ``M3Reranker``: ``workers``,
   ``intra_op_threads``, ``batch_size``, ``max_batch_tokens``, ``allow_spinning``), all
   at ``max_length=512``;
4. times ``compute_score(pairs)`` in interleaved passes: pass 1 of every engine, then
   pass 2, ..., the engine order rotated by one each pass, so every ratio compares
   neighbours in time (the 2-vCPU VM drifts 10-17% between runs) and no engine always
   runs first; one process busy at a time, the others idle;
5. prints pairs/s and tokens/s (median and each pass), the ratio of every engine to
   FlagReranker at each batch size (median and min-max over the passes' ratios) next to
   issue 12's targets, load time, peak RSS (VmHWM) of each process, and each engine's
   raw logits against FlagReranker's at the first batch size (max and mean abs diff,
   Spearman) next to the spread of the reference's logits; writes it all as JSON.

FlagReranker's ``compute_score`` runs its first ``batch_size`` pairs through the model
once more before the real batches (its batch-size probe), on every call: with 64 pairs
at batch 128 that doubles the work, at 16 it adds a quarter. It is timed as users call
it. tokens/s counts each pair's real tokens once (what M3Reranker also feeds), so it
compares like pairs/s. Never run two benchmarks at once on a 2-core machine.
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
from typing import IO, Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CACHE = HERE / ".cache"
MAX_LENGTH = 512
FLAG_PREFIX = "flag@"
FLAG_PYTHON = ROOT / ".venv-flag" / "bin" / "python"
VARIANTS = ("fp32", "fp16", "int8")
OPTION_TYPES: dict[str, type] = {
    "workers": int,
    "intra_op_threads": int,
    "batch_size": int,
    "max_batch_tokens": int,
    "allow_spinning": bool,
}
# Issue 12's targets: (variant, FlagReranker batch size) -> minimum ratio of pairs/s.
TARGETS = {("int8", 128): 4.0, ("int8", 16): 2.5, ("fp32", 16): 1.0}


# -- engine specs -----------------------------------------------------------------
def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``int8:workers=2:intra_op_threads=1`` -> ("int8", {"workers": 2, "intra_op_threads": 1})."""
    variant, *options = spec.split(":")
    if variant not in VARIANTS:
        raise ValueError(f"variant {variant!r} in {spec!r} is not one of {', '.join(VARIANTS)}")
    kwargs: dict[str, Any] = {}
    for option in options:
        key, sep, value = option.partition("=")
        if not sep or key not in OPTION_TYPES:
            raise ValueError(f"option {option!r} in {spec!r}: expected KEY=VALUE with KEY in {', '.join(OPTION_TYPES)}")
        if OPTION_TYPES[key] is bool:
            if value not in ("0", "1", "true", "false"):
                raise ValueError(f"option {option!r} in {spec!r}: expected 0, 1, true or false")
            kwargs[key] = value in ("1", "true")
        else:
            try:
                kwargs[key] = int(value)
            except ValueError:
                raise ValueError(f"option {option!r} in {spec!r}: {value!r} is not an integer") from None
    return variant, kwargs


def _status_mb(field: str) -> float:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


# -- worker (one engine, own process, loaded once, commands on stdin) ---------------
def worker(engine: str, pairs_file: Path, checkpoint: Path, package: Path) -> None:
    """Answers one JSON line per command line on stdin: ``warm``, ``time``, ``quit``.

    The protocol uses a copy of the original stdout; fd 1 then points at stderr, so
    whatever the libraries print cannot corrupt it."""
    proto: IO[str] = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    pairs = [tuple(p) for p in json.loads(pairs_file.read_text(encoding="utf-8"))]
    start = time.perf_counter()
    info: dict[str, Any] = {"engine": engine}
    if engine.startswith(FLAG_PREFIX):
        batch_size = int(engine[len(FLAG_PREFIX) :])
        import FlagEmbedding
        import torch
        import transformers
        from FlagEmbedding import FlagReranker
        from FlagEmbedding.inference.reranker.encoder_only.base import prepare_for_model_compat

        model = FlagReranker(
            str(checkpoint), use_fp16=False, devices="cpu", batch_size=batch_size, max_length=MAX_LENGTH
        )

        def score(batch: list) -> list[float]:
            return model.compute_score(batch, batch_size=batch_size, max_length=MAX_LENGTH)

        def n_tokens(batch: list) -> int:
            # FlagReranker's own preprocessing (compute_score_single_gpu), without the model.
            tok = model.tokenizer
            total = 0
            for q, p in batch:
                q_ids = tok(q, add_special_tokens=False, max_length=MAX_LENGTH * 3 // 4, truncation=True)["input_ids"]
                p_ids = tok(p, add_special_tokens=False, max_length=MAX_LENGTH, truncation=True)["input_ids"]
                item = prepare_for_model_compat(
                    tok, q_ids, p_ids, truncation="only_second", max_length=MAX_LENGTH, padding=False
                )
                total += len(item["input_ids"])
            return total

        info["versions"] = {
            "FlagEmbedding": getattr(FlagEmbedding, "__version__", _dist_version("FlagEmbedding")),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        }
        info["threads"] = torch.get_num_threads()
    else:
        variant, kwargs = parse_spec(engine)
        import onnxruntime
        from m3_runtime import M3Reranker

        model = M3Reranker(package, variant=variant, max_length=MAX_LENGTH, **kwargs)  # type: ignore[arg-type]

        def score(batch: list) -> list[float]:
            return model.compute_score(batch)

        def n_tokens(batch: list) -> int:
            return sum(len(ids) for ids in model.tokenize(batch))

        info["versions"] = {"m3_runtime": _dist_version("m3-runtime"), "onnxruntime": onnxruntime.__version__}
        info["options"] = kwargs
    info["load_s"] = time.perf_counter() - start
    info["rss_after_load_mb"] = _status_mb("VmRSS")
    info["tokens"] = n_tokens(pairs)
    info["max_tokens"] = max(n_tokens([p]) for p in pairs)
    _reply(proto, info)
    for line in sys.stdin:
        command = line.strip()
        if command == "quit":
            break
        if command == "warm":
            # The first call pays for lazy set-up (allocator arenas, kernel selection);
            # two pairs warm both engines without a full pass.
            score(pairs[:2])
            _reply(proto, {"peak_rss_mb": _status_mb("VmHWM")})
        elif command == "time":
            start = time.perf_counter()
            scores = score(pairs)
            seconds = time.perf_counter() - start
            _reply(
                proto, {"seconds": seconds, "scores": [float(s) for s in scores], "peak_rss_mb": _status_mb("VmHWM")}
            )
        else:
            _reply(proto, {"error": f"unknown command {command!r}"})


def _reply(proto: IO[str], message: dict) -> None:
    proto.write(json.dumps(message) + "\n")
    proto.flush()


def _dist_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"


class Worker:
    """One engine's process, started once; ``ask`` sends a command and returns its answer."""

    def __init__(self, engine: str, python: str, pairs_file: Path, checkpoint: Path, package: Path) -> None:
        self.engine = engine
        cmd = [python, __file__, "--worker", engine, "--pairs-file", str(pairs_file)]
        cmd += ["--checkpoint", str(checkpoint), "--package", str(package)]
        print(f"loading {engine} ({python}) ...", file=sys.stderr, flush=True)
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
        )
        self.info = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()  # type: ignore[union-attr]
        if not line:
            raise RuntimeError(f"worker {self.engine!r} exited with code {self.proc.wait()} (its stderr is above)")
        answer = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"worker {self.engine!r}: {answer['error']}")
        return answer

    def ask(self, command: str) -> dict:
        self.proc.stdin.write(command + "\n")  # type: ignore[union-attr]
        self.proc.stdin.flush()  # type: ignore[union-attr]
        return self._read()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("quit\n")  # type: ignore[union-attr]
                self.proc.stdin.close()  # type: ignore[union-attr]
            except BrokenPipeError:
                pass
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# -- orchestration ----------------------------------------------------------------
def make_pairs(n: int) -> list[tuple[str, str]]:
    from run import make_texts

    texts = make_texts(n, n)
    return list(zip(texts["queries"], texts["passages"], strict=True))


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def agreement(ref: list[float], got: list[float]) -> dict[str, float]:
    import numpy as np
    from m3_exporter.validate import spearman

    a, b = np.asarray(ref, np.float64), np.asarray(got, np.float64)
    diff = np.abs(a - b)
    return {
        "logit_max_abs": float(diff.max()),
        "logit_mean_abs": float(diff.mean()),
        "spearman": spearman(a, b),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default="fp32,int8", help="comma-separated VARIANT[:key=value...] specs")
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved timed passes; medians are reported")
    parser.add_argument("--flag-batch-sizes", default="128,16", help="FlagReranker batch sizes, one process each")
    parser.add_argument("--no-flag", action="store_true", help="skip FlagReranker")
    parser.add_argument("--flag-python", default=str(FLAG_PYTHON), help="interpreter with FlagEmbedding 1.4.2")
    parser.add_argument("--checkpoint", type=Path, default=CACHE / "bge-reranker-v2-m3-random")
    parser.add_argument("--package", type=Path, default=CACHE / "bge-reranker-v2-m3-random-pkg")
    parser.add_argument("--json", type=Path, default=HERE / "rerank_results.json")
    parser.add_argument("--worker", metavar="ENGINE", help=argparse.SUPPRESS)
    parser.add_argument("--pairs-file", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.pairs_file, args.checkpoint, args.package)
        return
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    if args.pairs < 2:
        parser.error(f"--pairs must be at least 2, got {args.pairs}")
    specs = [s for s in args.variants.split(",") if s]
    try:
        variants = sorted({parse_spec(s)[0] for s in specs} | {"fp32"})
    except ValueError as exc:
        parser.error(f"--variants: {exc}")
    try:
        flag_sizes = [int(b) for b in args.flag_batch_sizes.split(",") if b] if not args.no_flag else []
    except ValueError:
        parser.error(f"--flag-batch-sizes must be comma-separated integers, got {args.flag_batch_sizes!r}")
    if any(b < 1 for b in flag_sizes):
        parser.error(f"--flag-batch-sizes must be positive, got {args.flag_batch_sizes!r}")
    if flag_sizes and not Path(args.flag_python).is_file():
        parser.error(f"--flag-python {args.flag_python} does not exist (make .venv-flag as README says, or --no-flag)")

    sys.path.insert(0, str(HERE))
    from full_reranker import DEFAULT_OUT, build
    from run import ensure_package

    if args.checkpoint.resolve() == DEFAULT_OUT.resolve():
        build(args.checkpoint)
    elif not (args.checkpoint / "config.json").is_file():
        parser.error(f"--checkpoint {args.checkpoint} has no config.json")
    ensure_package(args.checkpoint, args.package, variants)

    engines = [f"{FLAG_PREFIX}{b}" for b in flag_sizes] + specs
    if len(set(engines)) != len(engines):
        parser.error(f"an engine is listed twice: {engines}")
    pairs = make_pairs(args.pairs)
    workers: dict[str, Worker] = {}
    runs: dict[str, list[dict]] = {e: [] for e in engines}
    with tempfile.TemporaryDirectory() as tmp:
        pairs_file = Path(tmp) / "pairs.json"
        pairs_file.write_text(json.dumps(pairs), encoding="utf-8")
        try:
            for engine in engines:
                python = args.flag_python if engine.startswith(FLAG_PREFIX) else sys.executable
                workers[engine] = Worker(engine, python, pairs_file, args.checkpoint, args.package)
                info = workers[engine].info
                print(
                    f"  load {info['load_s']:.2f} s, RSS {info['rss_after_load_mb']:.0f} MB, {info['tokens']} tokens",
                    file=sys.stderr,
                    flush=True,
                )
            for engine in engines:
                workers[engine].ask("warm")
            width = max(len(e) for e in engines)
            for p in range(args.repeats):
                order = engines[p % len(engines) :] + engines[: p % len(engines)]
                for engine in order:
                    res = workers[engine].ask("time")
                    runs[engine].append(res)
                    print(
                        f"pass {p + 1}/{args.repeats} {engine:<{width}} {res['seconds']:8.2f} s "
                        f"{args.pairs / res['seconds']:8.2f} pairs/s",
                        file=sys.stderr,
                        flush=True,
                    )
        finally:
            for w in workers.values():
                w.close()

    summary = report(args, engines, workers, runs, flag_sizes, pairs)
    args.json.write_text(json.dumps(summary, indent=2))
    print(f"\nwrote {args.json}")


def report(
    args: argparse.Namespace,
    engines: list[str],
    workers: dict[str, Worker],
    runs: dict[str, list[dict]],
    flag_sizes: list[int],
    pairs: list[tuple[str, str]],
) -> dict:
    n = len(pairs)
    tokens = {e: workers[e].info["tokens"] for e in engines}
    if len(set(tokens.values())) > 1:
        print(f"\nWARNING: the engines tokenised the pairs differently: {tokens}")
    results: dict[str, dict] = {}
    for e in engines:
        secs = [r["seconds"] for r in runs[e]]
        info = workers[e].info
        results[e] = {
            "pairs": n,
            "tokens": tokens[e],
            "max_tokens_per_pair": info["max_tokens"],
            "runs_seconds": secs,
            "runs_pairs_per_s": [n / s for s in secs],
            "pairs_per_s": n / statistics.median(secs),
            "tokens_per_s": tokens[e] / statistics.median(secs),
            "load_s": info["load_s"],
            "rss_after_load_mb": info["rss_after_load_mb"],
            "peak_rss_mb": runs[e][-1]["peak_rss_mb"],
            "versions": info.get("versions", {}),
            **({"options": info["options"]} if "options" in info else {}),
            **({"threads": info["threads"]} if "threads" in info else {}),
        }

    print(f"\n{n} pairs, {tokens[engines[0]]} tokens (max_length {MAX_LENGTH}), {args.repeats} interleaved passes")
    w = max(30, max(len(e) for e in engines) + 2)
    header = f"{'engine':<{w}}{'pairs/s':>9}{'tokens/s':>10}{'load s':>8}{'peak MB':>9}"
    for b in flag_sizes:
        header += f"{f'x flag@{b} (min-max) [target]':>34}"
    print(header)
    ratios: dict[str, dict[str, dict]] = {}
    for e in engines:
        r = results[e]
        line = f"{e:<{w}}{r['pairs_per_s']:9.2f}{r['tokens_per_s']:10.1f}{r['load_s']:8.2f}{r['peak_rss_mb']:9.0f}"
        for b in flag_sizes:
            ref = runs[f"{FLAG_PREFIX}{b}"]
            per_pass = [rs["seconds"] / mine["seconds"] for mine, rs in zip(runs[e], ref, strict=True)]
            entry: dict[str, Any] = {
                "median": statistics.median(per_pass),
                "min": min(per_pass),
                "max": max(per_pass),
                "per_pass": per_pass,
            }
            cell = _spread(per_pass)
            if not e.startswith(FLAG_PREFIX):
                target = TARGETS.get((e.split(":")[0], b))
                if target is not None:
                    entry["target"] = target
                    entry["target_met"] = entry["median"] >= target
                    cell += f" [{'met' if entry['target_met'] else 'MISSED'} {target:g}x]"
            ratios.setdefault(e, {})[f"{FLAG_PREFIX}{b}"] = entry
            line += f"{cell:>34}"
        print(line)
        print(f"{'':<{w}}passes: {', '.join(f'{x:.2f}' for x in r['runs_pairs_per_s'])} pairs/s")
    if flag_sizes:
        print(
            "targets (issue 12, median ratio): " + ", ".join(f"{v} >= {t:g}x flag@{b}" for (v, b), t in TARGETS.items())
        )

    fid: dict[str, dict] = {}
    ref_engine = f"{FLAG_PREFIX}{flag_sizes[0]}" if flag_sizes else ("fp32" if "fp32" in engines else None)
    if ref_engine:
        import numpy as np

        ref_scores = runs[ref_engine][-1]["scores"]
        std = float(np.std(ref_scores))
        print(
            f"\nraw logits against {ref_engine} (its logits: std {std:.4g}, "
            f"range {min(ref_scores):.4g}..{max(ref_scores):.4g} over {n} pairs):"
        )
        for e in engines:
            if e == ref_engine:
                continue
            fid[e] = agreement(ref_scores, runs[e][-1]["scores"])
            print(f"  {e:<{w}}" + ", ".join(f"{k} {v:.4g}" for k, v in fid[e].items()))
        fid["reference"] = {
            "engine": ref_engine,
            "logit_std": std,
            "logit_min": min(ref_scores),
            "logit_max": max(ref_scores),
        }

    return {
        "machine": {"cpus": os.cpu_count(), "platform": sys.platform},
        "checkpoint": str(args.checkpoint),
        "package": str(args.package),
        "max_length": MAX_LENGTH,
        "repeats": args.repeats,
        "results": results,
        "ratios": ratios,
        "targets": {f"{v} vs {FLAG_PREFIX}{b}": t for (v, b), t in TARGETS.items()},
        "agreement": fid,
    }


if __name__ == "__main__":
    main()
