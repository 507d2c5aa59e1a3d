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
from typing import Any

from .check_measures import (
    _ABS,
    Observed,
    Probes,
    Status,
    _merge,
    _tokens_differ,
    compare,
    judge,
    observe,
    reference_observed,
)
from .check_measures import (
    BOUNDS as BOUNDS,
)
from .check_measures import (
    FP32_TOLERANCE as FP32_TOLERANCE,
)
from .contract import CPU, CUDA, PROVIDERS_FOR_VARIANT, TENSORRT, VARIANTS
from .errors import InputError, M3Error
from .package import Package, load_package
from .references import read_references
from .session import available_providers, import_ort

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
