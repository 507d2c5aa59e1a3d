"""Compare an exported graph with the PyTorch model on the same token ids.

Embedders (all against PyTorch fp32, on real tokens only, padding excluded):
- ``dense_max_abs``, ``dense_cos_min``, ``dense_cos_mean``
- ``sparse_max_abs`` (token weights), ``sparse_top10_overlap`` (mean share of each
  text's 10 heaviest lexical ids that the variant also ranks in its top 10)
- ``colbert_max_abs``, ``colbert_cos_min`` (per row), ``colbert_score_max_abs``
  (ColBERT score of every text pair)
- ``nan`` (1.0 if any output had a NaN, padded rows included)

Rerankers (``texts.RERANK_PAIRS``: (query, passage) pairs grouped by query, tokenised by the
runtime's ``M3Tokenizer.encode_pairs`` as FlagReranker does; ``compare_scores``).
A reranker's user sees two things: the score itself (thresholds, TEI's sigmoid) and the
order of each query's candidates, so:
- ``scores_max_abs``: max |logit - fp32 logit|; the fp32 export fails above ``FP32_TOLERANCE``
- ``scores_sigmoid_max_abs``: the same after the sigmoid (``normalize=True``, TEI's default)
- ``scores_spearman``: Spearman rank correlation with fp32 over all pairs
- ``scores_order_agreement``: of every two candidates of one query (fp32 scores not tied),
  the share the variant orders as fp32 does (Kendall's concordance within queries)
- ``scores_top1_agreement``: share of queries (2+ candidates) whose best candidate is fp32's
- ``nan``
and int8 on real English text (``rerank_fidelity``): the same measures against the fp32
graph on keyword queries x 8 candidates each (``texts.rerank_set``), prefixed ``real_``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from m3_runtime.batching import pad_batch
from m3_runtime.check import FP32_TOLERANCE as FP32_TOLERANCE  # shared with m3 check
from m3_runtime.contract import COLBERT, CPU, DENSE, INPUT_NAMES, SCORES, SPARSE, graph_file
from m3_runtime.scoring import colbert_score, lexical_weights
from m3_runtime.session import int8_activation_bits, set_int8_activation_bits
from m3_runtime.testing import spearman

BATCH = 8


@dataclass
class Outputs:
    """Per-text outputs on real tokens: dense [hidden], token weights [len], ColBERT [len - 1, hidden]."""

    ids: list[np.ndarray]
    dense: list[np.ndarray]
    sparse: list[np.ndarray]
    colbert: list[np.ndarray]
    nan: bool = False


def _batches(ids: Sequence[list[int]]) -> list[list[int]]:
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    return [order[i : i + BATCH] for i in range(0, len(order), BATCH)]


def _collect(ids: Sequence[list[int]], run, pad_id: int) -> Outputs:
    """``run(input_ids, mask) -> {output name: array}``; sparse/ColBERT lists stay empty for dense-only graphs."""
    n = len(ids)
    out = Outputs(ids=[np.asarray(x) for x in ids], dense=[None] * n, sparse=[], colbert=[])  # type: ignore[list-item]
    for batch in _batches(ids):
        input_ids, mask = pad_batch([ids[i] for i in batch], pad_id)
        res = run(input_ids, mask)
        out.nan |= any(bool(np.isnan(a).any()) for a in res.values())
        if SPARSE in res and not out.sparse:
            out.sparse, out.colbert = [None] * n, [None] * n  # type: ignore[list-item]
        for row, i in enumerate(batch):
            length = len(ids[i])
            out.dense[i] = res[DENSE][row]
            if SPARSE in res:
                out.sparse[i] = res[SPARSE][row, :length]
                out.colbert[i] = res[COLBERT][row, : length - 1]
    return out


def torch_outputs(model, ids: Sequence[list[int]], pad_id: int) -> Outputs:
    import torch

    def run(input_ids: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
        with torch.inference_mode():
            res = model(torch.from_numpy(input_ids), torch.from_numpy(mask))
        if isinstance(res, torch.Tensor):  # dense-only graph
            return {DENSE: res.float().numpy()}
        return {name: r.float().numpy() for name, r in zip((DENSE, SPARSE, COLBERT), res, strict=True)}

    return _collect(ids, run, pad_id)


def cpu_session(graph: Path) -> Any:
    """A plain CPU session of ``graph``; an int8 graph with the activation bits the
    runtime gives it on this CPU (``m3_runtime.session.int8_activation_bits``)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if graph.name == graph_file("int8"):
        set_int8_activation_bits(options, int8_activation_bits())
    return ort.InferenceSession(str(graph), sess_options=options, providers=[CPU])


def onnx_outputs(graph: Path, ids: Sequence[list[int]], pad_id: int) -> Outputs:
    session = cpu_session(graph)

    names = [o.name for o in session.get_outputs()]

    def run(input_ids: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
        return dict(zip(names, session.run(names, {INPUT_NAMES[0]: input_ids, INPUT_NAMES[1]: mask}), strict=True))

    return _collect(ids, run, pad_id)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine in float64; two zero rows count as identical (1.0)."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    num = (a64 * b64).sum(-1)
    den = np.linalg.norm(a64, axis=-1) * np.linalg.norm(b64, axis=-1)
    return np.where(den > 0, num / np.maximum(den, 1e-30), 1.0)


def _top10(weights: dict[str, float]) -> set[str]:
    return {k for k, _ in sorted(weights.items(), key=lambda kv: -kv[1])[:10]}


def compare(ref: Outputs, got: Outputs, unused: frozenset[int]) -> dict[str, float]:
    dense_ref, dense_got = np.stack(ref.dense), np.stack(got.dense)
    dense_cos = cosine(dense_ref, dense_got)
    dense = {
        "dense_max_abs": float(np.abs(dense_ref - dense_got).max()),
        "dense_cos_min": float(dense_cos.min()),
        "dense_cos_mean": float(dense_cos.mean()),
    }
    if not ref.sparse:  # dense-only model
        return {**dense, "nan": float(got.nan)}
    col_ref = np.concatenate([c for c in ref.colbert if len(c)])
    col_got = np.concatenate([c for c in got.colbert if len(c)])
    overlaps = []
    for ids, s_ref, s_got in zip(ref.ids, ref.sparse, got.sparse, strict=True):
        top_ref = _top10(lexical_weights(s_ref, ids, unused))
        if top_ref:
            overlaps.append(len(top_ref & _top10(lexical_weights(s_got, ids, unused))) / len(top_ref))
    n = len(ref.colbert)
    score_diff = max(
        abs(colbert_score(ref.colbert[i], ref.colbert[j]) - colbert_score(got.colbert[i], got.colbert[j]))
        for i in range(n)
        for j in range(n)
        if len(ref.colbert[i]) and len(ref.colbert[j])
    )
    return {
        **dense,
        "sparse_max_abs": float(max(np.abs(a - b).max() for a, b in zip(ref.sparse, got.sparse, strict=True))),
        "sparse_top10_overlap": float(np.mean(overlaps)) if overlaps else 1.0,
        "colbert_max_abs": float(np.abs(col_ref - col_got).max()),
        "colbert_cos_min": float(cosine(col_ref, col_got).min()),
        "colbert_score_max_abs": float(score_diff),
        "nan": float(got.nan),
    }


def max_abs(metrics: dict[str, float]) -> float:
    keys = ("dense_max_abs", "sparse_max_abs", "colbert_max_abs", "scores_max_abs")
    return max(metrics.get(k, 0.0) for k in keys)


# --- rerankers -------------------------------------------------------------------------


@dataclass
class Scores:
    """One raw logit per pair, in input order."""

    values: np.ndarray
    nan: bool = False


def _collect_scores(ids: Sequence[list[int]], run, pad_id: int) -> Scores:
    """``run(input_ids, mask) -> scores [batch]`` over length-sorted padded batches."""
    values = np.zeros(len(ids), np.float32)
    nan = False
    for batch in _batches(ids):
        input_ids, mask = pad_batch([ids[i] for i in batch], pad_id)
        res = np.asarray(run(input_ids, mask), dtype=np.float32)
        nan |= bool(np.isnan(res).any())
        values[batch] = res
    return Scores(values=values, nan=nan)


def torch_scores(model, ids: Sequence[list[int]], pad_id: int) -> Scores:
    import torch

    def run(input_ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(input_ids), torch.from_numpy(mask)).float().numpy()

    return _collect_scores(ids, run, pad_id)


def onnx_scores(graph: Path, ids: Sequence[list[int]], pad_id: int) -> Scores:
    session = cpu_session(graph)

    def run(input_ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return session.run([SCORES], {INPUT_NAMES[0]: input_ids, INPUT_NAMES[1]: mask})[0]

    return _collect_scores(ids, run, pad_id)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x.astype(np.float64)))


def ranking_agreement(ref: np.ndarray, got: np.ndarray, groups: Sequence[int]) -> tuple[float, float]:
    """(order agreement, top-1 agreement) of ``got`` with ``ref`` within each group (query):
    the share of candidate pairs not tied in ``ref`` that ``got`` orders the same way, and
    the share of groups of 2+ candidates whose ``argmax`` is the same. 1.0 if none."""
    group_ids = np.asarray(groups)
    kept = total = top_same = top_total = 0
    for g in dict.fromkeys(groups):
        rows = np.flatnonzero(group_ids == g)
        if len(rows) < 2:
            continue
        r, s = ref[rows].astype(np.float64), got[rows].astype(np.float64)
        dr = np.sign(r[:, None] - r[None, :])
        ds = np.sign(s[:, None] - s[None, :])
        upper = np.triu(np.ones_like(dr, dtype=bool), k=1) & (dr != 0)
        kept += int((dr[upper] == ds[upper]).sum())
        total += int(upper.sum())
        top_same += int(np.argmax(r) == np.argmax(s))
        top_total += 1
    return (kept / total if total else 1.0), (top_same / top_total if top_total else 1.0)


def compare_scores(ref: Scores, got: Scores, groups: Sequence[int], *, prefix: str = "") -> dict[str, float]:
    """The reranker metrics of the module docstring, ``got`` against ``ref``."""
    order, top1 = ranking_agreement(ref.values, got.values, groups)
    metrics = {
        f"{prefix}scores_max_abs": float(np.abs(ref.values.astype(np.float64) - got.values).max()),
        f"{prefix}scores_sigmoid_max_abs": float(np.abs(_sigmoid(ref.values) - _sigmoid(got.values)).max()),
        f"{prefix}scores_spearman": spearman(ref.values, got.values),
        f"{prefix}scores_order_agreement": order,
        f"{prefix}scores_top1_agreement": top1,
    }
    if not prefix:
        metrics["nan"] = float(got.nan)
    return metrics


def query_groups(pairs: Sequence[tuple[str, str]]) -> list[int]:
    """Group number of each pair: consecutive pairs with one query are one group."""
    groups: list[int] = []
    for i, (query, _) in enumerate(pairs):
        same = i > 0 and pairs[i - 1][0] == query
        groups.append(groups[-1] if same else (groups[-1] + 1 if groups else 0))
    return groups


REAL_RERANK_MAX_LENGTH = 256  # a keyword query and a paragraph of <= 120 words fit whole


def rerank_fidelity(
    base_graph: Path, graph: Path, tokenizer, pad_id: int, *, n_queries: int = 30, candidates: int = 8
) -> dict[str, float]:
    """A reranker variant against the fp32 graph on real English text, as a reranking user
    sees it: ``n_queries`` keyword queries over ``texts.english_paragraphs(240)``, each with
    its own paragraph and ``candidates - 1`` others (``texts.rerank_set``). Reports the
    ``compare_scores`` measures prefixed ``real_``, the lowest per-query Spearman
    (``real_scores_spearman_min``) and the share of queries whose own paragraph fp32 ranks
    first (``real_target_top1_fp32``: whether the set means anything to this model)."""
    from .texts import english_paragraphs, rerank_set

    pairs, groups = rerank_set(english_paragraphs(240), n_queries, candidates)
    ids = tokenizer.encode_pairs(pairs, max_length=REAL_RERANK_MAX_LENGTH)
    base, got = onnx_scores(base_graph, ids, pad_id), onnx_scores(graph, ids, pad_id)
    metrics = compare_scores(base, got, groups, prefix="real_")
    group_ids = np.asarray(groups)
    per_query = [spearman(base.values[group_ids == g], got.values[group_ids == g]) for g in dict.fromkeys(groups)]
    metrics["real_scores_spearman_min"] = float(min(per_query))
    # rerank_set puts each query's own paragraph first among its candidates.
    firsts = [np.flatnonzero(group_ids == g)[0] for g in dict.fromkeys(groups)]
    metrics["real_target_top1_fp32"] = float(
        np.mean(
            [
                base.values[f] >= base.values[group_ids == g].max()
                for f, g in zip(firsts, dict.fromkeys(groups), strict=True)
            ]
        )
    )
    return metrics


def retrieval_fidelity(
    base_graph: Path, graph: Path, tokenizer, pad_id: int, *, n_passages: int = 240, n_queries: int = 60
) -> dict[str, float]:
    """A variant against fp32 on real English text, as a retrieval user sees it.

    Passages: ``n_passages`` paragraphs of ``texts.english_paragraphs`` (<= 128 tokens).
    Two query sets: keyword queries, one per paragraph, its 4-6 most distinctive words
    (``texts.keyword_queries``, passages whole; ``real_keyword_*``); and the opening
    8-12 words of ``n_queries`` paragraphs, cut off their passage
    (``texts.retrieval_set``; ``real_top10_overlap``, ``real_target_*``). Reports dense
    cosine (min/mean over passages and both query sets), for each set the mean overlap
    of each query's top-10 passages, the share of queries whose target passage changed
    rank, and the share fp32 ranks first.
    """
    from .texts import english_paragraphs, keyword_queries, retrieval_set

    paragraphs = english_paragraphs(n_passages)
    opened, opening = retrieval_set(paragraphs, n_queries)
    keywords = keyword_queries(paragraphs)
    # metric names: (top-10 overlap, target rank changed, fp32 ranks the target first)
    sets = {
        ("real_top10_overlap", "real_target_rank_changed", "real_target_top1_fp32"): (opened, opening),
        ("real_keyword_top10_overlap", "real_keyword_rank_changed", "real_keyword_top1_fp32"): (paragraphs, keywords),
    }
    texts = [t for passages, queries in sets.values() for t in passages + [q for q, _ in queries]]
    # Each distinct text runs once (the whole paragraphs are in both sets), then rows are
    # laid out per set.
    row_of = {t: i for i, t in enumerate(dict.fromkeys(texts))}
    ids = tokenizer.encode(list(row_of), 128)
    rows_all = [row_of[t] for t in texts]
    base = np.stack(onnx_outputs(base_graph, ids, pad_id).dense).astype(np.float64)[rows_all]
    got = np.stack(onnx_outputs(graph, ids, pad_id).dense).astype(np.float64)[rows_all]
    cos = cosine(base, got)
    metrics = {"real_dense_cos_min": float(cos.min()), "real_dense_cos_mean": float(cos.mean())}
    start = 0
    for (overlap_key, changed_key, top1_key), (passages, queries) in sets.items():
        n, m = len(passages), len(queries)
        rows = slice(start, start + n + m)
        start += n + m
        ranks = []
        for vecs in (base[rows], got[rows]):
            ranks.append(np.argsort(-(vecs[n:] @ vecs[:n].T), axis=1, kind="stable"))
        overlap = np.mean([len(set(a[:10]) & set(b[:10])) / 10 for a, b in zip(*ranks, strict=True)])
        targets = np.array([i for _, i in queries])
        pos_base, pos_got = (np.argmax(r == targets[:, None], axis=1) for r in ranks)
        metrics[overlap_key] = float(overlap)
        metrics[changed_key] = float(np.mean(pos_base != pos_got))
        metrics[top1_key] = float(np.mean(pos_base == 0))
    return metrics
