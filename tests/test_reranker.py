"""M3Reranker against FlagEmbedding 1.4.2's FlagReranker goldens, and its API edges."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from m3_runtime import M3Model, M3Reranker
from m3_runtime.errors import InputError

INIT_KEYS = (
    "query_instruction_for_rerank",
    "query_instruction_format",
    "passage_instruction_for_rerank",
    "passage_instruction_format",
    "batch_size",
    "max_length",
    "query_max_length",
    "normalize",
)


@pytest.fixture(scope="module")
def rerankers(reranker_dir):
    cache: dict[str, M3Reranker] = {}

    def get(init: dict) -> M3Reranker:
        key = json.dumps(init, sort_keys=True)
        if key not in cache:
            cache[key] = M3Reranker(reranker_dir, variant="fp32", **{k: v for k, v in init.items() if k in INIT_KEYS})
        return cache[key]

    return get


def _pairs(golden: dict, call: dict) -> list[tuple[str, str]]:
    return [tuple(golden["pairs"][i]) for i in call["pairs"]]


def test_every_recorded_call_matches_flagreranker(rerankers, reranker_golden):
    """Token ids identical and scores within 1e-5, raw and normalised, for every call the script recorded."""
    for call in reranker_golden["calls"]:
        ref = reranker_golden["ref"]["calls"][call["name"]]
        model = rerankers(call["init"])
        pairs = _pairs(reranker_golden, call)
        kwargs = dict(call["kwargs"])
        ids = model.tokenize(
            pairs, max_length=kwargs.get("max_length"), query_max_length=kwargs.get("query_max_length")
        )
        assert ids == ref["input_ids"], call["name"]
        arg = pairs[0] if call.get("single") else pairs
        got = model.compute_score(arg, **kwargs)
        assert isinstance(got, list) and all(isinstance(x, float) for x in got), call["name"]
        np.testing.assert_allclose(got, ref["scores"], atol=1e-5, rtol=0, err_msg=call["name"])


def test_batch_composition_does_not_move_scores(rerankers, reranker_golden):
    model = rerankers({})
    pairs = [tuple(p) for p in reranker_golden["pairs"]]
    together = model.compute_score(pairs)
    alone = [model.compute_score(p)[0] for p in pairs]
    np.testing.assert_allclose(together, alone, atol=1e-5, rtol=0)
    shuffled = np.random.default_rng(0).permutation(len(pairs))
    again = model.compute_score([pairs[i] for i in shuffled], batch_size=3)
    np.testing.assert_allclose(np.array(again), np.array(together)[shuffled], atol=1e-5, rtol=0)


def test_rerank_orders_by_score(rerankers):
    model = rerankers({})
    passages = ["Paris is the capital of France.", "", "The mitochondria is the powerhouse of the cell.", "París"]
    scores = model.compute_score([("capital of France", p) for p in passages])
    ranked = model.rerank("capital of France", passages)
    assert [r.index for r in ranked] == sorted(range(len(passages)), key=lambda i: -scores[i])
    assert [r.score for r in ranked] == sorted(scores, reverse=True)
    top = model.rerank("capital of France", passages, top_n=2, normalize=True)
    assert len(top) == 2 and all(0 < r.score < 1 for r in top)
    np.testing.assert_allclose([r.score for r in top], 1 / (1 + np.exp(-np.array(sorted(scores)[::-1][:2]))))
    assert model.rerank("q", []) == []


def test_bad_input(rerankers, reranker_dir, package_dir):
    model = rerankers({})
    with pytest.raises(TypeError, match=r"sentence_pairs\[1\]\[1\]"):
        model.compute_score([("a", "b"), ("a", 3)])
    with pytest.raises(TypeError, match=r"sentence_pairs\[0\] must be a \(query, passage\) pair"):
        model.compute_score([("only one",)])
    with pytest.raises(ValueError, match="batch_size"):
        model.compute_score([("a", "b")], batch_size=0)
    with pytest.raises(ValueError, match="max_length"):
        model.compute_score([("a", "b")], max_length=10**6)
    with pytest.raises(TypeError, match="passages must be a list"):
        model.rerank("q", "not a list")
    with pytest.raises(InputError, match="load it with M3Reranker"):
        M3Model(reranker_dir)
    with pytest.raises(InputError, match="not a reranker: load it with M3Model"):
        M3Reranker(package_dir)


def test_cli_rerank_prints_best_first(reranker_dir, rerankers):
    passages = ["Paris is the capital of France.", "Bananas are yellow.", "France's capital city is Paris."]
    out = subprocess.run(
        [
            str(Path(sys.executable).parent / "m3"),
            "rerank",
            str(reranker_dir),
            "--variant",
            "fp32",
            "capital of France",
            *passages,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rows = [json.loads(line) for line in out.splitlines()]
    want = rerankers({}).rerank("capital of France", passages)
    assert [r["index"] for r in rows] == [r.index for r in want]
    np.testing.assert_allclose([r["score"] for r in rows], [r.score for r in want], atol=1e-6)
    assert rows[0]["passage"] == passages[want[0].index]


@pytest.mark.parametrize("variant, max_abs, rho", [("fp16", 0.05, 0.99), ("int8", 0.4, 0.95)])
def test_variants_against_fp32(reranker_dir, rerankers, reranker_golden, variant, max_abs, rho):
    """Thresholds as at export (tests/test_reranker_export.py): fp16 rounding moves this random
    model's logits by ~0.01 and int8 by ~0.1, against a spread of ~4; a broken graph moves
    them by the whole spread and scrambles the order. int8 must also stay batch-invariant."""
    pairs = [tuple(p) for p in reranker_golden["pairs"]]
    want = np.array(rerankers({}).compute_score(pairs))
    model = M3Reranker(reranker_dir, variant=variant)
    got = np.array(model.compute_score(pairs))
    assert np.abs(got - want).max() <= max_abs
    ranks = lambda x: np.argsort(np.argsort(x))  # noqa: E731
    assert np.corrcoef(ranks(got), ranks(want))[0, 1] >= rho
    alone = np.array([model.compute_score(p)[0] for p in pairs[:12]])
    np.testing.assert_allclose(alone, got[:12], atol=1e-5, rtol=0)
