"""fp32 runtime against FlagEmbedding 1.4.2 (``BGEM3FlagModel(use_fp16=False)``) goldens.

Tolerance: 1e-5 absolute, plus 1e-5 relative for sums whose magnitude exceeds 1
(lexical scores reach ~10: float32 accumulation alone moves them by a few 1e-6).
Lexical-weight keys (token ids) must be identical, in the same order.
"""

from __future__ import annotations

import numpy as np
import pytest

TOL = {"rtol": 1e-5, "atol": 1e-5}


@pytest.fixture(scope="module")
def full(fp32, golden):
    return fp32.encode(
        golden["texts"], return_dense=True, return_sparse=True, return_colbert_vecs=True, **golden["encode_args"]
    )


def test_golden_set_covers_the_contract(golden):
    texts = golden["texts"]
    lengths = [len(ids) for ids in golden["ref"]["input_ids"]]
    assert len(texts) >= 30
    assert "" in texts and any(t.strip() == "" and t for t in texts)
    assert max(lengths) == 8192  # the long text was truncated by the reference
    assert len(texts[-1]) > 8192


def test_token_ids_equal_reference_tokenizer(fp32, golden):
    assert fp32.tokenizer.encode(golden["texts"], 8192) == golden["ref"]["input_ids"]
    assert fp32.tokenizer.encode(golden["texts"], 16) == golden["ref"]["input_ids_short"]


def test_dense(full, golden):
    np.testing.assert_allclose(full["dense_vecs"], golden["arrays"]["dense"], **TOL)
    assert full["dense_vecs"].dtype == np.float32


def test_colbert(full, golden):
    for i, vecs in enumerate(full["colbert_vecs"]):
        ref = golden["arrays"][f"colbert_{i}"]
        assert vecs.shape == ref.shape, i
        assert vecs.dtype == np.float32
        np.testing.assert_allclose(vecs, ref, **TOL, err_msg=f"text {i}")


def test_lexical_weights(full, golden):
    for i, (got, ref) in enumerate(zip(full["lexical_weights"], golden["ref"]["lexical_weights"], strict=True)):
        assert list(got) == list(ref), f"text {i}: token ids or their order differ"
        np.testing.assert_allclose(list(got.values()), list(ref.values()), **TOL, err_msg=f"text {i}")


def test_truncated_encode(fp32, golden):
    out = fp32.encode(
        golden["texts"], return_dense=True, return_sparse=True, return_colbert_vecs=True, **golden["short_args"]
    )
    np.testing.assert_allclose(out["dense_vecs"], golden["arrays"]["dense_short"], **TOL)
    for i, vecs in enumerate(out["colbert_vecs"]):
        np.testing.assert_allclose(vecs, golden["arrays"][f"colbert_short_{i}"], **TOL)
        assert len(vecs) <= golden["short_args"]["max_length"] - 1
    for got, ref in zip(out["lexical_weights"], golden["ref"]["lexical_weights_short"], strict=True):
        assert list(got) == list(ref)
        np.testing.assert_allclose(list(got.values()), list(ref.values()), **TOL)


def test_single_string_gives_unwrapped_values(fp32, golden):
    out = fp32.encode(
        golden["texts"][0], return_dense=True, return_sparse=True, return_colbert_vecs=True, **golden["encode_args"]
    )
    assert out["dense_vecs"].shape == golden["arrays"]["single_dense"].shape
    np.testing.assert_allclose(out["dense_vecs"], golden["arrays"]["single_dense"], **TOL)
    np.testing.assert_allclose(out["colbert_vecs"], golden["arrays"]["single_colbert"], **TOL)
    assert isinstance(out["lexical_weights"], dict)
    assert list(out["lexical_weights"]) == list(golden["ref"]["single_lexical_weights"])


@pytest.mark.parametrize("key", ["compute_score", "compute_score_weighted"])
def test_compute_score_all_five_keys(fp32, golden, key):
    weights = golden["weights"] if key == "compute_score_weighted" else None
    pairs = [tuple(p) for p in golden["pairs"]]
    got = fp32.compute_score(pairs, weights_for_different_modes=weights, **golden["score_args"])
    ref = golden["ref"][key]
    assert set(got) == set(ref) == {"colbert", "sparse", "dense", "sparse+dense", "colbert+sparse+dense"}
    for name in ref:
        np.testing.assert_allclose(got[name], ref[name], **TOL, err_msg=name)


def test_compute_score_single_pair(fp32, golden):
    pair = tuple(golden["pairs"][0])
    got = fp32.compute_score(pair, **golden["score_args"])
    for name, values in golden["ref"]["compute_score"].items():
        assert isinstance(got[name], float)
        np.testing.assert_allclose(got[name], values[0], **TOL)


def test_colbert_score(fp32, full, golden):
    n = golden["n_queries"]
    got = [
        [fp32.colbert_score(full["colbert_vecs"][i], full["colbert_vecs"][j]) for j in range(len(golden["texts"]))]
        for i in range(n)
    ]
    np.testing.assert_allclose(got, golden["ref"]["colbert_score"], **TOL)


def test_lexical_matching_score(fp32, full, golden):
    lw = full["lexical_weights"]
    n = golden["n_queries"]
    matrix = fp32.compute_lexical_matching_score(lw[:n], lw)
    assert matrix.shape == (n, len(lw))
    np.testing.assert_allclose(matrix, golden["ref"]["lexical_matrix"], **TOL)
    np.testing.assert_allclose(fp32.compute_lexical_matching_score(lw[0], lw[2]), golden["ref"]["lexical_pair"], **TOL)


def test_convert_id_to_token(fp32, full, golden):
    got = fp32.convert_id_to_token(full["lexical_weights"])
    for tokens, ref in zip(got, golden["ref"]["lexical_tokens"], strict=True):
        assert list(tokens) == list(ref)
    single = fp32.convert_id_to_token([full["lexical_weights"][2]])
    assert isinstance(single, dict) and list(single) == list(golden["ref"]["lexical_tokens"][2])


def test_queries_and_corpus_use_their_max_lengths(fp32, golden):
    long_text = golden["texts"][-1]
    q = fp32.encode_queries(long_text, return_colbert_vecs=True)["colbert_vecs"]
    c = fp32.encode_corpus(long_text, return_colbert_vecs=True)["colbert_vecs"]
    assert len(q) == fp32.query_max_length - 1 == 511
    assert len(c) == 8191
