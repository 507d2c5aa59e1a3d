"""``m3 eval``'s driver: each variant encodes (or reuses) the corpus once, then every
asked mode is ranked from those vectors and scored against the qrels."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..contract import COLBERT, SPARSE
from ..errors import InputError, UnsupportedOutput
from . import metrics, retrieval
from .data import EvalDataError, RetrievalSet
from .retrieval import Ranked, Say, Vectors

MODES = ("dense", "sparse", "colbert", "dense+sparse", "all")
DEFAULT_WEIGHTS = (0.4, 0.2, 0.4)  # the model README's example
RERANK = ">rerank"


@dataclass
class EvalConfig:
    variants: Sequence[str] = ("fp32", "int8")
    modes: Sequence[str] = ("dense",)
    weights: Sequence[float] = DEFAULT_WEIGHTS
    ks: Sequence[int] = (10, 100)
    candidates: int = 100  # C: the dense (and sparse) top-C that colbert and all re-score
    reranker: str | None = None
    rerank_top: int = 100
    rerank_after: str = "dense"
    max_length: int | None = None  # passages' truncation; None: the package's
    # keep the corpus' ColBERT rows (float32) up to this many bytes, else re-encode candidates
    keep_colbert_bytes: int = retrieval.KEEP_COLBERT_BYTES
    embedded: dict[str, str] = field(default_factory=dict)  # variant -> m3 embed-corpus output
    embedded_id_column: str = "_id"


@dataclass
class VariantRun:
    """One variant's per-query metric values per mode, and the vectors for tuning."""

    variant: str
    per_query: dict[str, dict[str, np.ndarray]]  # mode -> metric -> (n_queries,)


def check_config(cfg: EvalConfig, kind) -> None:
    """Refuse what the package cannot serve before any encoding."""
    for mode in cfg.modes:
        if mode not in MODES:
            raise InputError(f"--modes: unknown mode {mode!r} (modes: {', '.join(MODES)})")
        needs = {"sparse": [SPARSE], "dense+sparse": [SPARSE], "colbert": [COLBERT], "all": [SPARSE, COLBERT]}
        missing = [o for o in needs.get(mode, []) if not kind.has(o)]
        if missing:
            raise UnsupportedOutput(
                f"--modes {mode}: the package is a {kind.description} without {' or '.join(missing)} output; "
                "evaluate it with --modes dense"
            )
    if not cfg.ks or any(k < 1 for k in cfg.ks):
        raise InputError(f"--k must be positive cutoffs like 10,100, got {list(cfg.ks)}")
    if cfg.candidates < max(cfg.ks):
        raise InputError(f"--candidates ({cfg.candidates}) must be at least the largest --k ({max(cfg.ks)})")
    if cfg.rerank_top < 1:
        raise InputError(f"--rerank-top must be >= 1, got {cfg.rerank_top}")
    if cfg.reranker and cfg.rerank_after not in cfg.modes:
        raise InputError(f"--rerank-after {cfg.rerank_after} must be one of --modes ({', '.join(cfg.modes)})")
    scoring_weights = list(cfg.weights)
    if len(scoring_weights) != 3 or sum(scoring_weights) == 0 or scoring_weights[0] + scoring_weights[1] == 0:
        raise InputError(f"--weights must be 3 numbers dense,sparse,colbert with nonzero sums, got {scoring_weights}")


class VariantEvaluator:
    """One loaded variant: encodes a set's queries and corpus, ranks, scores."""

    def __init__(self, package: str, variant: str, cfg: EvalConfig, say: Say, *, tuning: bool = False) -> None:
        """``tuning``: keep the corpus' ColBERT rows (small corpora) whatever the modes."""
        from ..model import M3Model

        self.model = M3Model(package, variant=variant)  # type: ignore[arg-type]
        self.variant, self.cfg, self.say = variant, cfg, say
        self.has_sparse = self.model.engine.kind.has(SPARSE)
        self.has_colbert = self.model.engine.kind.has(COLBERT)
        self._corpus: Vectors | None = None
        self._colbert_source: Any = None
        self.tuning = tuning

    def corpus(self, data: RetrievalSet) -> Vectors:
        if self._corpus is None:
            cfg = self.cfg
            wants_colbert = any(m in ("colbert", "all") for m in cfg.modes) or self.tuning
            if self.variant in cfg.embedded:
                from .embedded import load_embedded

                self._corpus, self._colbert_source = load_embedded(
                    cfg.embedded[self.variant], data.corpus_ids, id_column=cfg.embedded_id_column, say=self.say
                )
                width = self._corpus.dense.shape[1]
                if width != self.model.hidden_size:
                    raise EvalDataError(
                        f"{cfg.embedded[self.variant]}: dense vectors of {width} dims, the package's have "
                        f"{self.model.hidden_size}: embedded with another model"
                    )
            else:
                self._corpus = retrieval.encode(
                    self.model,
                    data.corpus_texts,
                    sparse=self.has_sparse,
                    colbert=wants_colbert,
                    colbert_bytes=cfg.keep_colbert_bytes,
                    max_length=cfg.max_length,
                    say=self.say,
                    label=f"{self.variant}: encoding corpus",
                )
        return self._corpus

    def colbert_rows(self, data: RetrievalSet) -> retrieval.ColbertRows:
        """Where the candidates' ColBERT rows come from: kept, embed-corpus' column, or re-encoded."""
        corpus = self.corpus(data)
        if corpus.colbert is not None:
            return retrieval.kept_rows(corpus.colbert)
        if self._colbert_source is not None:
            return self._colbert_source
        # large corpus: re-encode each needed passage once (float32, as the model gives them)
        return retrieval.encoded_rows(self.model, data.corpus_texts, max_length=self.cfg.max_length)

    def queries(self, data: RetrievalSet) -> Vectors:
        return retrieval.encode(
            self.model,
            [(self.model.query_instruction or "") + t for t in data.query_texts],
            sparse=self.has_sparse,
            colbert=self.has_colbert,
            max_length=self.model.query_max_length,
            say=self.say,
            label=f"{self.variant}: encoding queries",
        )

    def rankings(
        self, data: RetrievalSet, modes: Sequence[str], weights: Sequence[float]
    ) -> tuple[dict[str, Ranked], retrieval.Pools | None]:
        cfg = self.cfg
        q, c = self.queries(data), self.corpus(data)
        first_modes = [m for m in ("dense", "sparse", "dense+sparse") if m in modes]
        pooled = [m for m in modes if m in ("colbert", "all")]
        if pooled:
            first_modes = list(dict.fromkeys(["dense", *(["sparse"] if self.has_sparse else []), *first_modes]))
        depth = max(max(cfg.ks), cfg.candidates, cfg.rerank_top if cfg.reranker else 0)
        first = retrieval.first_stage(q, c, depth=depth, modes=first_modes, weights=weights, say=self.say)
        ranked = {m: first[m] for m in modes if m in first}
        pools = None
        if pooled:
            pools = retrieval.pools(
                q, c, first, candidates=cfg.candidates, colbert_rows=self.colbert_rows(data), say=self.say
            )
            if "colbert" in modes:
                ranked["colbert"] = retrieval.colbert_ranking(pools)
            if "all" in modes:
                ranked["all"] = retrieval.weighted_ranking(pools, weights)
        return {m: ranked[m] for m in modes}, pools


def evaluate(package: str, data: RetrievalSet, cfg: EvalConfig, *, say: Say = retrieval.stderr) -> list[VariantRun]:
    """Every variant x mode (and the reranker stage) on ``data``: per-query metric values."""
    runs: list[VariantRun] = []
    for variant in cfg.variants:
        ev = VariantEvaluator(package, variant, cfg, say)
        check_config(cfg, ev.model.engine.kind)
        ranked, _ = ev.rankings(data, cfg.modes, cfg.weights)
        if cfg.reranker:
            from ..reranker import M3Reranker

            rr_variants = _package_variants(cfg.reranker)
            reranker = M3Reranker(cfg.reranker, variant=variant if variant in rr_variants else None)  # type: ignore[arg-type]
            ranked[cfg.rerank_after + RERANK] = retrieval.rerank(
                reranker, data.query_texts, data.corpus_texts, ranked[cfg.rerank_after], top=cfg.rerank_top, say=say
            )
        per_query = {
            mode: metrics.per_query(data.qrels, data.query_ids, data.corpus_ids, r.indices, cfg.ks)
            for mode, r in ranked.items()
        }
        runs.append(VariantRun(variant, per_query))
    return runs


def _package_variants(path: str) -> list[str]:
    from ..package import load_package

    return list(load_package(path).manifest.variants)


def results_json(runs: list[VariantRun], data: RetrievalSet, cfg: EvalConfig) -> dict[str, Any]:
    """``{"results": [{variant, mode, metrics}], "deltas": [{variant, mode, metric, base, delta, ...}]}``."""
    results = [
        {"variant": r.variant, "mode": mode, "metrics": metrics.means(values)}
        for r in runs
        for mode, values in r.per_query.items()
    ]
    deltas = []
    base = next((r for r in runs if r.variant == "fp32"), None)
    for r in runs:
        if base is None or r is base:
            continue
        for mode, values in r.per_query.items():
            for name, v in values.items():
                d = metrics.paired_delta(base.per_query[mode][name], v)
                deltas.append({"variant": r.variant, "mode": mode, "metric": name, "base": "fp32", **d.as_dict()})
    return {
        "data": str(data.root),
        "split": data.split,
        "queries": len(data.query_ids),
        "corpus": len(data.corpus_ids),
        "dropped_queries": len(data.dropped_queries),
        "weights": list(cfg.weights),
        "candidates": cfg.candidates,
        "results": results,
        "deltas": deltas,
    }
