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


@pytest.mark.parametrize("variant", ["fp32", "int8"])
def test_padded_and_unpadded_batches_agree(package_dir, texts, variant):
    padded = M3Model(package_dir, variant=variant)
    unpadded = M3Model(package_dir, variant=variant, pad_batches=False)
    assert padded.pad_batches is True  # the default
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


def _rows_per_call(model):
    rows = []
    run = model.session.run

    def counting(names, feed, options=None):
        rows.append(feed["input_ids"].shape)
        return run(names, feed, options)

    model.session.run = counting
    return rows


def test_int8_batches_and_a_long_text_keeps_its_numbers(package_dir, texts):
    """Per-token int8 runs texts together (several rows per call) and stays exact: a text
    over the flash limit (here 700 tokens) is never padded, so it gets the flash kernel in
    its batch as alone, and the short ones take the masked kernel either way."""
    model = M3Model(package_dir, variant="int8")
    limit = model.package.variant("int8").flash_min_tokens
    assert limit is not None and limit < 700
    long_text = " ".join(["retrieval"] * 698)
    assert len(model.tokenizer.encode([long_text], 8192)[0]) == 700
    mixed = [*texts[:8], long_text]
    shapes = _rows_per_call(model)
    together = _encode(model, mixed)
    assert shapes[0] == (1, 700) and any(rows > 1 for rows, _ in shapes[1:])
    for i, text in enumerate(mixed):
        alone = _encode(model, [text])
        np.testing.assert_allclose(alone["dense_vecs"][0], together["dense_vecs"][i], atol=1e-5, rtol=0)
        np.testing.assert_allclose(alone["colbert_vecs"][0], together["colbert_vecs"][i], atol=1e-5, rtol=0)


def test_per_run_int8_packages_run_one_text_per_call(package_dir, texts, tmp_path):
    """Packages whose int8 scales activations per run (written before per-token int8,
    ``dynamic_activations``) keep running each text alone unless ``exact_batches=False``."""
    import json
    import shutil

    copy = tmp_path / "pkg"
    shutil.copytree(package_dir, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["variants"]["int8"]["dynamic_activations"] = True
    (copy / "manifest.json").write_text(json.dumps(manifest))
    exact = M3Model(copy, variant="int8")
    shapes = _rows_per_call(exact)
    _encode(exact, texts[:6])
    assert len(shapes) == 6 and all(rows == 1 for rows, _ in shapes)
    loose = M3Model(copy, variant="int8", exact_batches=False)
    shapes = _rows_per_call(loose)
    _encode(loose, texts[:6])
    assert len(shapes) < 6


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


def test_plan_batches_pads_only_up_to_the_limit():
    lengths = [600, 600, 700, 20, 9, 33, 512, 600]
    batches = plan_batches(lengths, batch_size=8, max_tokens=4096, pad=True, pad_limit=512)
    assert sorted(np.concatenate(batches).tolist()) == list(range(len(lengths)))
    assert [sorted(lengths[i] for i in b) for b in batches] == [[700], [600, 600, 600], [9, 20, 33, 512]]


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


def test_heap_is_released_after_long_passes_only(package_dir, monkeypatch):
    """A forward pass over >= RELEASE_AFTER_TOKENS tokens hands the C heap's free memory
    back (glibc malloc_trim); short batches do not pay for it."""
    from m3_runtime import engine as model_module  # the engine runs the forward passes
    from m3_runtime import session

    calls: list[int] = []
    monkeypatch.setattr(model_module, "release_heap", lambda: calls.append(1))
    model = M3Model(package_dir, variant="fp32")
    model.encode(["short text"] * 8)
    assert calls == []
    long_text = "Multilingual retrieval needs long passages too. " * 600  # > 4,096 tokens
    assert len(model.tokenizer.encode([long_text], 8192)[0]) >= model_module.RELEASE_AFTER_TOKENS
    model.encode([long_text])
    assert calls == [1]
    session.release_heap()  # the real one runs (glibc here) without error


def test_cpu_sessions_share_one_arena_that_shrinks_after_each_run(package_dir):
    """CPU sessions allocate from the one arena registered with ONNX Runtime's environment
    (``session.CPU_ARENA``), and every forward pass asks it to give free regions back;
    the numbers are the goldens' either way (test_parity runs on these sessions)."""
    from m3_runtime import session

    models = [M3Model(package_dir, variant="fp32"), M3Model(package_dir, variant="int8", workers=2)]
    assert session._register_cpu_arena() is True  # registered once, the second call cached
    for model in models:
        options = model.session.get_session_options()
        assert options.enable_cpu_mem_arena
        assert options.get_session_config_entry("session.use_env_allocators") == "1"
        run = model.engine._run_options
        assert run is not None and run.get_run_config_entry("memory.enable_memory_arena_shrinkage") == "cpu:0"
        model.encode(["short text"] * 8 + ["long " * 600], return_sparse=True, return_colbert_vecs=True)


@pytest.mark.parametrize("variant", ["fp32", "int8"])
def test_concurrent_runs_equal_one_at_a_time(package_dir, variant):
    """Several forward passes at once on one session (workers=2, one intra-op thread each)
    give the same numbers, in input order, as one run at a time."""
    texts = [f"text {i} " + "word " * (i * 13 % 60) for i in range(40)] + ["long " * 700]
    one = M3Model(package_dir, variant=variant)
    two = M3Model(package_dir, variant=variant, workers=2, intra_op_threads=1, max_batch_tokens=64)
    _assert_same(_encode(one, texts), _encode(two, texts))
