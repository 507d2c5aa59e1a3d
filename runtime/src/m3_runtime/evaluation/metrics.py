"""Retrieval metrics from pytrec_eval (trec_eval, the code MTEB scores retrieval with),
and paired comparisons over queries from SciPy. No metric formula of our own.

Names: ``ndcg@k`` (trec_eval ``ndcg_cut.k``), ``recall@k`` (``recall.k``), ``map@k``
(``map_cut.k``: average precision over the top k, divided by the query's relevant
count), ``mrr@k`` (``recip_rank`` of the ranking cut at k). trec_eval orders a run by
score and breaks ties by document id; we hand it each query's ranking with scores
``depth - rank`` so it keeps our order (ties broken by corpus order) exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import M3Error

FAMILIES = ("ndcg", "recall", "mrr", "map")
CONFIDENCE = 0.95


class MissingExtra(M3Error, ImportError):
    """An optional dependency of ``m3 eval`` is not installed."""


def _pytrec_eval():
    try:
        import pytrec_eval
    except ImportError:
        raise MissingExtra('m3 eval needs pytrec_eval and SciPy: pip install "m3-runtime[eval]"') from None
    return pytrec_eval


def metric_names(ks: Sequence[int]) -> list[str]:
    return [f"{family}@{k}" for family in FAMILIES for k in ks]


def run_dict(
    query_ids: Sequence[str], corpus_ids: Sequence[str], rankings: Sequence[np.ndarray], cut: int | None = None
):
    run = {}
    for qid, ranking in zip(query_ids, rankings, strict=True):
        top = ranking if cut is None else ranking[:cut]
        run[qid] = {corpus_ids[int(i)]: float(len(top) - r) for r, i in enumerate(top)}
    return run


def per_query(
    qrels: dict[str, dict[str, int]],
    query_ids: Sequence[str],
    corpus_ids: Sequence[str],
    rankings: Sequence[np.ndarray],
    ks: Sequence[int],
) -> dict[str, np.ndarray]:
    """``{metric: (n_queries,) values in query_ids order}``, every metric from trec_eval."""
    pte = _pytrec_eval()
    qrels = {q: qrels[q] for q in query_ids}
    ks_text = ",".join(str(k) for k in ks)
    evaluator = pte.RelevanceEvaluator(qrels, {f"ndcg_cut.{ks_text}", f"recall.{ks_text}", f"map_cut.{ks_text}"})
    full = evaluator.evaluate(run_dict(query_ids, corpus_ids, rankings))
    out: dict[str, np.ndarray] = {}
    for k in ks:
        out[f"ndcg@{k}"] = np.array([full.get(q, {}).get(f"ndcg_cut_{k}", 0.0) for q in query_ids])
        out[f"recall@{k}"] = np.array([full.get(q, {}).get(f"recall_{k}", 0.0) for q in query_ids])
        out[f"map@{k}"] = np.array([full.get(q, {}).get(f"map_cut_{k}", 0.0) for q in query_ids])
        rr = pte.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(run_dict(query_ids, corpus_ids, rankings, cut=k))
        out[f"mrr@{k}"] = np.array([rr.get(q, {}).get("recip_rank", 0.0) for q in query_ids])
    return {name: out[name] for name in metric_names(ks)}


def means(values: dict[str, np.ndarray]) -> dict[str, float]:
    return {name: float(v.mean()) for name, v in values.items()}


@dataclass(frozen=True)
class Delta:
    """``other - base`` of one metric over the same queries: mean, 95% bootstrap interval, paired t-test p."""

    mean: float
    low: float
    high: float
    p_value: float

    def as_dict(self) -> dict[str, float]:
        return {"delta": self.mean, "ci_low": self.low, "ci_high": self.high, "p_value": self.p_value}


def paired_delta(base: np.ndarray, other: np.ndarray, *, resamples: int = 2000, seed: int = 0) -> Delta:
    """Mean per-query difference with SciPy's bootstrap interval (percentile, 95%) and
    the paired t-test's two-sided p-value. Identical values give ``[d, d]`` and p = 1."""
    try:
        from scipy import stats
    except ImportError:
        raise MissingExtra('m3 eval needs pytrec_eval and SciPy: pip install "m3-runtime[eval]"') from None
    diff = np.asarray(other, np.float64) - np.asarray(base, np.float64)
    mean = float(diff.mean())
    if len(diff) < 2 or np.all(diff == diff[0]):
        return Delta(mean, mean, mean, 1.0)
    ci = stats.bootstrap(
        (diff,), np.mean, n_resamples=resamples, confidence_level=CONFIDENCE, method="percentile", rng=seed
    ).confidence_interval
    p = float(stats.ttest_rel(other, base).pvalue)
    return Delta(mean, float(ci.low), float(ci.high), p)
