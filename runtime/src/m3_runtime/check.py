"""``m3 check``: prove a package on the machine that will serve it.

Each asked variant is loaded on each asked execution provider and runs the probes
stored in the package (``references.py``) through ``M3Model.embed`` (what ``encode``
calls) or ``M3Reranker.compute_score``, twice: batched (one call for all probes that can
share a batch) and one probe per call. Both are compared with the PyTorch fp32 outputs
stored at export:

- fp32 at the export's tolerance, ``FP32_TOLERANCE`` (absolute, every output);
- fp16 and int8 at the bounds of ``BOUNDS`` (cosines, lexical top-10 overlap and ColBERT
  score for embedders; logit difference and Spearman for rerankers).

Measures (worst over both runs), for n probes with dense ``[n, H]``:

- ``dense_max_abs``, ``dense_cos_min``, ``dense_cos_mean``: dense rows against the reference
- ``sparse_max_abs``: largest ``|w - w_ref|`` over the union of each probe's lexical weights
  (``{token id: weight}``, absent = 0); ``sparse_top10_overlap``: mean share of each probe's
  10 heaviest reference tokens among its 10 heaviest here (``testing.top10_overlaps``)
- ``colbert_max_abs``, ``colbert_cos_min``: the stored ColBERT rows; ``colbert_norm_max_abs``:
  every row's L2 norm; ``colbert_score_max_abs``: ``|colbert_score(i, j) - ref|`` over every
  two probes (on the stored rows)
- rerankers: ``scores_max_abs`` (raw logits), ``scores_spearman``
- ``nan``: 1 if any output held NaN

A package written before reference outputs existed has none: its fp32 variant on the
CPU is then run here and the other variants and providers are compared with that.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from . import scoring
from .contract import CPU, CUDA, PROVIDERS_FOR_VARIANT, RERANKER_KIND, TENSORRT, VARIANTS
from .errors import InputError, M3Error
from .package import Package, load_package
from .references import References, read_references, sample_rows, split
from .session import available_providers, import_ort
from .testing import row_cosine, spearman, top10_overlaps

Status = Literal["PASS", "FAIL", "SKIP"]

# The export's limit for the fp32 graph against PyTorch (m3_exporter.validate uses it).
FP32_TOLERANCE = 1e-4
# fp16 and int8 bounds: the export's tests of the variants (tests/test_variants.py,
# tests/test_reranker_export.py, tests/test_reranker.py use these). A measure ending in
# "_max_abs" is an upper bound, any other a lower bound.
BOUNDS: dict[str, dict[str, dict[str, float]]] = {
    "embedder": {
        "fp16": {
            "dense_cos_min": 0.9999,
            "dense_cos_mean": 0.9999,
            "colbert_cos_min": 0.999,
            "sparse_top10_overlap": 0.95,
            "colbert_score_max_abs": 0.005,
        },
        "int8": {
            "dense_cos_min": 0.99,
            "dense_cos_mean": 0.995,
            "colbert_cos_min": 0.95,
            "sparse_top10_overlap": 0.9,
            "colbert_score_max_abs": 0.02,
        },
    },
    "reranker": {
        "fp16": {"scores_max_abs": 0.05, "scores_spearman": 0.99},
        "int8": {"scores_max_abs": 0.4, "scores_spearman": 0.95},
    },
}
_ABS = ("dense_max_abs", "sparse_max_abs", "colbert_max_abs", "colbert_norm_max_abs", "scores_max_abs")
# Which graph output a measure is about (failure messages name it).
_OUTPUT = {"dense": "dense_vecs", "sparse": "sparse_weights", "colbert": "colbert_vecs", "scores": "scores"}
PROVIDER_ORDER = (TENSORRT, CUDA, CPU)
# ``skip_long`` leaves out probes longer than this (the one at the package's max_length).
LONG_PROBE_TOKENS = 512


class CheckError(M3Error, ValueError):
    """``m3 check`` was asked for something the package or this runtime does not have."""


@dataclass(frozen=True)
class CheckResult:
    """One row of the report: one variant on one provider."""

    variant: str
    provider: str  # the provider asked for
    status: Status
    reason: str | None = None  # why it FAILed or was SKIPped
    ran_on: str | None = None  # the provider the session really used (after any fallback)
    metrics: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0  # load and both runs


@dataclass(frozen=True)
class CheckReport:
    """What ``m3 check`` prints; ``passed`` only if every row PASSed."""

    package: str
    references: str | None  # what was compared with
    results: tuple[CheckResult, ...]
    notes: tuple[str, ...] = ()

    @property
    def passed(self) -> bool:
        return bool(self.results) and all(r.status == "PASS" for r in self.results)

    def to_dict(self) -> dict[str, Any]:
        return {
            "package": self.package,
            "references": self.references,
            "passed": self.passed,
            "results": [asdict(r) for r in self.results],
            "notes": list(self.notes),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def table(self) -> str:
        lines = [f"package     {self.package}", f"compared to {self.references}", ""]
        lines.append(f"{'variant':8}{'provider':10}{'ran on':10}{'status':7}{'time':>8}  measures")
        for r in self.results:
            lines.append(
                f"{r.variant:8}{_short(r.provider):10}{_short(r.ran_on) if r.ran_on else '-':10}{r.status:7}"
                f"{r.seconds:7.1f}s  {_measures(r.metrics)}"
            )
            if r.reason:
                lines.append(f"{'':8}{r.reason}")
        lines += [f"note: {n}" for n in self.notes]
        lines.append("")
        lines.append("PASS" if self.passed else "NOT PASSED: " + _count(self.results))
        return "\n".join(lines)


def _short(provider: str | None) -> str:
    return (provider or "").replace("ExecutionProvider", "")


def _count(results: Sequence[CheckResult]) -> str:
    return ", ".join(f"{sum(r.status == s for r in results)} {s}" for s in ("PASS", "FAIL", "SKIP"))


def _measures(m: dict[str, float]) -> str:
    shown = (
        ("max abs", "max_abs", ".2g"),
        ("dense cos", "dense_cos_min", ".6f"),
        ("top-10", "sparse_top10_overlap", ".3f"),
        ("colbert score", "colbert_score_max_abs", ".2g"),
        ("spearman", "scores_spearman", ".4f"),
    )
    out = []
    for label, key, fmt in shown:
        value = max((m[k] for k in _ABS if k in m), default=None) if key == "max_abs" else m.get(key)
        if value is not None:
            out.append(f"{label} {value:{fmt}}")
    return ", ".join(out)


# -- what a run gives ------------------------------------------------------------------


@dataclass
class Observed:
    """Outputs per probe, in probe order; ColBERT only the rows ``index`` keeps."""

    tokens: np.ndarray
    dense: np.ndarray | None = None
    lexical: list[dict[str, float]] | None = None
    colbert: list[np.ndarray] | None = None
    norms: list[np.ndarray] | None = None
    scores: np.ndarray | None = None
    nan: bool = False


def reference_observed(refs: References, unused: frozenset[int]) -> Observed:
    """The stored PyTorch outputs as an ``Observed``."""
    tokens = refs["tokens"]
    if refs.kind == RERANKER_KIND:
        return Observed(tokens=tokens, scores=refs["scores"].astype(np.float32))
    out = Observed(tokens=tokens, dense=refs["dense"])
    if "sparse" in refs.arrays:
        ids, sparse = split(refs["token_ids"], tokens), split(refs["sparse"], tokens)
        out.lexical = [scoring.lexical_weights(s, i, unused) for s, i in zip(sparse, ids, strict=True)]
        out.colbert = split(refs["colbert_rows"], refs["colbert_count"])
        out.norms = split(refs["colbert_norms"], tokens - 1)
    return out


@dataclass(frozen=True)
class Probes:
    """What to run: the reference file's probes (or the built-in ones when there is none)."""

    names: list[str]
    kind: str
    texts: list[str] = field(default_factory=list)
    max_length: int = 0
    pairs: list[tuple[str, str]] = field(default_factory=list)
    pair_lengths: list[int] = field(default_factory=list)
    index: list[np.ndarray] | None = None  # ColBERT rows kept per probe

    @classmethod
    def of(cls, refs: References) -> Probes:
        if refs.kind == RERANKER_KIND:
            return cls(
                refs.names,
                refs.kind,
                pairs=list(zip(refs.texts("queries"), refs.texts("passages"), strict=True)),
                pair_lengths=[int(x) for x in refs["max_length"]],
            )
        index = split(refs["colbert_index"], refs["colbert_count"]) if "colbert_index" in refs.arrays else None
        return cls(refs.names, refs.kind, texts=refs.texts("texts"), max_length=int(refs["max_length"]), index=index)

    @classmethod
    def builtin(cls, package: Package) -> Probes:
        from .references import embedder_probes, reranker_probes

        m = package.manifest
        if m.kind.pairs:
            probes = reranker_probes(m.max_length)
            return cls(
                [p.name for p in probes],
                m.model_kind,
                pairs=[(p.query, p.passage) for p in probes],
                pair_lengths=[p.max_length for p in probes],
            )
        names, texts = zip(*embedder_probes(m.max_length), strict=True)
        return cls(list(names), m.model_kind, texts=list(texts), max_length=m.max_length)


def observe(model: Any, probes: Probes, *, batched: bool, alone: Observed | None = None) -> Observed:
    """Run ``probes`` through ``model`` (an ``M3Model`` or ``M3Reranker``): all in as few calls
    as the API makes (``batched``) or one probe per call. ``alone``: this model's run of one
    probe per call, whose results a batched run takes for the probes that would be alone
    in their batch anyway (the long ones: their forward pass is the costly one)."""
    if probes.kind == RERANKER_KIND:
        return _observe_pairs(model, probes, batched=batched, alone=alone)
    engine = model.engine
    has_heads = engine.kind.has("sparse_weights")
    n = len(probes.texts)
    tokens = np.zeros(n, np.int64)
    dense: list[np.ndarray] = [np.empty(0)] * n
    lexical: list[dict[str, float]] = [{}] * n
    colbert: list[np.ndarray] = [np.empty(0)] * n
    norms: list[np.ndarray] = [np.empty(0)] * n
    # Batched: one call for the probes that can share a forward pass (2 rows within the
    # token budget); a longer one is alone in its batch either way, so it runs once.
    lengths = engine.tokenizer.encode(probes.texts, probes.max_length)
    shared = [i for i in range(n) if 2 * len(lengths[i]) <= engine.max_batch_tokens]
    groups = [shared] if batched else [[i] for i in range(n)]
    if batched and alone is None:
        groups += [[i] for i in range(n) if i not in shared]
    elif batched and alone is not None:
        for i in (i for i in range(n) if i not in shared):
            tokens[i] = alone.tokens[i]
            dense[i] = alone.dense[i]  # type: ignore[index]
            if has_heads:
                lexical[i] = alone.lexical[i]  # type: ignore[index]
                colbert[i] = alone.colbert[i]  # type: ignore[index]
                norms[i] = alone.norms[i]  # type: ignore[index]
    for group in groups:
        if not group:
            continue
        out = model.embed(
            [probes.texts[i] for i in group],
            max_length=probes.max_length,
            dense=True,
            sparse=has_heads,
            colbert=has_heads,
        )
        for row, i in enumerate(group):
            tokens[i] = out.tokens[row]
            dense[i] = out.dense[row]
            if has_heads:
                lexical[i] = out.lexical[row]
                rows = out.colbert[row]
                keep = probes.index[i] if probes.index is not None else sample_rows(len(rows))
                colbert[i] = rows[keep[keep < len(rows)]]
                norms[i] = np.linalg.norm(rows, axis=-1)
    stacked = np.stack(dense)
    nan = bool(np.isnan(stacked).any()) or any(bool(np.isnan(c).any()) for c in colbert)
    nan |= any(w != w for lw in lexical for w in lw.values())
    if not has_heads:
        return Observed(tokens=tokens, dense=stacked, nan=nan)
    return Observed(tokens=tokens, dense=stacked, lexical=lexical, colbert=colbert, norms=norms, nan=nan)


def _observe_pairs(model: Any, probes: Probes, *, batched: bool, alone: Observed | None = None) -> Observed:
    n = len(probes.pairs)
    scores = np.zeros(n, np.float32)
    tokens = np.zeros(n, np.int64)
    by_length: dict[int, list[int]] = {}
    for i, length in enumerate(probes.pair_lengths):
        by_length.setdefault(length, []).append(i)
    groups = list(by_length.values()) if batched else [[i] for i in range(n)]
    for group in groups:
        if batched and alone is not None and len(group) == 1:  # a batch of one: that run again
            scores[group], tokens[group] = alone.scores[group], alone.tokens[group]  # type: ignore[index]
            continue
        pairs = [probes.pairs[i] for i in group]
        length = probes.pair_lengths[group[0]]
        scores[group] = model.compute_score(pairs, max_length=length, normalize=False)
        tokens[group] = [len(x) for x in model.tokenize(pairs, max_length=length)]
    return Observed(tokens=tokens, scores=scores, nan=bool(np.isnan(scores).any()))


# -- comparing -------------------------------------------------------------------------

Worst = dict[str, tuple[float, str]]  # measure -> (value, where)


def compare(ref: Observed, got: Observed, names: Sequence[str]) -> Worst:
    """The module docstring's measures of ``got`` against ``ref``, each with where it is worst."""
    out: Worst = {"nan": (float(got.nan), "")}

    def worst(key: str, values: Sequence[float] | np.ndarray, where: Sequence[str], *, high_is_bad: bool) -> None:
        k = int(np.argmax(values) if high_is_bad else np.argmin(values))
        out[key] = (float(values[k]), where[k])

    if ref.scores is not None and got.scores is not None:
        diff = np.abs(ref.scores.astype(np.float64) - got.scores)
        worst("scores_max_abs", diff, [f"pair '{n}'" for n in names], high_is_bad=True)
        out["scores_spearman"] = (spearman(ref.scores, got.scores), "all pairs")
        return out
    assert ref.dense is not None and got.dense is not None
    probe = [f"probe '{n}'" for n in names]
    worst("dense_max_abs", np.abs(ref.dense - got.dense).max(axis=1), probe, high_is_bad=True)
    cos = row_cosine(ref.dense.astype(np.float64), got.dense.astype(np.float64))
    cos = np.where(np.isnan(cos), 1.0, cos)  # two zero rows
    worst("dense_cos_min", cos, probe, high_is_bad=False)
    out["dense_cos_mean"] = (float(cos.mean()), "all probes")
    if ref.lexical is None or got.lexical is None or ref.colbert is None or got.colbert is None:
        return out
    assert ref.norms is not None and got.norms is not None
    sparse = [max((abs(r.get(k, 0.0) - g.get(k, 0.0)) for k in r.keys() | g.keys()), default=0.0)
              for r, g in zip(ref.lexical, got.lexical, strict=True)]  # fmt: skip
    worst("sparse_max_abs", sparse, probe, high_is_bad=True)
    overlaps = [top10_overlaps([g], [r]) for r, g in zip(ref.lexical, got.lexical, strict=True)]
    measured = [(o[0], p) for o, p in zip(overlaps, probe, strict=True) if o]
    low = min(measured) if measured else (1.0, "")
    out["sparse_top10_overlap"] = (float(np.mean([v for v, _ in measured])) if measured else 1.0, low[1])
    rows = [(r, g, p) for r, g, p in zip(ref.colbert, got.colbert, probe, strict=True) if len(r)]
    worst("colbert_max_abs", [float(np.abs(r - g).max()) for r, g, _ in rows], [p for *_, p in rows], high_is_bad=True)
    worst(
        "colbert_cos_min", [float(row_cosine(r, g).min()) for r, g, _ in rows], [p for *_, p in rows], high_is_bad=False
    )
    norm_diff = [float(np.abs(r - g).max()) if len(r) else 0.0 for r, g in zip(ref.norms, got.norms, strict=True)]
    worst("colbert_norm_max_abs", norm_diff, probe, high_is_bad=True)
    with_rows = [i for i, c in enumerate(ref.colbert) if len(c)]
    diffs, where = [], []
    for i in with_rows:
        for j in with_rows:
            ref_score = scoring.colbert_score(ref.colbert[i], ref.colbert[j])
            diffs.append(abs(ref_score - scoring.colbert_score(got.colbert[i], got.colbert[j])))
            where.append(f"probes '{names[i]}' x '{names[j]}'")
    worst("colbert_score_max_abs", diffs, where, high_is_bad=True)
    return out


def _merge(a: Worst, b: Worst) -> Worst:
    """The worse of two runs' measures."""
    out = dict(a)
    for key, (value, where) in b.items():
        high_is_bad = key.endswith("_max_abs") or key == "nan"
        if key not in out or (value > out[key][0] if high_is_bad else value < out[key][0]):
            out[key] = (value, where)
    return out


def bound_for(key: str, bound: float, at_export: float | None) -> float:
    """The bound m3 check holds a measure to: ``BOUNDS``, or, where the variant measured
    worse on the export machine (``VariantInfo.at_export``: int8, whose rounding error
    depends on the weights), that figure with a margin: differences (``*_max_abs``) up to
    1.5x it, cosines' distance from 1 up to 1.5x it, overlaps and correlations 0.05 below."""
    if at_export is None or at_export != at_export:
        return bound
    if key.endswith("_max_abs"):
        return max(bound, 1.5 * at_export)
    if "_cos_" in key:
        return min(bound, 1.0 - 1.5 * (1.0 - at_export))
    return min(bound, at_export - 0.05)


def judge(
    variant: str, kind: str, measures: Worst, *, exact: bool, at_export: dict[str, float] | None = None
) -> tuple[Status, str | None]:
    """PASS, or FAIL with every measure out of bounds (output, probe, size). ``exact``: the
    variant is held to fp32's tolerance (fp32 itself); ``at_export``: the variant's own
    measures at export (``bound_for``)."""
    problems = []
    if measures.get("nan", (0.0, ""))[0]:
        problems.append("NaN in the outputs")
    if exact:
        for key in _ABS:
            if key in measures and measures[key][0] > FP32_TOLERANCE:
                value, where = measures[key]
                output = _OUTPUT[key.split("_")[0]]
                what = "row norms of " if "norm" in key else ""
                problems.append(
                    f"{what}{output} of {where} differ{'s' if not what else ''} by {value:.3g} "
                    f"(fp32 tolerance {FP32_TOLERANCE:g})"
                )
    else:
        bounds = BOUNDS["reranker" if kind == RERANKER_KIND else "embedder"].get(variant, {})
        for key, fixed in bounds.items():
            if key not in measures:
                continue
            bound = bound_for(key, fixed, (at_export or {}).get(key))
            value, where = measures[key]
            upper = key.endswith("_max_abs")
            if (value > bound) if upper else (value < bound):
                output = _OUTPUT[key.split("_")[0]]
                loosened = "" if bound == fixed else f", as measured at export; {fixed:g} by default"
                problems.append(
                    f"{output}: {key} {value:.4g} at {where} ({'limit' if upper else 'bound'} "
                    f"{'<=' if upper else '>='} {bound:.4g} for {variant}{loosened})"
                )
    return ("FAIL", "; ".join(problems)) if problems else ("PASS", None)


def _tokens_differ(ref: Observed, got: Observed, names: Sequence[str]) -> str | None:
    bad = [i for i in range(len(names)) if ref.tokens[i] != got.tokens[i]]
    if not bad:
        return None
    i = bad[0]
    return (
        f"the tokenizer gives {len(bad)} probe(s) other token counts than at export, "
        f"e.g. '{names[i]}': {got.tokens[i]} here, {ref.tokens[i]} in the reference"
    )


# -- running ---------------------------------------------------------------------------


def _open(
    package: Package, variant: str, providers: Sequence[str] | None, cache_dir: str | Path | None, **options: Any
) -> Any:
    """An ``M3Model`` or ``M3Reranker`` (by the package's kind) of ``variant`` on ``providers``."""
    if package.manifest.kind.pairs:
        from .reranker import M3Reranker

        return M3Reranker(package.root, variant=variant, providers=providers, cache_dir=cache_dir, **options)  # type: ignore[arg-type]
    from .model import M3Model

    return M3Model(package.root, variant=variant, providers=providers, cache_dir=cache_dir, **options)  # type: ignore[arg-type]


def run_one(
    model: Any, probes: Probes, ref: Observed, *, variant: str, exact: bool
) -> tuple[Status, str | None, dict[str, float]]:
    """Both runs of ``probes`` on a loaded model, compared with ``ref``."""
    single = observe(model, probes, batched=False)
    runs = [observe(model, probes, batched=True, alone=single), single]
    for got in runs:
        differ = _tokens_differ(ref, got, probes.names)
        if differ:
            return "FAIL", differ, {}
    measures = _merge(*(compare(ref, got, probes.names) for got in runs))
    at_export = model.engine.package.manifest.variants[variant].at_export
    status, reason = judge(variant, probes.kind, measures, exact=exact, at_export=at_export)
    return status, reason, {k: v for k, (v, _) in measures.items()}


def check_loaded(model: Any, *, cache_dir: str | Path | None = None) -> CheckReport:
    """``check`` for one loaded ``M3Model`` / ``M3Reranker``: its variant on the providers it runs on."""
    engine = model.engine
    start = time.perf_counter()
    probes, ref, described, notes = _baseline(engine.package, cache_dir)
    baseline = engine.package.manifest.references is None and engine.variant == "fp32" and engine.providers[0] == CPU
    if ref is None or baseline:
        why = f"no reference: {described}" if ref is None else "the baseline itself (no reference outputs)"
        result = CheckResult(engine.variant, engine.providers[0], "SKIP", why, engine.providers[0])
    else:
        exact = engine.variant == "fp32"
        status, reason, metrics = run_one(model, probes, ref, variant=engine.variant, exact=exact)
        reason = "; ".join([*engine.fallbacks, *([reason] if reason else [])]) or None
        result = CheckResult(
            engine.variant, engine.providers[0], status, reason, engine.providers[0], metrics,
            round(time.perf_counter() - start, 2),
        )  # fmt: skip
    return CheckReport(str(engine.package.root), described, (result,), tuple(notes))


def _baseline(package: Package, cache_dir: str | Path | None) -> tuple[Probes, Observed | None, str, list[str]]:
    """(probes, what to compare with, what that is, notes). Without stored references:
    the fp32 variant on the CPU here, or None if the package has no fp32."""
    m = package.manifest
    if m.references is not None:
        package.verify((m.references,))
        refs = read_references(package.path(m.references))
        probes = Probes.of(refs)
        return probes, reference_observed(refs, m.special_tokens.unused_for_sparse), (
            f"PyTorch fp32 outputs stored at export ({len(probes.names)} probes)"
        ), []  # fmt: skip
    probes = Probes.builtin(package)
    note = "this package has no reference outputs (exported before m3 check)"
    if "fp32" not in m.variants:
        return probes, None, f"nothing: {note} and no fp32 variant to compare with", []
    fp32 = _open(package, "fp32", [CPU], cache_dir)
    base = observe(fp32, probes, batched=False)
    return probes, base, f"fp32 on the CPU here; {note}", [note + "; fp32 on the CPU is the baseline, not checked"]


def check_package(
    package_dir: str | Path,
    *,
    variants: Sequence[str] | None = None,
    providers: Sequence[str] | None = None,
    cache_dir: str | Path | None = None,
    progress: Callable[[CheckResult], None] | None = None,
    skip_long: bool = False,
) -> CheckReport:
    """Every asked variant on every asked provider (see the module docstring).

    ``variants`` default to the package's; ``providers`` to those of TensorRT, CUDA and the
    CPU that this ONNX Runtime has. Left to their defaults, a variant runs only on the
    providers it is built for (``contract.PROVIDERS_FOR_VARIANT``; fp16 is not run on
    the CPU, and a note says so); named ones run on every named provider.
    ``progress`` is called with each row as it is done. ``skip_long`` leaves out the probes
    over ``LONG_PROBE_TOKENS`` tokens (the one at ``max_length``: minutes under an emulator)."""
    package = load_package(package_dir)
    m = package.manifest
    asked_variants = list(variants) if variants else list(m.variants)
    for v in asked_variants:
        if v not in VARIANTS:
            raise CheckError(f"unknown variant {v!r} (known: {', '.join(VARIANTS)})")
        package.variant(v)  # PackageError naming the variants it has
    have = available_providers()
    known = set(import_ort().get_all_providers())
    if providers:
        unknown = [p for p in providers if p not in known]
        if unknown:
            raise CheckError(f"unknown execution provider(s) {unknown}; e.g. {', '.join(PROVIDER_ORDER)}")
    asked_providers = list(providers) if providers else [p for p in PROVIDER_ORDER if p in have]
    explicit = bool(variants) or bool(providers)
    notes: list[str] = []
    plan = []
    for v in asked_variants:
        usable = [p for p in asked_providers if explicit or p in PROVIDERS_FOR_VARIANT[v]]  # type: ignore[index]
        if not usable:
            notes.append(
                f"{v} is built for {', '.join(PROVIDERS_FOR_VARIANT[v])} (not in this ONNX Runtime): "  # type: ignore[index]
                f"not run; `--variants {v}` runs it on the CPU"
            )
        plan += [(v, p) for p in usable]

    probes, ref, described, base_notes = _baseline(package, cache_dir)
    notes += base_notes
    if skip_long and ref is not None:
        keep = [i for i, t in enumerate(ref.tokens) if t <= LONG_PROBE_TOKENS]
        dropped = [n for i, n in enumerate(probes.names) if i not in keep]
        if dropped:
            notes.append(f"left out (--skip-long): {', '.join(dropped)}")
        probes, ref = _subset(probes, ref, keep)
    results = []
    for variant, provider in plan:
        result = _row(package, variant, provider, have, probes, ref, described, cache_dir)
        if progress is not None:
            progress(result)
        results.append(result)
    return CheckReport(str(package.root), described, tuple(results), tuple(notes))


def _subset(probes: Probes, ref: Observed, keep: list[int]) -> tuple[Probes, Observed]:
    """The probes (and their reference outputs) at ``keep``."""

    def take(items: Any) -> Any:
        return None if items is None else [items[i] for i in keep] if len(items) else []

    short = Probes(
        take(probes.names),
        probes.kind,
        texts=take(probes.texts) or [],
        max_length=probes.max_length,
        pairs=take(probes.pairs) or [],
        pair_lengths=take(probes.pair_lengths) or [],
        index=take(probes.index),
    )
    arrays = {
        name: None if value is None else value[keep]
        for name, value in (("tokens", ref.tokens), ("dense", ref.dense), ("scores", ref.scores))
    }
    return short, Observed(
        tokens=arrays["tokens"],  # type: ignore[arg-type]
        dense=arrays["dense"],
        lexical=take(ref.lexical),
        colbert=take(ref.colbert),
        norms=take(ref.norms),
        scores=arrays["scores"],
        nan=ref.nan,
    )


def _row(
    package: Package,
    variant: str,
    provider: str,
    have: list[str],
    probes: Probes,
    ref: Observed | None,
    described: str,
    cache_dir: str | Path | None,
) -> CheckResult:
    if provider not in have:
        return CheckResult(
            variant, provider, "SKIP", f"{provider} is not installed: this ONNX Runtime has {', '.join(have)}"
        )
    if ref is None:
        return CheckResult(variant, provider, "SKIP", f"no reference: {described}")
    if package.manifest.references is None and variant == "fp32" and provider == CPU:
        return CheckResult(variant, provider, "SKIP", "the baseline itself (the package has no reference outputs)", CPU)
    start = time.perf_counter()
    try:
        model = _open(package, variant, [provider], cache_dir)
    except M3Error:
        raise
    except Exception as exc:  # ONNX Runtime could not load the graph even on the CPU
        return CheckResult(variant, provider, "FAIL", f"could not load: {' '.join(str(exc).split())}")
    engine = model.engine
    ran_on = engine.providers[0]
    if ran_on != provider:
        fell = "; ".join(engine.fallbacks) or f"fell back to {ran_on}"
        return CheckResult(variant, provider, "SKIP", fell, ran_on, seconds=round(time.perf_counter() - start, 2))
    try:
        status, reason, metrics = run_one(model, probes, ref, variant=variant, exact=variant == "fp32")
    except M3Error as exc:
        message = " ".join(str(exc).split())
        if provider == TENSORRT:  # TensorRT builds its engine at the first run: a failed build is SKIP
            status, reason, metrics = "SKIP", f"{TENSORRT} failed at its first run (its engine build): {message}", {}
        else:
            status, reason, metrics = "FAIL", f"{type(exc).__name__}: {message}", {}
    return CheckResult(variant, provider, status, reason, ran_on, metrics, round(time.perf_counter() - start, 2))


def provider_in_use(package: Package, variant: str) -> tuple[str, list[str]]:
    """The provider a model of ``variant`` runs on here, and why it is not the one asked
    for (``Engine.fallbacks``). A session is opened only where a GPU provider the variant
    is built for is installed (it may fail to start); else it is the CPU."""
    from .session import GPU_PROVIDERS

    have = available_providers()
    info = package.variant(variant)
    if not any(p in have for p in GPU_PROVIDERS if p in info.providers):
        return CPU, []
    engine = _open(package, variant, None, None, verify=False).engine
    return engine.providers[0], engine.fallbacks


class CheckFailed(M3Error, RuntimeError):
    """``m3 serve --check``: a served model FAILed its check."""


def refuse_failed(report: CheckReport) -> None:
    """Raise ``CheckFailed`` naming the first FAIL of ``report`` (SKIPs pass: nothing was wrong)."""
    for row in report.results:
        if row.status == "FAIL":
            raise CheckFailed(
                f"m3 check FAILed for {report.package} ({row.variant} on {row.ran_on}): {row.reason}; not serving it"
            )


def parse_list(value: str, what: str) -> list[str]:
    """``a,b,c`` -> ``["a", "b", "c"]`` for ``--variants`` / ``--providers``."""
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise InputError(f"{what} takes a comma-separated list, got {value!r}")
    return items
