"""Pure post-processing of one forward pass: per-text outputs sliced out of a batch.

No ONNX Runtime here. ``batch`` rows are padded on the right; ``lengths[r]`` is row
``r``'s real token count (``<s>`` and ``</s>`` included).

- lexical weights of row ``r``: ``scoring.lexical_weights(sparse[r, :len_r], ids[r, :len_r])``
- ColBERT rows of row ``r``: ``colbert[r, :len_r - 1]`` (every token after ``<s>``)
- reranker: ``score = logit``, or ``sigmoid(logit) = 1 / (1 + exp(-logit))`` when normalised
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from . import scoring
from .contract import COLBERT, DENSE, SCORES, SPARSE


@dataclass(frozen=True)
class TextOutput:
    """One text's outputs (``None`` where not asked for) and its token count."""

    tokens: int
    dense: np.ndarray | None = None  # (hidden,) float32
    lexical: scoring.LexicalWeights | None = None  # {str(token_id): weight}
    colbert: np.ndarray | None = None  # (tokens - 1, hidden) float32
    score: float | None = None  # reranker logit


def split_batch(
    results: Mapping[str, np.ndarray], input_ids: np.ndarray, lengths: np.ndarray, unused: frozenset[int]
) -> list[TextOutput]:
    """Each row's outputs, in batch row order."""
    dense, sparse, colbert, scores = (results.get(name) for name in (DENSE, SPARSE, COLBERT, SCORES))
    alone = len(lengths) == 1
    out = []
    for row, n in enumerate(int(x) for x in lengths):
        vecs = None
        if colbert is not None:
            vecs = colbert[row, : n - 1]
            # A lone text's rows are the whole output: no copy (32 MB at 8,192 tokens).
            vecs = vecs if alone else vecs.copy()
        out.append(
            TextOutput(
                tokens=n,
                dense=None if dense is None else dense[row],
                lexical=None
                if sparse is None
                else scoring.lexical_weights(sparse[row, :n], input_ids[row, :n], unused),
                colbert=vecs,
                score=None if scores is None else float(scores[row]),
            )
        )
    return out


def sigmoid(x: np.ndarray | float) -> np.ndarray:
    """``1 / (1 + exp(-x))`` in float64, FlagReranker's ``normalize=True`` formula as written."""
    with np.errstate(over="ignore"):  # exp(-x) overflows to inf for x < -709: the score is then 0
        return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))
