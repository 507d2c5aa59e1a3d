"""Scoring and lexical aggregation against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest
from m3_runtime import scoring


def test_lexical_weights_skip_specials_keep_max_first_order():
    ids = np.array([0, 7, 5, 7, 3, 9, 2, 5])
    w = np.array([9.0, 0.5, 0.2, 0.8, 4.0, 0.0, 3.0, 0.1], dtype=np.float32)
    got = scoring.lexical_weights(w, ids, frozenset({0, 1, 2, 3}))
    assert list(got) == ["7", "5"]  # 0/2/3 are special, 9 has weight 0
    assert got["7"] == pytest.approx(0.8) and got["5"] == pytest.approx(0.2)


def test_first_occurrence_counts_only_positive_weights():
    ids = np.array([5, 7, 5])
    w = np.array([0.0, 0.3, 0.6], dtype=np.float32)
    assert list(scoring.lexical_weights(w, ids, frozenset())) == ["7", "5"]


def test_lexical_matching_score_by_hand():
    a = {"1": 0.5, "2": 2.0, "3": 1.0}
    b = {"2": 0.25, "3": 3.0, "4": 9.0}
    assert scoring.lexical_matching_score(a, b) == pytest.approx(0.5 + 3.0)
    m = scoring.lexical_matching_score([a, b], [b, {}, a])
    np.testing.assert_allclose(m, [[3.5, 0, 0.25 + 4.0 + 1.0], [0.0625 + 9 + 81, 0, 3.5]])


def test_paired_lexical_scores_equal_the_dict_formula():
    rng = np.random.default_rng(0)
    items = [
        {str(k): float(rng.random()) for k in rng.choice(50, size=rng.integers(0, 20), replace=False)}
        for _ in range(40)
    ]
    left, right = items[:20], items[20:]
    got = scoring.paired_lexical_scores(left, right)
    want = [sum(w * b.get(k, 0.0) for k, w in a.items()) for a, b in zip(left, right, strict=True)]
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_lexical_score_rejects_mixed_input():
    with pytest.raises(ValueError, match="two dicts or two lists"):
        scoring.lexical_matching_score({"1": 1.0}, [{"1": 1.0}])


def test_colbert_score_by_hand():
    q = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    p = np.array([[0.6, 0.8], [1.0, 0.0], [-1.0, 0.0]], dtype=np.float32)
    assert scoring.colbert_score(q, p) == pytest.approx((1.0 + 0.8) / 2)


def test_paired_colbert_reproduces_reference_chunk_padding():
    """FlagEmbedding pads passages per chunk of batch_size pairs: zero rows join the max."""
    q = np.array([[1.0, 0.0]], dtype=np.float32)
    negative = np.array([[-1.0, 0.0]], dtype=np.float32)  # best match -1
    longer = np.array([[0.0, 1.0], [-0.5, 0.5]], dtype=np.float32)
    # Alone in its chunk the short passage has no padding: its score is -1.
    alone = scoring.paired_colbert_scores([q, q], [negative, longer], chunk=1)
    np.testing.assert_allclose(alone, [-1.0, 0.0])
    # Sharing a chunk with a longer passage, it is padded with a zero row: max(-1, 0) = 0.
    shared = scoring.paired_colbert_scores([q, q], [negative, longer], chunk=2)
    np.testing.assert_allclose(shared, [0.0, 0.0])

    # The same through padded tensors, as the reference computes it.
    p_pad = np.zeros((2, 2, 2), dtype=np.float32)
    p_pad[0, :1], p_pad[1] = negative, longer
    ref = np.einsum("qin,pjn->qipj", np.stack([q, q]), p_pad).max(-1).sum(1) / 1
    np.testing.assert_allclose(np.diag(ref), shared)


def test_combine_scores_formulas():
    d, s, c = np.array([0.5]), np.array([0.2]), np.array([0.9])
    out = scoring.combine_scores(d, s, c, [0.4, 0.2, 0.4])
    assert out["sparse+dense"][0] == pytest.approx((0.2 * 0.2 + 0.4 * 0.5) / 0.6)
    assert out["colbert+sparse+dense"][0] == pytest.approx((0.4 * 0.9 + 0.2 * 0.2 + 0.4 * 0.5) / 1.0)
