"""m3 eval: metrics against hand-computed values, every mode and the reranker on the tiny
packages against brute-force rankings from the model's own outputs, bad input, JSON shape."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pytrec_eval")
pytest.importorskip("scipy")

from m3_runtime import scoring
from m3_runtime.contract import KINDS
from m3_runtime.errors import UnsupportedOutput
from m3_runtime.evaluation import data as evdata
from m3_runtime.evaluation import metrics
from m3_runtime.evaluation.run import EvalConfig, VariantEvaluator, check_config

# -- metrics: values by hand ----------------------------------------------------------


def test_metrics_match_hand_computed_values():
    """q1 judges d1 (1) and d3 (2) and ranks d2 d1 d4 d3; q2 judges d2 and ranks it first.

    By hand (gain = relevance, discount log2(rank + 1), as trec_eval):
    q1 nDCG@2 = (1/log2 3) / (2 + 1/log2 3); nDCG@4 adds 2/log2 5 above the line;
    recall@2 = 1/2, @4 = 1; RR = 1/2 at both cuts; AP@2 = (1/2)/2, AP@4 = (1/2 + 2/4)/2.
    q2: every metric 1."""
    qrels = {"q1": {"d1": 1, "d3": 2, "d9": 0}, "q2": {"d2": 1}}
    corpus = ["d1", "d2", "d3", "d4", "d9"]
    rankings = [np.array([1, 0, 3, 2]), np.array([1, 0, 2, 3])]
    got = metrics.means(metrics.per_query(qrels, ["q1", "q2"], corpus, rankings, [2, 4]))
    l3, l5 = math.log2(3), math.log2(5)
    q1 = {
        "ndcg@2": (1 / l3) / (2 + 1 / l3),
        "ndcg@4": (1 / l3 + 2 / l5) / (2 + 1 / l3),
        "recall@2": 0.5,
        "recall@4": 1.0,
        "mrr@2": 0.5,
        "mrr@4": 0.5,
        "map@2": 0.25,
        "map@4": 0.5,
    }
    assert list(got) == ["ndcg@2", "ndcg@4", "recall@2", "recall@4", "mrr@2", "mrr@4", "map@2", "map@4"]
    for name, value in q1.items():
        assert got[name] == pytest.approx((value + 1.0) / 2, abs=1e-6), name


def test_mrr_cut_ignores_a_hit_below_the_cut():
    got = metrics.per_query({"q": {"b": 1}}, ["q"], ["a", "b", "c"], [np.array([0, 2, 1])], [2, 3])
    assert got["mrr@2"][0] == 0.0 and got["mrr@3"][0] == pytest.approx(1 / 3)


def test_paired_delta_p_value_and_interval():
    base = np.array([0.5, 0.5, 0.5])
    other = base + np.array([0.1, 0.3, 0.2])
    d = metrics.paired_delta(base, other)
    t = 0.2 / (0.1 / math.sqrt(3))  # mean / standard error of the differences
    assert d.mean == pytest.approx(0.2)
    assert d.p_value == pytest.approx(1 - t / math.sqrt(t * t + 2), rel=1e-6)  # Student t, 2 dof, two-sided
    assert 0.1 - 1e-12 <= d.low < 0.2 < d.high <= 0.3 + 1e-12  # a mean of resampled diffs
    same = metrics.paired_delta(base, base)
    assert (same.mean, same.low, same.high, same.p_value) == (0.0, 0.0, 0.0, 1.0)


def test_lexical_score_matrix_is_the_dict_formula():
    rng = np.random.default_rng(1)
    items = [
        {str(k): float(rng.random()) for k in rng.choice(60, size=rng.integers(0, 15), replace=False)}
        for _ in range(30)
    ]
    q, p = items[:7], items[7:]
    got = scoring.lexical_score_matrix(q, *scoring.lexical_csr(p))
    want = [[sum(w * b.get(k, 0.0) for k, w in a.items()) for b in p] for a in q]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


# -- data: errors name file and line --------------------------------------------------


def _set(root: Path, corpus, queries, qrels) -> Path:
    return evdata.write(root, corpus, queries, qrels)


def test_bad_data_names_file_and_line(tmp_path):
    root = _set(tmp_path / "a", [("d1", "", "x"), ("d2", "T", "y")], [("q1", "x?")], {"test": [("q1", "d1", 1)]})
    ok = evdata.load(root)
    assert ok.corpus_texts == ["x", "T y"] and ok.qrels == {"q1": {"d1": 1}}
    with (root / "qrels" / "test.tsv").open("a") as fh:
        fh.write("q1\td7\t1\n")
    with pytest.raises(evdata.EvalDataError, match=r"test\.tsv:3: corpus id 'd7' is not in .*corpus\.jsonl"):
        evdata.load(root)
    (root / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n")
    with pytest.raises(evdata.EvalDataError, match=r"test\.tsv: the split is empty"):
        evdata.load(root)
    with pytest.raises(evdata.EvalDataError, match=r"dev\.tsv: no such file \(splits there: test\)"):
        evdata.load(root, "dev")
    (root / "qrels" / "test.tsv").write_text("q1\td1\t1\n")
    with (root / "corpus.jsonl").open("a") as fh:
        fh.write('{"_id": "d3", "text": "z"\n')
    with pytest.raises(evdata.EvalDataError, match=r"corpus\.jsonl:3: not a JSON object"):
        evdata.load(root)


def test_qrels_query_missing_and_all_zero_judgements(tmp_path):
    root = _set(tmp_path / "b", [("d1", "", "x")], [("q1", "x?"), ("q2", "y?")], {"test": [("q9", "d1", 1)]})
    with pytest.raises(evdata.EvalDataError, match=r"test\.tsv:2: query id 'q9' is not in .*queries\.jsonl"):
        evdata.load(root)
    (root / "qrels" / "test.tsv").write_text("q1\td1\t1\nq2\td1\t0\n")
    got = evdata.load(root)
    assert got.query_ids == ["q1"] and got.dropped_queries == ["q2"]


def test_a_mode_the_package_cannot_serve_is_refused():
    with pytest.raises(UnsupportedOutput, match="--modes sparse: the package is a dense-only model"):
        check_config(EvalConfig(modes=["dense", "sparse"]), KINDS["dense"])
    with pytest.raises(ValueError, match="unknown mode 'colbertx'"):
        check_config(EvalConfig(modes=["colbertx"]), KINDS["bge-m3"])


# -- every mode on the tiny package, against brute force from the model's outputs -----

TEXTS = [
    "The library opens at nine in the morning and closes at six.",
    "BM25 ranks documents by the query terms appearing in each document.",
    "Dense retrieval embeds queries and passages into one vector space.",
    "ColBERT scores every query token against every passage token.",
    "The quick brown fox jumps over the lazy dog.",
    "Rivers carry water from the mountains to the sea.",
    "A reranker reads the query and the passage together.",
    "Sparse weights give each token of a text an importance.",
    "Tokyo is the capital of Japan and its largest city.",
    "Hybrid retrieval adds dense, sparse and multi-vector scores.",
    "Paris is known for its museums and cafes.",
    "Bread is baked from flour, water, salt and yeast.",
]
QUERIES = ["when does the library open", "what is BM25", "capital of Japan", "how is bread made", "hybrid scores"]
RELEVANT = [0, 1, 8, 11, 9]


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("evalset")
    corpus = [(f"d{i}", "", t) for i, t in enumerate(TEXTS)]
    queries = [(f"q{i}", t) for i, t in enumerate(QUERIES)]
    test = [(f"q{i}", f"d{r}", 1) for i, r in enumerate(RELEVANT)]
    dev = [(f"q{i}", f"d{r}", 1) for i, r in enumerate(RELEVANT[:3])]
    return evdata.write(root, corpus, queries, {"test": test, "dev": dev})


def _sorted_scores(matrix: np.ndarray, depth: int) -> np.ndarray:
    return -np.sort(-matrix, axis=1)[:, :depth]


def test_every_mode_ranks_as_brute_force_on_the_models_outputs(package_dir, tiny_set):
    from m3_runtime import M3Model

    data = evdata.load(tiny_set)
    weights = (0.4, 0.2, 0.4)
    cfg = EvalConfig(
        variants=["fp32"], modes=["dense", "sparse", "dense+sparse", "colbert", "all"], ks=[3], candidates=4
    )
    ev = VariantEvaluator(str(package_dir), "fp32", cfg, say=lambda _m: None)
    ranked, _ = ev.rankings(data, cfg.modes, weights)
    model = M3Model(package_dir, variant="fp32")
    q = model.encode_queries(QUERIES, return_sparse=True, return_colbert_vecs=True)
    p = model.encode_corpus(TEXTS, return_sparse=True, return_colbert_vecs=True)
    dense = q["dense_vecs"] @ p["dense_vecs"].T
    sparse = np.asarray(model.compute_lexical_matching_score(q["lexical_weights"], p["lexical_weights"]))
    depth = 4  # max(--k, --candidates): what the first stage keeps
    for mode, matrix in (("dense", dense), ("sparse", sparse), ("dense+sparse", (0.4 * dense + 0.2 * sparse) / 0.6)):
        got = np.array([s for s in ranked[mode].scores])
        np.testing.assert_allclose(got, _sorted_scores(matrix, depth), rtol=1e-4, atol=1e-5, err_msg=mode)
    colbert = np.array([[model.colbert_score(qv, pv) for pv in p["colbert_vecs"]] for qv in q["colbert_vecs"]])
    for i in range(len(QUERIES)):
        dense_top = np.argsort(-dense[i], kind="stable")[:4]
        sparse_top = np.argsort(-sparse[i], kind="stable")[:4]
        # colbert: the dense top-4 re-scored; all: dense top-4 + sparse top-4 by the weighted sum
        assert set(ranked["colbert"].indices[i].tolist()) == set(dense_top.tolist())
        np.testing.assert_allclose(ranked["colbert"].scores[i], -np.sort(-colbert[i, dense_top]), rtol=1e-5)
        pool = sorted(set(dense_top.tolist()) | set(sparse_top.tolist()))
        mixed = (0.4 * dense[i, pool] + 0.2 * sparse[i, pool] + 0.4 * colbert[i, pool]) / 1.0
        assert sorted(ranked["all"].indices[i].tolist()) == pool
        np.testing.assert_allclose(ranked["all"].scores[i], -np.sort(-mixed), rtol=1e-4, atol=1e-5)


def test_cli_every_mode_reranker_json_and_report(package_dir, reranker_dir, tiny_set, tmp_path, capsys):
    from m3_runtime.cli import main

    out, report = tmp_path / "r.json", tmp_path / "r.html"
    argv = [str(package_dir), str(tiny_set), "--variants", "fp32,int8", "--k", "3,5", "--candidates", "6"]
    argv += ["--reranker", str(reranker_dir), "--rerank-top", "4", "--json", str(out), "--report", str(report)]
    assert main(["eval", *argv, "--tune"]) == 0
    printed = capsys.readouterr()
    assert "[fp32]" in printed.out and "[int8]" in printed.out and "--tune (fp32, ndcg@3 on dev)" in printed.out
    assert "fp32: encoding corpus: 12/12 texts (100%)" in printed.err  # progress on stderr
    result = json.loads(out.read_text())
    modes = ["dense", "sparse", "colbert", "dense+sparse", "all", "dense>rerank"]
    assert [(r["variant"], r["mode"]) for r in result["results"]] == [(v, m) for v in ("fp32", "int8") for m in modes]
    names = ["ndcg@3", "ndcg@5", "recall@3", "recall@5", "mrr@3", "mrr@5", "map@3", "map@5"]
    for r in result["results"]:
        assert list(r["metrics"]) == names and all(0.0 <= v <= 1.0 for v in r["metrics"].values())
    assert {(d["variant"], d["mode"], d["metric"]) for d in result["deltas"]} == {
        ("int8", m, n) for m in modes for n in names
    }
    for d in result["deltas"]:
        assert d["ci_low"] <= d["delta"] <= d["ci_high"] and 0.0 <= d["p_value"] <= 1.0
        base = next(r for r in result["results"] if r["variant"] == "fp32" and r["mode"] == d["mode"])
        other = next(r for r in result["results"] if r["variant"] == "int8" and r["mode"] == d["mode"])
        assert d["delta"] == pytest.approx(other["metrics"][d["metric"]] - base["metrics"][d["metric"]], abs=1e-9)
    tune = result["tune"]
    # 0.4/0.2/0.4 is on the grid, so the best dev value cannot be below it
    assert tune["dev"]["best"] >= tune["dev"]["default"]
    html = report.read_text()
    assert html.startswith("<!doctype html>") and html.count("<svg") == len(names) and "dense&gt;rerank" in html


def test_cli_refuses_sparse_on_a_dense_only_package(tmp_path, package_dir, tiny_set, capsys):
    import shutil

    from m3_runtime.cli import main

    pkg = tmp_path / "dense-only"
    shutil.copytree(package_dir, pkg)
    manifest = json.loads((pkg / "manifest.json").read_text())
    manifest["model_kind"] = "dense"
    (pkg / "manifest.json").write_text(json.dumps(manifest))
    assert main(["eval", str(pkg), str(tiny_set), "--variants", "fp32", "--modes", "dense,sparse"]) == 2
    assert "--modes sparse: the package is a dense-only model" in capsys.readouterr().err


def test_embed_corpus_output_is_reused(package_dir, tiny_set, tmp_path):
    """Parquet written by embed-corpus' own actor code serves as the corpus: same metrics as encoding."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    from m3_runtime.corpus import FILE, ROW, CorpusJob, Embedder
    from m3_runtime.evaluation.run import evaluate

    data = evdata.load(tiny_set)
    job = CorpusJob(package=str(package_dir), id_column="_id", outputs=("dense", "sparse", "colbert"))
    batch = pa.table(
        {
            "_id": data.corpus_ids,
            "text": data.corpus_texts,
            ROW: pa.array(range(len(data)), pa.int64()),
            FILE: pa.array([0] * len(data), pa.int32()),
        }
    )
    folder = tmp_path / "emb"
    folder.mkdir()
    table = Embedder(job, 1)(batch).drop_columns([ROW, FILE])
    pq.write_table(table.slice(0, 7), folder / "a.parquet")  # two files, as embed-corpus writes one per input
    pq.write_table(table.slice(7), folder / "b.parquet")
    modes = ["dense", "sparse", "dense+sparse", "colbert", "all"]
    # embed-corpus loads the default variant: int8 on a CPU
    variant = Embedder(job, 1).model.variant
    plain = EvalConfig(variants=[variant], modes=modes, ks=[3, 5], candidates=5)
    reused = EvalConfig(variants=[variant], modes=modes, ks=[3, 5], candidates=5, embedded={variant: str(folder)})
    a = evaluate(str(package_dir), data, plain, say=lambda _m: None)[0]
    b = evaluate(str(package_dir), data, reused, say=lambda _m: None)[0]
    for mode in modes:
        for name, values in a.per_query[mode].items():
            np.testing.assert_allclose(b.per_query[mode][name], values, atol=1e-9, err_msg=f"{mode} {name}")


def test_re_encoded_colbert_candidates_equal_kept_ones(package_dir, tiny_set):
    """Past keep_colbert_bytes of rows each needed passage's ColBERT rows are re-encoded once: same rankings."""
    from m3_runtime.evaluation.run import evaluate

    data = evdata.load(tiny_set)
    kept = EvalConfig(variants=["fp32"], modes=["colbert", "all"], ks=[3], candidates=5)
    again = EvalConfig(variants=["fp32"], modes=["colbert", "all"], ks=[3], candidates=5, keep_colbert_bytes=0)
    a = evaluate(str(package_dir), data, kept, say=lambda _m: None)[0]
    b = evaluate(str(package_dir), data, again, say=lambda _m: None)[0]
    for mode in ("colbert", "all"):
        for name, values in a.per_query[mode].items():
            np.testing.assert_allclose(b.per_query[mode][name], values, atol=1e-9, err_msg=f"{mode} {name}")


def test_float16_rows_convert_as_numpy_astype_does():
    from m3_runtime.evaluation.retrieval import split_rows, to_float32

    every = np.arange(1 << 16, dtype=np.uint16).view(np.float16)  # every bit pattern, NaNs and infinities too
    got, want = to_float32(every), every.astype(np.float32)
    assert got.dtype == np.float32 and np.array_equal(got.view(np.uint32), want.view(np.uint32))
    rows = split_rows(every[:12].reshape(4, 3), np.array([1, 3]))
    assert [r.shape for r in rows] == [(1, 3), (3, 3)] and np.array_equal(np.concatenate(rows), want[:12].reshape(4, 3))


def _colbert_oracle(pools, q_rows, p_rows) -> None:
    """Every pooled pair's ColBERT score is scoring.colbert_score of that query's and passage's rows."""
    pairs = 0
    for q, (union, got) in enumerate(zip(pools.indices, pools.colbert, strict=True)):
        want = [scoring.colbert_score(q_rows[q], p_rows[int(i)]) for i in union]
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7, err_msg=f"query {q}")
        pairs += len(union)
    assert pairs > len(pools.indices)  # several candidates per query


def test_colbert_rescoring_equals_per_pair_colbert_score_from_every_source(
    package_dir, tiny_set, tmp_path, monkeypatch
):
    """Passage-major re-scoring against a direct per-pair ``scoring.colbert_score``, with the
    rows kept, re-encoded (one passage per chunk, so chunks are many) and read from float16
    Parquet written by embed-corpus' own actor code (two files: one as embed-corpus writes it,
    one in row groups of 2 rows, so some groups are skipped; needed rows taken 2 at a time). The oracle's passage rows are the model's own (kept, re-encoded) and the
    Parquet's own values read back as Python lists (float16 -> float32)."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    from m3_runtime import M3Model
    from m3_runtime.corpus import FILE, ROW, CorpusJob, Embedder, parquet_options
    from m3_runtime.evaluation import embedded, retrieval

    data = evdata.load(tiny_set)
    cfg = EvalConfig(variants=["fp32"], modes=["colbert", "all"], ks=[3], candidates=3)
    ev = VariantEvaluator(str(package_dir), "fp32", cfg, say=lambda _m: None)
    queries, corpus = ev.queries(data), ev.corpus(data)
    assert queries.colbert is not None and corpus.colbert is not None
    first = retrieval.first_stage(
        queries, corpus, depth=3, modes=["dense", "sparse"], weights=(0.4, 0.2, 0.4), say=lambda _m: None
    )
    said: list[str] = []
    kept = retrieval.pools(
        queries, corpus, first, candidates=3, colbert_rows=retrieval.kept_rows(corpus.colbert), say=said.append
    )
    needed = len(set(np.concatenate(kept.indices).tolist()))
    assert 3 < needed < len(TEXTS)  # some passages are nobody's candidate
    assert said[-1].startswith(f"colbert re-scoring: {needed}/{needed} passages (100%)")
    _colbert_oracle(kept, queries.colbert, corpus.colbert)

    monkeypatch.setattr(retrieval, "COLBERT_BUDGET", 1)  # one passage per chunk
    model = M3Model(package_dir, variant="fp32")
    again = retrieval.pools(
        queries,
        corpus,
        first,
        candidates=3,
        colbert_rows=retrieval.encoded_rows(model, data.corpus_texts, max_length=None),
        say=lambda _m: None,
    )
    _colbert_oracle(again, queries.colbert, model.encode_corpus(TEXTS, return_colbert_vecs=True)["colbert_vecs"])

    job = CorpusJob(
        package=str(package_dir), id_column="_id", outputs=("dense", "sparse", "colbert"), colbert_dtype="float16"
    )
    batch = pa.table(
        {
            "_id": data.corpus_ids,
            "text": data.corpus_texts,
            ROW: pa.array(range(len(data)), pa.int64()),
            FILE: pa.array([0] * len(data), pa.int32()),
        }
    )
    table = Embedder(job, 1)(batch).drop_columns([ROW, FILE])
    assert table.schema.field("colbert").type.value_type.value_type == pa.float16()
    folder = tmp_path / "emb16"
    folder.mkdir()
    pq.write_table(table.slice(0, 5), folder / "a.parquet", **parquet_options(table))  # as embed-corpus writes
    pq.write_table(table.slice(5), folder / "b.parquet", row_group_size=2)
    colbert_chunk = pq.ParquetFile(folder / "a.parquet").metadata.row_group(0).column(5)
    assert colbert_chunk.path_in_schema.startswith("colbert") and "RLE_DICTIONARY" not in colbert_chunk.encodings
    monkeypatch.setattr(embedded, "BATCH_ROWS", 2)
    stored, rows = embedded.load_embedded(folder, data.corpus_ids, say=lambda _m: None)
    assert rows is not None
    first = retrieval.first_stage(
        queries, stored, depth=3, modes=["dense", "sparse"], weights=(0.4, 0.2, 0.4), say=lambda _m: None
    )
    read = retrieval.pools(queries, stored, first, candidates=3, colbert_rows=rows, say=lambda _m: None)
    oracle = [np.array(r, np.float32) for r in pq.read_table(folder).column("colbert").to_pylist()]
    _colbert_oracle(read, queries.colbert, oracle)


def test_embedded_folder_missing_an_id_is_named(tmp_path, tiny_set):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    from m3_runtime.evaluation.embedded import load_embedded

    data = evdata.load(tiny_set)
    dense = pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(2 * 4, np.float32)), 4)
    pq.write_table(pa.table({"_id": ["d0", "d1"], "dense": dense}), tmp_path / "x.parquet")
    with pytest.raises(evdata.EvalDataError, match=r"corpus id 'd2' \(and 9 more\) not embedded there"):
        load_embedded(tmp_path, data.corpus_ids, say=lambda _m: None)
