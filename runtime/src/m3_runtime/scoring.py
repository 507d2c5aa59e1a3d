"""Output post-processing and scores, in NumPy, with FlagEmbedding's formulas.

- lexical weights: per text, ``relu`` token weights without the ids of ``<s>``,
  ``</s>``, ``<pad>``, ``<unk>``; weights > 0 only; a repeated id keeps its maximum;
  keys are ``str(token_id)`` in first-occurrence order.
- ``lexical_matching_score(a, b) = sum(a[t] * b[t] for t in a if t in b)``
- ``colbert_score(q, p) = sum_i max_j (q_i . p_j) / len(q)``
- ``compute_score`` combinations: ``sparse+dense = (w1*s + w0*d) / (w1 + w0)`` and
  ``colbert+sparse+dense = (w2*c + w1*s + w0*d) / (w0 + w1 + w2)``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from .errors import InputError, InputTypeError

LexicalWeights = dict[str, float]


def lexical_weights(weights: np.ndarray, ids: np.ndarray, unused: frozenset[int]) -> LexicalWeights:
    """Token weights of one text -> {str(token_id): max weight}, first-occurrence order."""
    keep = weights > 0
    if unused:
        keep &= ~np.isin(ids, np.fromiter(unused, dtype=ids.dtype))
    ids_k, w_k = ids[keep], weights[keep]
    if ids_k.size == 0:
        return {}
    order = np.argsort(ids_k, kind="stable")
    sorted_ids = ids_k[order]
    starts = np.flatnonzero(np.r_[True, sorted_ids[1:] != sorted_ids[:-1]])
    max_w = np.maximum.reduceat(w_k[order], starts)
    first_pos = order[starts]  # stable sort: first occurrence of each id
    by_first = np.argsort(first_pos)
    return dict(zip(map(str, sorted_ids[starts][by_first].tolist()), max_w[by_first].tolist(), strict=True))


def _check_weights(item: object, what: str) -> Mapping[str, float]:
    if not isinstance(item, Mapping):
        raise InputTypeError(f"{what} must be a dict of token id -> weight, got {type(item).__name__}")
    return item


def _as_sparse_matrix(items: Sequence[Mapping[str, float]], vocab: dict[str, int]) -> np.ndarray:
    mat = np.zeros((len(items), len(vocab)), dtype=np.float32)
    for row, item in enumerate(items):
        if item:
            cols = np.fromiter((vocab[k] for k in item), dtype=np.int64, count=len(item))
            mat[row, cols] = np.fromiter(item.values(), dtype=np.float32, count=len(item))
    return mat


def lexical_matching_score(
    a: Mapping[str, float] | Sequence[Mapping[str, float]],
    b: Mapping[str, float] | Sequence[Mapping[str, float]],
) -> float | np.ndarray:
    """One float for two dicts; the ``[len(a), len(b)]`` matrix for two lists."""
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return float(sum(float(w) * float(b[t]) for t, w in a.items() if t in b))
    if isinstance(a, Sequence) and isinstance(b, Sequence) and not isinstance(a, str) and not isinstance(b, str):
        left = [_check_weights(x, f"lexical_weights_1[{i}]") for i, x in enumerate(a)]
        right = [_check_weights(x, f"lexical_weights_2[{i}]") for i, x in enumerate(b)]
        vocab: dict[str, int] = {}
        for item in (*left, *right):
            for key in item:
                vocab.setdefault(key, len(vocab))
        if not left or not right:
            return np.zeros((len(left), len(right)), dtype=np.float32)
        return _as_sparse_matrix(left, vocab) @ _as_sparse_matrix(right, vocab).T
    raise InputError("lexical weights must be two dicts or two lists of dicts")


def paired_lexical_scores(left: Sequence[Mapping[str, float]], right: Sequence[Mapping[str, float]]) -> np.ndarray:
    """``lexical_matching_score(left[k], right[k])`` for every k, as one array."""
    n = len(left)
    if n != len(right):
        raise InputError(f"{n} left items against {len(right)} right items")
    vocab: dict[str, int] = {}

    def keys_and_weights(items: Sequence[Mapping[str, float]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        total = sum(len(x) for x in items)
        pair = np.repeat(np.arange(n, dtype=np.int64), [len(x) for x in items]) if n else np.zeros(0, np.int64)
        tokens = np.fromiter((vocab.setdefault(k, len(vocab)) for x in items for k in x), dtype=np.int64, count=total)
        weights = np.fromiter((w for x in items for w in x.values()), dtype=np.float64, count=total)
        return pair, tokens, weights

    pair_l, tok_l, w_l = keys_and_weights(left)
    pair_r, tok_r, w_r = keys_and_weights(right)
    width = max(len(vocab), 1)
    # Keys of one dict are unique, so (pair, token) keys are unique on each side.
    _, il, ir = np.intersect1d(pair_l * width + tok_l, pair_r * width + tok_r, assume_unique=True, return_indices=True)
    # float64 also when no pair shares a token (bincount of nothing is int64): every score is a float.
    return np.bincount(pair_l[il], weights=w_l[il] * w_r[ir], minlength=n).astype(np.float64)


def colbert_score(q: np.ndarray, p: np.ndarray) -> float:
    """``sum_i max_j (q_i . p_j) / len(q)`` for one query's and one passage's rows."""
    q = np.asarray(q, dtype=np.float32)
    p = np.asarray(p, dtype=np.float32)
    if q.ndim != 2 or p.ndim != 2 or q.shape[1] != p.shape[1]:
        raise InputError(f"colbert vectors must be [len, dim] arrays of one dim, got {q.shape} and {p.shape}")
    if len(q) == 0 or len(p) == 0:
        raise InputError("colbert vectors must have at least one row each")
    return float((q @ p.T).max(axis=1).sum() / len(q))


def paired_colbert_scores(queries: Sequence[np.ndarray], passages: Sequence[np.ndarray], *, chunk: int) -> np.ndarray:
    """``colbert_score(queries[k], passages[k])`` as ``compute_score`` defines it.

    FlagEmbedding scores pairs in chunks of ``batch_size`` (in input order) on padded
    tensors: a passage shorter than the longest one of its chunk has zero rows, and a
    zero row joins every ``max_j``, so for that passage each token's best match is
    ``max(best, 0)``. Reproduced here so the numbers match the reference exactly.
    """
    n = len(queries)
    out = np.empty(n, dtype=np.float64)
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        longest = max(len(p) for p in passages[start:stop])
        for k in range(start, stop):
            best = (queries[k] @ passages[k].T).max(axis=1)
            if len(passages[k]) < longest:
                best = np.maximum(best, 0.0)
            out[k] = float(best.sum()) / len(queries[k])
    return out


def lexical_csr(items: Sequence[Mapping[str, float]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lexical weights keyed by ``str(token_id)`` -> ``(indptr, token ids int64, weights float32)``."""
    counts = np.fromiter((len(x) for x in items), dtype=np.int64, count=len(items))
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    total = int(indptr[-1])
    ids = np.fromiter((int(k) for x in items for k in x), dtype=np.int64, count=total)
    weights = np.fromiter((w for x in items for w in x.values()), dtype=np.float32, count=total)
    return indptr, ids, weights


def lexical_score_matrix(
    queries: Sequence[Mapping[str, float]], indptr: np.ndarray, ids: np.ndarray, weights: np.ndarray
) -> np.ndarray:
    """``lexical_matching_score(queries[i], passages[j])`` for all i, j: ``(len(queries), n)`` float32.

    The passages come as CSR arrays (``lexical_csr``, or ``m3 embed-corpus``'s
    ``sparse_indices``/``sparse_values``). Only tokens some query has can add to a
    score, so the product runs over the queries' vocabulary: memory is ``n x that``."""
    vocab: dict[int, int] = {}
    for q in queries:
        for k in q:
            vocab.setdefault(int(k), len(vocab))
    n = len(indptr) - 1
    if not vocab or n == 0 or len(ids) == 0:
        return np.zeros((len(queries), n), dtype=np.float32)
    q_mat = np.zeros((len(queries), len(vocab)), dtype=np.float32)
    for row, q in enumerate(queries):
        for k, w in q.items():
            q_mat[row, vocab[int(k)]] = w
    lookup = np.full(max(int(ids.max()), max(vocab)) + 1, -1, dtype=np.int64)
    lookup[np.fromiter(vocab, dtype=np.int64, count=len(vocab))] = np.arange(len(vocab))
    cols = lookup[ids]
    rows = np.repeat(np.arange(n, dtype=np.int64), np.diff(indptr))
    hit = cols >= 0
    p_mat = np.zeros((n, len(vocab)), dtype=np.float32)
    p_mat[rows[hit], cols[hit]] = weights[hit]  # a passage's keys are unique
    return q_mat @ p_mat.T


def sparse_dense(dense: np.ndarray, sparse: np.ndarray, weights: Sequence[float]) -> np.ndarray:
    """``compute_score``'s ``sparse+dense``: ``(w1*s + w0*d) / (w1 + w0)``, elementwise."""
    w0, w1 = float(weights[0]), float(weights[1])
    return (w1 * sparse + w0 * dense) / (w1 + w0)


def all_three(dense: np.ndarray, sparse: np.ndarray, colbert: np.ndarray, weights: Sequence[float]) -> np.ndarray:
    """``compute_score``'s ``colbert+sparse+dense``: ``(w2*c + w1*s + w0*d) / (w0 + w1 + w2)``."""
    w0, w1, w2 = (float(w) for w in weights)
    return (w2 * colbert + w1 * sparse + w0 * dense) / (w0 + w1 + w2)


def check_mode_weights(weights: Sequence[float]) -> None:
    """``[dense, sparse, colbert]`` weights of ``compute_score``: three numbers, no zero sums."""
    if len(weights) != 3 or not all(isinstance(w, (int, float)) for w in weights):
        raise InputError(f"weights_for_different_modes must be 3 numbers [dense, sparse, colbert], got {weights!r}")
    if (weights[0] + weights[1]) == 0 or sum(weights) == 0:
        raise InputError(f"weights_for_different_modes must not sum to zero, got {weights!r}")


def combine_scores(
    dense: np.ndarray, sparse: np.ndarray, colbert: np.ndarray, weights: Sequence[float]
) -> dict[str, list[float]]:
    """The five ``compute_score`` lists from the three per-pair scores."""
    return {
        "colbert": colbert.tolist(),
        "sparse": sparse.tolist(),
        "dense": dense.tolist(),
        "sparse+dense": sparse_dense(dense, sparse, weights).tolist(),
        "colbert+sparse+dense": all_three(dense, sparse, colbert, weights).tolist(),
    }
