"""Property tests (hypothesis) of the runtime on the tiny package.

- ``encode`` of a batch equals ``encode`` of each text alone within 1e-5 (dense,
  lexical keys and weights, ColBERT rows), fp32 and int8, for random Unicode texts
  (controls, bidi controls and RTL scripts, combining marks, emoji sequences, CJK,
  noncharacters, 0-20,000 characters), random ``batch_size``, token budgets
  (``max_batch_tokens``), padding and ``max_length``.
- ``compute_score`` equals scoring.py's documented formulas computed here in NumPy on
  each text's separate ``encode`` outputs.
- Random arguments, good and bad: a call either works or raises an ``M3Error``
  subclass (``InputError``/``InputTypeError``), never anything else.
- A lone surrogate (a Python str can hold one; JSON's ``"\\ud800"`` decodes to one)
  is not Unicode text and cannot be UTF-8 encoded: the runtime refuses it with an
  ``InputError`` naming the text's index, instead of letting the tokenizer's own
  ``TypeError`` ("TextEncodeInput must be Union[...]") escape.
- ``batching.take_batch`` and ``plan_batches`` against a brute-force oracle.

Bounded for CI: ``PROFILE``'s example counts keep the file near a minute on the 2-vCPU
development box (each 8,192-token forward pass of the tiny model takes ~1.5 s there).
``M3_HYPOTHESIS_SCALE=10`` runs ten times as many examples. No example database is
written (``database=None``): a failure prints its falsifying example and a
``@reproduce_failure`` blob instead.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from m3_runtime import M3Model
from m3_runtime.batching import plan_batches, take_batch
from m3_runtime.errors import InputError, InputTypeError, M3Error

SCALE = float(os.environ.get("M3_HYPOTHESIS_SCALE", "1"))
PROFILE = settings(
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)


def examples(n: int) -> settings:
    return settings(PROFILE, max_examples=max(1, round(n * SCALE)))


ATOL = 1e-5
EVERY = {"return_dense": True, "return_sparse": True, "return_colbert_vecs": True}

# -- texts --------------------------------------------------------------------
# Characters that tokenizers and normalizers treat specially, drawn often on purpose.
ODD_CHARS = [
    *"\x00\x01\x07\x08\t\n\x0b\x0c\r\x1b\x1f\x7f\x85\x9f",  # C0/C1 controls, NEL
    *"\u00a0\u2000\u200a\u2028\u2029\u3000\ufeff",  # odd spaces, line/paragraph separators, BOM
    *"\u200b\u200c\u200d\u2060\u00ad\u034f",  # zero-width (ZWSP, ZWNJ, ZWJ, WJ), soft hyphen, CGJ
    *"\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u061c",  # bidi controls
    *"\u0301\u0308\u0327\u20dd\u0489\u064b\u05b4\u0e31\ufe0f\ufe0e",  # combining marks, variation selectors
    *"\ufffd\ufffe\uffff\U0010ffff\ue000\U000f0000",  # replacement char, noncharacters, private use
]
FRAGMENTS = [
    "שלום עולם",  # Hebrew
    "مرحبا بالعالم",  # Arabic
    "سلام دنیا",  # Persian
    "नमस्ते दुनिया",  # Devanagari (combining vowel signs)
    "สวัสดีชาวโลก",  # Thai, no spaces
    "你好，世界。検索エンジン",  # CJK, full-width punctuation
    "👩‍👩‍👧‍👦",  # ZWJ family
    "🇯🇵🇫🇷",  # regional indicators
    "👍🏽❤️",  # skin tone modifier, emoji presentation selector
    "e\u0301\u0301\u0301",  # stacked combining marks
    "Z\u0351\u0342\u0344\u0310\u034c",  # zalgo
    "ﬁ Ⅻ ① ｆｕｌｌ",  # compatibility forms NFKC folds
    "retrieval",
    " ",
]
CHAR = st.one_of(
    st.sampled_from(ODD_CHARS),
    st.characters(codec="utf-8"),  # any Unicode scalar value (surrogates excluded: see the surrogate test)
    st.characters(categories=["Cc", "Cf", "Mn", "Me", "Zs", "Zl", "Zp", "So"], codec="utf-8"),
)
PIECE = st.one_of(CHAR, st.sampled_from(FRAGMENTS))
SHORT_TEXT = st.lists(PIECE, max_size=40).map("".join)


def _repeat(fragment: str, n: int) -> str:
    return (fragment * (n // len(fragment) + 1))[:n]


# Up to 20,000 characters: a random fragment repeated (hypothesis' own text sizes stay small).
LONG_TEXT = st.builds(
    _repeat,
    st.lists(PIECE, min_size=1, max_size=12).map("".join),
    st.one_of(st.sampled_from([20_000, 12_000]), st.integers(200, 20_000)),  # drawn small unless told
)


# -- models -------------------------------------------------------------------
@lru_cache(maxsize=16)
def _model(package_dir: Path, variant: str, max_batch_tokens: int | None = None, pad: bool = True) -> M3Model:
    return M3Model(package_dir, variant=variant, max_batch_tokens=max_batch_tokens, pad_batches=pad)


def _alone(model: M3Model, texts: Sequence[str], max_length: int | None) -> list[dict]:
    """Each text encoded in a call of its own (one row, no batch companion)."""
    return [model.encode(text, max_length=max_length, **EVERY) for text in texts]


def _assert_lexical_equal(got: dict[str, float], want: dict[str, float], what: str) -> None:
    """Same weights within 1e-5 over the union of keys (a key absent on one side counts as
    weight 0: a weight within 1e-5 of zero may fall either side of the relu), and the
    shared keys in the same first-occurrence order."""
    for key in got.keys() | want.keys():
        assert abs(got.get(key, 0.0) - want.get(key, 0.0)) <= ATOL, (
            f"{what}: token {key}: {got.get(key)} vs {want.get(key)}"
        )
    assert [k for k in got if k in want] == [k for k in want if k in got], f"{what}: key order differs"


def _assert_same_as_alone(batch: dict, alone: list[dict]) -> None:
    assert batch["dense_vecs"].shape == (len(alone), batch["dense_vecs"].shape[1])
    assert len(batch["lexical_weights"]) == len(batch["colbert_vecs"]) == len(alone)
    for i, one in enumerate(alone):
        np.testing.assert_allclose(batch["dense_vecs"][i], one["dense_vecs"], atol=ATOL, rtol=0, err_msg=f"dense {i}")
        assert batch["colbert_vecs"][i].shape == one["colbert_vecs"].shape, f"colbert {i}"
        np.testing.assert_allclose(
            batch["colbert_vecs"][i], one["colbert_vecs"], atol=ATOL, rtol=0, err_msg=f"colbert {i}"
        )
        _assert_lexical_equal(batch["lexical_weights"][i], one["lexical_weights"], f"lexical {i}")


# -- encode: a batch equals each text alone --------------------------------------
BUDGETS = st.one_of(st.none(), st.integers(1, 64), st.integers(65, 4096))


@pytest.mark.parametrize("variant", ["fp32", "int8"])
@examples(60)
@given(
    texts=st.lists(
        st.one_of(SHORT_TEXT, SHORT_TEXT, st.builds(_repeat, SHORT_TEXT.filter(bool), st.integers(50, 2000))),
        max_size=12,
    ),
    batch_size=st.one_of(st.none(), st.integers(1, 64)),
    max_batch_tokens=BUDGETS,
    pad=st.booleans(),
    max_length=st.one_of(st.none(), st.integers(2, 600)),
)
def test_batch_equals_each_text_alone(package_dir, variant, texts, batch_size, max_batch_tokens, pad, max_length):
    model = _model(package_dir, variant, max_batch_tokens, pad)
    batch = model.encode(texts, batch_size=batch_size, max_length=max_length, **EVERY)
    _assert_same_as_alone(batch, _alone(_model(package_dir, variant), texts, max_length))
    limit = model.passage_max_length if max_length is None else max_length
    assert all(1 <= len(v) <= limit - 1 for v in batch["colbert_vecs"])  # <s> dropped, truncation kept </s>


@pytest.mark.parametrize("variant", ["fp32", "int8"])
@examples(4)
@given(
    long=LONG_TEXT,
    short=st.lists(SHORT_TEXT, min_size=1, max_size=4),
    max_batch_tokens=BUDGETS,
    at=st.integers(0, 4),
)
def test_long_texts_in_a_batch(package_dir, variant, long, short, max_batch_tokens, at):
    """Texts up to 20,000 characters (truncated to the package's 8,192 tokens) among short ones."""
    texts = [*short]
    texts.insert(min(at, len(texts)), long)
    batch = _model(package_dir, variant, max_batch_tokens).encode(texts, **EVERY)
    _assert_same_as_alone(batch, _alone(_model(package_dir, variant), texts, None))


# -- compute_score: the documented formulas on the separate outputs --------------
def _scores_by_hand(q: list[dict], p: list[dict], *, chunk: int, weights: Sequence[float]) -> dict[str, np.ndarray]:
    """scoring.py's module docstring and ``paired_colbert_scores``' docstring, in NumPy.

    dense = q . p; sparse = sum of q[t] * p[t] over shared tokens; ColBERT =
    sum_i max_j (q_i . p_j) / len(q), where (FlagEmbedding's padding, in chunks of
    ``batch_size`` pairs) a passage shorter than its chunk's longest also matches zero
    rows: each max_j becomes max(max_j, 0).
    """
    n = len(q)
    dense = np.array([float(np.dot(a["dense_vecs"], b["dense_vecs"])) for a, b in zip(q, p, strict=True)])
    sparse = np.array(
        [
            sum(w * b["lexical_weights"][t] for t, w in a["lexical_weights"].items() if t in b["lexical_weights"])
            for a, b in zip(q, p, strict=True)
        ],
        dtype=np.float64,
    )
    colbert = np.zeros(n)
    for start in range(0, n, chunk):
        longest = max(len(x["colbert_vecs"]) for x in p[start : start + chunk])
        for k in range(start, min(n, start + chunk)):
            sims = q[k]["colbert_vecs"].astype(np.float64) @ p[k]["colbert_vecs"].astype(np.float64).T
            best = sims.max(axis=1)
            if len(p[k]["colbert_vecs"]) < longest:
                best = np.maximum(best, 0.0)
            colbert[k] = best.sum() / len(q[k]["colbert_vecs"])
    w0, w1, w2 = weights
    return {
        "dense": dense,
        "sparse": sparse,
        "colbert": colbert,
        "sparse+dense": (w1 * sparse + w0 * dense) / (w1 + w0),
        "colbert+sparse+dense": (w2 * colbert + w1 * sparse + w0 * dense) / (w0 + w1 + w2),
    }


# Weights on a half-integer grid: a nonzero sum is then at least 0.5, far from cancellation.
WEIGHTS = st.one_of(st.none(), st.lists(st.sampled_from([-1.0, 0.0, 0.5, 1.0, 2.0, 3]), min_size=3, max_size=3))


@pytest.mark.parametrize("variant", ["fp32", "int8"])
@examples(50)
@given(
    pairs=st.lists(
        st.tuples(SHORT_TEXT, st.one_of(SHORT_TEXT, st.builds(_repeat, SHORT_TEXT.filter(bool), st.integers(20, 800)))),
        max_size=7,
    ),
    batch_size=st.one_of(st.none(), st.integers(1, 8)),
    max_query_length=st.one_of(st.none(), st.integers(2, 64)),
    max_passage_length=st.one_of(st.none(), st.integers(2, 300)),
    weights=WEIGHTS,
    single=st.booleans(),
)
def test_compute_score_is_the_formulas_on_separate_outputs(
    package_dir, variant, pairs, batch_size, max_query_length, max_passage_length, weights, single
):
    model = _model(package_dir, variant)
    valid = weights is None or (weights[0] + weights[1] != 0 and sum(weights) != 0)
    call = pairs[0] if single and len(pairs) == 1 else pairs
    kwargs = {
        "batch_size": batch_size,
        "max_query_length": max_query_length,
        "max_passage_length": max_passage_length,
        "weights_for_different_modes": weights,
    }
    if not valid:
        with pytest.raises(InputError, match="weights_for_different_modes"):
            model.compute_score(call, **kwargs)
        return
    got = model.compute_score(call, **kwargs)
    q = _alone(model, [a for a, _ in pairs], max_query_length or model.query_max_length)
    p = _alone(model, [b for _, b in pairs], max_passage_length or model.passage_max_length)
    want = _scores_by_hand(q, p, chunk=batch_size or model.batch_size, weights=weights or [1.0, 1.0, 1.0])
    assert set(got) == set(want)
    for name, values in want.items():
        # The types (float, not int) are test_scores_are_floats's business.
        if call is not pairs:  # one pair in: a number per score out
            assert not isinstance(got[name], list)
            got_values = np.array([got[name]], dtype=np.float64)
        else:
            assert isinstance(got[name], list) and len(got[name]) == len(pairs)
            got_values = np.array(got[name], dtype=np.float64)
        np.testing.assert_allclose(got_values, values, rtol=ATOL, atol=ATOL, err_msg=name)


@pytest.mark.parametrize("shared", [False, True])
def test_scores_are_floats(fp32, shared):
    """compute_score's documented types: lists of floats, a float per score for one pair.
    Two texts that share no lexical token score sparse 0.0, a float like any other score
    (the pairs here share none unless ``shared``: "alpha" and "omega" tokenize apart)."""
    passage = "alpha" if shared else "omega"
    one = fp32.compute_score(("alpha", passage))
    assert all(isinstance(v, float) for v in one.values()), {k: type(v).__name__ for k, v in one.items()}
    many = fp32.compute_score([("alpha", passage), ("alpha", passage)])
    assert all(isinstance(x, float) for v in many.values() for x in v), {
        k: type(v[0]).__name__ for k, v in many.items()
    }


def _unit_rows(rows: int, dim: int, rng: np.random.Generator) -> np.ndarray:
    x = rng.standard_normal((rows, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@examples(200)
@given(
    q_rows=st.lists(st.integers(1, 6), max_size=9),
    p_rows=st.lists(st.integers(1, 6), min_size=9, max_size=9),
    chunk=st.integers(1, 10),
    seed=st.integers(0, 2**32 - 1),
)
def test_score_formulas_on_signed_vectors(q_rows, p_rows, chunk, seed):
    """The tiny model's ColBERT similarities are all positive (0.51..1 measured), so the
    padding rule (a shorter passage's max_j becomes max(max_j, 0)) never fires through the
    model; random unit vectors in 4 dimensions have negative similarities and do. Sparse
    scores on random dicts with shared and unshared keys."""
    from m3_runtime.scoring import paired_colbert_scores, paired_lexical_scores

    rng = np.random.default_rng(seed)
    n = len(q_rows)
    q = [{"colbert_vecs": _unit_rows(r, 4, rng)} for r in q_rows]
    p = [{"colbert_vecs": _unit_rows(r, 4, rng)} for r in p_rows[:n]]
    for side in (q, p):
        for x in side:
            keys = rng.choice(12, size=int(rng.integers(0, 6)), replace=False)
            x["lexical_weights"] = {str(k): float(rng.uniform(0.01, 3)) for k in keys}
            x["dense_vecs"] = _unit_rows(1, 4, rng)[0]
    want = _scores_by_hand(q, p, chunk=chunk, weights=[1.0, 1.0, 1.0])
    got_colbert = paired_colbert_scores([x["colbert_vecs"] for x in q], [x["colbert_vecs"] for x in p], chunk=chunk)
    got_sparse = paired_lexical_scores([x["lexical_weights"] for x in q], [x["lexical_weights"] for x in p])
    np.testing.assert_allclose(got_colbert, want["colbert"], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got_sparse, want["sparse"], rtol=1e-9, atol=1e-12)


# -- nothing raises but the documented errors -------------------------------------
JUNK = st.one_of(st.none(), st.integers(), st.floats(), st.binary(max_size=8), st.booleans(), st.just({"a": 1}))
SENTENCES = st.one_of(
    SHORT_TEXT,
    st.lists(SHORT_TEXT, max_size=4),
    st.lists(st.one_of(SHORT_TEXT, JUNK), max_size=4),
    JUNK,
    st.tuples(SHORT_TEXT, SHORT_TEXT),
)
INT_ARG = st.one_of(st.none(), st.integers(-3, 9000), st.booleans(), st.floats(-2, 600), st.just("8"))


def _valid_int(value: object, lo: int, hi: int) -> bool:
    return value is None or (isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi)


@examples(60)
@given(
    sentences=SENTENCES,
    batch_size=INT_ARG,
    max_length=INT_ARG,
    flags=st.tuples(st.booleans(), st.booleans(), st.booleans()),
)
def test_encode_works_or_raises_a_documented_error(package_dir, sentences, batch_size, max_length, flags):
    model = _model(package_dir, "fp32")
    texts_ok = isinstance(sentences, str) or (
        isinstance(sentences, (list, tuple)) and all(isinstance(t, str) for t in sentences)
    )
    valid = texts_ok and _valid_int(batch_size, 1, 10**9) and _valid_int(max_length, 2, model.max_length) and any(flags)
    dense, sparse, colbert = flags
    kwargs = {"return_dense": dense, "return_sparse": sparse, "return_colbert_vecs": colbert}
    try:
        out = model.encode(sentences, batch_size=batch_size, max_length=max_length, **kwargs)
    except M3Error as exc:
        assert not valid, f"valid call refused: {exc}"
        if not texts_ok:
            assert isinstance(exc, InputTypeError | InputError)
        return
    assert valid, "an invalid call was accepted"
    n = 1 if isinstance(sentences, str) else len(sentences)
    if dense:
        assert out["dense_vecs"].shape[-1] == model.hidden_size
        assert len(np.atleast_2d(out["dense_vecs"])) == n or n == 0
    assert (out["lexical_weights"] is None) != sparse and (out["colbert_vecs"] is None) != colbert


@examples(40)
@given(
    pairs=st.one_of(
        st.lists(
            st.one_of(st.tuples(SHORT_TEXT, SHORT_TEXT), st.tuples(SHORT_TEXT), st.tuples(SHORT_TEXT, JUNK), JUNK),
            max_size=3,
        ),
        JUNK,
        SHORT_TEXT,
    ),
    batch_size=INT_ARG,
    max_query_length=INT_ARG,
    # Sequences only: a number or None where the list goes is test_weights_that_are_not_a_list's.
    weights=st.one_of(
        WEIGHTS,
        st.lists(st.one_of(st.floats(allow_nan=False, allow_infinity=False), JUNK), max_size=4),
        st.binary(max_size=4),
        SHORT_TEXT,
    ),
)
def test_compute_score_works_or_raises_a_documented_error(package_dir, pairs, batch_size, max_query_length, weights):
    model = _model(package_dir, "fp32")
    try:
        out = model.compute_score(
            pairs, batch_size=batch_size, max_query_length=max_query_length, weights_for_different_modes=weights
        )
    except M3Error:
        return
    assert set(out) == {"colbert", "sparse", "dense", "sparse+dense", "colbert+sparse+dense"}


@examples(8)
@given(max_batch_tokens=INT_ARG, batch_size=INT_ARG)
def test_model_arguments_work_or_raise_a_documented_error(package_dir, max_batch_tokens, batch_size):
    valid = _valid_int(max_batch_tokens, 1, 10**9) and batch_size is not None and _valid_int(batch_size, 1, 10**9)
    try:
        model = M3Model(package_dir, variant="fp32", max_batch_tokens=max_batch_tokens, batch_size=batch_size)
    except M3Error as exc:
        assert not valid, f"valid arguments refused: {exc}"
        return
    assert valid, f"invalid arguments accepted: max_batch_tokens={max_batch_tokens!r}, batch_size={batch_size!r}"
    assert model.encode(["x"])["dense_vecs"].shape == (1, model.hidden_size)


@pytest.mark.parametrize("weights", [0, 1.5, True, object()])
def test_weights_that_are_not_a_list(fp32, weights):
    """Documented: bad ``weights_for_different_modes`` -> ``ValueError`` (an ``InputError``)
    with the offending value, for a number where the list goes too."""
    with pytest.raises(InputError, match="weights_for_different_modes"):
        fp32.compute_score([("a", "b")], weights_for_different_modes=weights)


# -- lone surrogates --------------------------------------------------------------
SURROGATE = st.characters(categories=["Cs"])


@examples(20)
@given(
    before=st.lists(SHORT_TEXT, max_size=3),
    after=st.lists(SHORT_TEXT, max_size=3),
    text=st.builds(lambda a, s, b: a + s + b, SHORT_TEXT, SURROGATE, SHORT_TEXT),
    query_side=st.booleans(),
)
def test_lone_surrogates_are_refused_naming_the_text(package_dir, before, after, text, query_side):
    """Documented behaviour: a text holding a surrogate code point (U+D800..U+DFFF, alone
    or as a UTF-16 pair split into two code points) is not Unicode text; ``encode`` and
    ``compute_score`` raise ``InputError`` (a ``ValueError``) whose message says
    "surrogate" and names the text's index. Nothing is replaced silently."""
    model = _model(package_dir, "fp32")
    texts = [*before, text, *after]
    index = len(before)
    with pytest.raises(InputError, match="surrogate") as caught:
        model.encode(texts, **EVERY)
    assert re.search(rf"\b{index}\b", str(caught.value)), f"the message does not name text {index}: {caught.value}"
    pair = (text, "passage") if query_side else ("query", text)
    with pytest.raises(InputError, match="surrogate"):
        model.compute_score([("q", "p"), pair])


# -- batching against a brute-force oracle -----------------------------------------
def _prefix_ok(lengths: Sequence[int], *, batch_size: int, max_tokens: int, pad: bool, pad_limit: int | None) -> bool:
    """Whether ``lengths`` (in this order) may form one batch: the rules written out directly."""
    if len(lengths) == 1:
        return True  # a text always runs, alone if over the budget
    longest = max(lengths)
    one_length = not pad or (pad_limit is not None and longest > pad_limit)
    return (
        len(lengths) <= batch_size
        and len(lengths) * longest <= max_tokens
        and (not one_length or len(set(lengths)) == 1)
    )


def _oracle_take(lengths: Sequence[int], **bounds) -> int:
    """The longest valid prefix, found by trying every prefix length."""
    return max((k for k in range(1, len(lengths) + 1) if _prefix_ok(lengths[:k], **bounds)), default=0)


BOUNDS = st.fixed_dictionaries(
    {
        "batch_size": st.integers(1, 10),
        "max_tokens": st.integers(1, 400),
        "pad": st.booleans(),
        "pad_limit": st.one_of(st.none(), st.integers(1, 100)),
    }
)
LENGTHS = st.lists(st.one_of(st.integers(1, 12), st.integers(1, 500)), max_size=40)


@settings(PROFILE, max_examples=round(500 * SCALE))
@given(lengths=LENGTHS, bounds=BOUNDS)
def test_take_batch_is_the_longest_valid_prefix(lengths, bounds):
    assert take_batch(lengths, **bounds) == _oracle_take(lengths, **bounds)


@settings(PROFILE, max_examples=round(500 * SCALE))
@given(lengths=LENGTHS, bounds=BOUNDS)
def test_plan_batches_is_greedy_longest_first(lengths, bounds):
    batches = [b.tolist() for b in plan_batches(lengths, **bounds)]
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(lengths)))  # every index exactly once
    for b in batches:
        assert _prefix_ok([lengths[i] for i in b], **bounds), f"batch {[lengths[i] for i in b]} breaks {bounds}"
    # The oracle: stable longest-first order, cut greedily into longest valid prefixes.
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    want, start = [], 0
    while start < len(order):
        n = _oracle_take([lengths[i] for i in order[start:]], **bounds)
        want.append(order[start : start + n])
        start += n
    assert batches == want
