"""``m3 eval --tune``: the hybrid weights (and reciprocal rank fusion) searched on a dev split.

Every setting re-orders the same candidates (each dev query's dense top-C + sparse
top-C, with exact dense, sparse and ColBERT scores computed once), so the grid costs no
extra encoding. The objective is the first ``--k``'s nDCG. The best setting is then
applied to the test split's candidates and compared with 0.4 / 0.2 / 0.4 there.
"""

from __future__ import annotations

from itertools import product
from typing import Any

import numpy as np

from ..contract import COLBERT, SPARSE
from ..errors import UnsupportedOutput
from . import metrics, retrieval
from .data import RetrievalSet
from .retrieval import Say
from .run import DEFAULT_WEIGHTS, EvalConfig, VariantEvaluator

STEP = 0.1


def weight_grid(step: float = STEP) -> list[tuple[float, float, float]]:
    """(dense, sparse, colbert) on a ``step`` grid summing to 1, dense + sparse > 0."""
    n = round(1 / step)
    return [
        (round(a * step, 6), round(b * step, 6), round((n - a - b) * step, 6))
        for a, b in product(range(n + 1), repeat=2)
        if a + b <= n and a + b > 0
    ]


def _score(ranked: retrieval.Ranked, data: RetrievalSet, ks: list[int]) -> dict[str, np.ndarray]:
    return metrics.per_query(data.qrels, data.query_ids, data.corpus_ids, ranked.indices, ks)


def _setting(pools: retrieval.Pools, setting: Any) -> retrieval.Ranked:
    return retrieval.rrf_ranking(pools) if setting == "rrf" else retrieval.weighted_ranking(pools, setting)


def _name(setting: Any) -> str:
    return "rrf (k=60)" if setting == "rrf" else "weights " + ",".join(f"{w:g}" for w in setting)


def tune(package: str, dev: RetrievalSet, test: RetrievalSet, cfg: EvalConfig, *, say: Say) -> dict[str, Any]:
    variant = cfg.variants[0]
    ev = VariantEvaluator(package, variant, cfg, say, tuning=True)
    kind = ev.model.engine.kind
    if not (kind.has(SPARSE) and kind.has(COLBERT)):
        raise UnsupportedOutput(f"--tune weighs dense, sparse and ColBERT scores; the package is a {kind.description}")
    ks = list(cfg.ks)
    objective = f"ndcg@{ks[0]}"
    _, dev_pools = ev.rankings(dev, ["all"], DEFAULT_WEIGHTS)
    assert dev_pools is not None
    settings: list[Any] = [*weight_grid(), "rrf"]
    say(f"tuning: {len(settings)} settings on {len(dev.query_ids)} {dev.split} queries ({variant})")
    scored = [(float(_score(_setting(dev_pools, s), dev, ks)[objective].mean()), s) for s in settings]
    default_dev = float(_score(_setting(dev_pools, DEFAULT_WEIGHTS), dev, ks)[objective].mean())
    best_value, best = max(scored, key=lambda x: x[0])  # first of equals: grid order
    _, test_pools = ev.rankings(test, ["all"], DEFAULT_WEIGHTS)
    assert test_pools is not None
    best_test = _score(_setting(test_pools, best), test, ks)
    default_test = _score(_setting(test_pools, DEFAULT_WEIGHTS), test, ks)
    delta = metrics.paired_delta(default_test[objective], best_test[objective])
    top = sorted(scored, key=lambda x: -x[0])[:5]
    return {
        "variant": variant,
        "objective": objective,
        "dev_split": dev.split,
        "test_split": test.split,
        "best": _name(best),
        "best_weights": None if best == "rrf" else list(best),
        "dev": {
            "best": best_value,
            "default": default_dev,
            "top5": [{"setting": _name(s), objective: v} for v, s in top],
        },
        "test": {
            "best": metrics.means(best_test),
            "default": metrics.means(default_test),
            "gain": {"metric": objective, **delta.as_dict()},
        },
    }
