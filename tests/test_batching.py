"""Results do not depend on batch size, batch companions or input order."""

from __future__ import annotations

import numpy as np
import pytest
from m3_runtime import M3Model
from m3_runtime.batching import pad_batch, plan_batches


@pytest.fixture(scope="module")
def texts(golden):
    return golden["texts"][:-1]


def _encode(model, texts, **kw):
    return model.encode(texts, return_dense=True, return_sparse=True, return_colbert_vecs=True, **kw)


def _assert_same(a, b, atol=1e-5):
    np.testing.assert_allclose(a["dense_vecs"], b["dense_vecs"], atol=atol, rtol=0)
    for x, y in zip(a["colbert_vecs"], b["colbert_vecs"], strict=True):
        np.testing.assert_allclose(x, y, atol=atol, rtol=0)
    for x, y in zip(a["lexical_weights"], b["lexical_weights"], strict=True):
        assert list(x) == list(y)
        np.testing.assert_allclose(list(x.values()), list(y.values()), atol=atol, rtol=0)


@pytest.mark.parametrize("variant, pad", [("fp32", False), ("fp32", True), ("int8", False), ("int8", True)])
def test_batch_size_invariance(package_dir, texts, variant, pad):
    """Padded batches take the masked attention kernel, unpadded ones the flash kernel: same numbers."""
    model = M3Model(package_dir, variant=variant, pad_batches=pad)
    one = _encode(model, texts, batch_size=1)
    for batch_size in (3, 256):
        _assert_same(one, _encode(model, texts, batch_size=batch_size))


def test_padded_and_unpadded_batches_agree(package_dir, texts):
    padded = M3Model(package_dir, variant="fp32", pad_batches=True)
    unpadded = M3Model(package_dir, variant="fp32", pad_batches=False)
    assert unpadded.pad_batches is False  # the CPU default
    _assert_same(_encode(padded, texts), _encode(unpadded, texts))


def test_token_budget_invariance(package_dir, texts):
    small = M3Model(package_dir, variant="fp32", max_batch_tokens=40)
    big = M3Model(package_dir, variant="fp32", max_batch_tokens=1 << 20)
    _assert_same(
        small.encode(texts, return_dense=True, return_sparse=True, return_colbert_vecs=True),
        big.encode(texts, return_dense=True, return_sparse=True, return_colbert_vecs=True),
    )


@pytest.mark.parametrize("variant", ["fp32", "int8"])
def test_companions_do_not_change_a_text(package_dir, texts, variant):
    model = M3Model(package_dir, variant=variant)
    alone = [_encode(model, [t]) for t in texts[:6]]
    together = _encode(model, texts)
    for i, a in enumerate(alone):
        np.testing.assert_allclose(a["dense_vecs"][0], together["dense_vecs"][i], atol=1e-5, rtol=0)
        np.testing.assert_allclose(a["colbert_vecs"][0], together["colbert_vecs"][i], atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant", ["fp32", "int8"])
def test_order_is_restored(package_dir, texts, variant):
    model = M3Model(package_dir, variant=variant)
    base = _encode(model, texts)
    perm = np.random.default_rng(7).permutation(len(texts))
    shuffled = _encode(model, [texts[i] for i in perm])
    np.testing.assert_allclose(shuffled["dense_vecs"], base["dense_vecs"][perm], atol=1e-5, rtol=0)
    for k, i in enumerate(perm):
        assert shuffled["colbert_vecs"][k].shape == base["colbert_vecs"][i].shape
        assert list(shuffled["lexical_weights"][k]) == list(base["lexical_weights"][i])


def test_int8_batched_together_depends_on_companions(package_dir, texts):
    """Why exact_batches is the default: dynamic int8 scales activations per run, padding included."""
    batched = M3Model(package_dir, variant="int8", exact_batches=False, pad_batches=True)
    alone = _encode(batched, [texts[0]])["dense_vecs"][0]
    together = _encode(batched, texts)["dense_vecs"][0]
    assert np.abs(alone - together).max() > 1e-4


def test_plan_batches_respects_both_bounds():
    lengths = [5, 300, 7, 7, 120, 1, 64, 64, 64, 9000]
    batches = plan_batches(lengths, batch_size=3, max_tokens=256)
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(len(lengths)))
    assert batches[0].tolist() == [9]  # longer than the budget: alone
    for b in batches:
        assert len(b) <= 3
        longest = max(lengths[i] for i in b)
        assert len(b) == 1 or len(b) * longest <= 256
    assert [lengths[i] for i in flat] == sorted(lengths, reverse=True)


def test_plan_batches_without_padding_groups_equal_lengths():
    lengths = [5, 7, 7, 7, 5, 9, 7, 1]
    batches = plan_batches(lengths, batch_size=2, max_tokens=1000, pad=False)
    assert sorted(np.concatenate(batches).tolist()) == list(range(len(lengths)))
    for b in batches:
        assert len({lengths[i] for i in b}) == 1 and len(b) <= 2
    assert [len(b) for b in batches] == [1, 2, 2, 2, 1]  # 9 | 7 7 | 7 7 | 5 5 | 1


def test_plan_batches_rejects_bad_bounds():
    with pytest.raises(ValueError, match="batch_size"):
        plan_batches([1], batch_size=0, max_tokens=10)
    with pytest.raises(ValueError, match="max_batch_tokens"):
        plan_batches([1], batch_size=1, max_tokens=0)


def test_pad_batch():
    ids, mask = pad_batch([[0, 5, 2], [0, 2]], pad_id=1)
    assert ids.tolist() == [[0, 5, 2], [0, 2, 1]]
    assert mask.tolist() == [[1, 1, 1], [1, 1, 0]]
    assert ids.dtype == mask.dtype == np.int64
