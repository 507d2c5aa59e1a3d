"""What ``m3 check`` measures: the probes' outputs from a model (``observe``), their
differences from the stored references (``compare``), and the bounds they are judged by
(``BOUNDS``, ``bound_for``, ``judge``). ``check.py`` runs variants on providers with these
and reports."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from . import scoring
from .contract import RERANKER_KIND
from .package import Package
from .references import References, sample_rows, split
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
