"""m3-export --eval: each variant's retrieval quality against fp32 on the user's data goes
into the manifest and m3 info; a drop over --max-ndcg-drop fails the export."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

pytest.importorskip("pytrec_eval")
pytestmark = pytest.mark.exporter

sys.path.insert(0, str(Path(__file__).resolve().parent))
from m3_runtime.evaluation import data as evdata  # noqa: E402
from test_evaluation import QUERIES, RELEVANT, TEXTS  # noqa: E402

CHECKPOINT = Path(__file__).resolve().parents[1] / "models" / "tiny-m3"


@pytest.fixture(scope="module")
def eval_set(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("gate-set")
    return evdata.write(
        root,
        [(f"d{i}", "", t) for i, t in enumerate(TEXTS)],
        [(f"q{i}", t) for i, t in enumerate(QUERIES)],
        {"test": [(f"q{i}", f"d{r}", 1) for i, r in enumerate(RELEVANT)]},
    )


@pytest.fixture(scope="module")
def gated(tmp_path_factory, eval_set) -> Path:
    from m3_exporter.cli import main

    out = tmp_path_factory.mktemp("gated") / "pkg"
    assert (
        main([str(CHECKPOINT), str(out), "--variants", "fp32,int8", "--eval", str(eval_set), "--max-ndcg-drop", "1"])
        == 0
    )
    return out


def test_manifest_records_each_variant_and_mode_and_m3_info_shows_them(gated, eval_set, capsys):
    from m3_runtime.cli import main
    from m3_runtime.evaluation.run import EvalConfig, evaluate, results_json

    record = json.loads((gated / "manifest.json").read_text())["retrieval_eval"]
    modes = ["dense", "sparse", "colbert", "dense+sparse", "all"]
    assert [(r["variant"], r["mode"]) for r in record["results"]] == [(v, m) for v in ("fp32", "int8") for m in modes]
    assert record["max_ndcg_drop"] == 1.0 and record["over_bound"] == [] and record["split"] == "test"
    # the figures are m3 eval's on the written package
    again = results_json(
        evaluate(str(gated), evdata.load(eval_set), EvalConfig(variants=["fp32", "int8"], modes=modes, ks=[10, 100])),
        evdata.load(eval_set),
        EvalConfig(),
    )
    for got, want in zip(record["results"], again["results"], strict=True):
        assert got["metrics"] == pytest.approx(want["metrics"])
    assert [(d["mode"], d["metric"]) for d in record["deltas"]] == [(m, "ndcg@10") for m in modes]
    capsys.readouterr()
    assert main(["info", str(gated)]) == 0
    out = capsys.readouterr().out
    assert "retrieval    ndcg@10 on gate-set0 (test: 5 queries, 12 passages)" in out
    assert "  int8  dense+sparse" in out and "vs fp32, 95% [" in out


def test_a_drop_over_the_bound_fails_with_the_figures_unless_kept(gated, eval_set, tmp_path):
    from m3_exporter.quality_gate import QualityGateError, record_retrieval_eval
    from m3_runtime.package import load_package

    work = tmp_path / "work"
    shutil.copytree(gated, work)
    manifest = load_package(work).manifest
    # a bound below any possible drop (-1): every int8 mode is over it
    with pytest.raises(
        QualityGateError, match=r"ndcg@10 below fp32's by more than --max-ndcg-drop -1 .*int8 dense [+-]"
    ):
        record_retrieval_eval(work, manifest, eval_set, max_ndcg_drop=-1.0, say=lambda _m: None)
    kept = record_retrieval_eval(work, manifest, eval_set, max_ndcg_drop=-1.0, keep_anyway=True, say=lambda _m: None)
    assert kept.retrieval_eval is not None
    assert kept.retrieval_eval["over_bound"] == [
        f"int8 {m}" for m in ("dense", "sparse", "colbert", "dense+sparse", "all")
    ]
    assert json.loads((work / "manifest.json").read_text())["retrieval_eval"]["over_bound"]


def test_bad_eval_data_fails_before_the_export(tmp_path, capsys):
    from m3_exporter.cli import main

    bad = evdata.write(tmp_path / "bad", [("d1", "", "x")], [("q1", "y")], {"test": [("q1", "d9", 1)]})
    out = tmp_path / "pkg"
    assert main([str(CHECKPOINT), str(out), "--variants", "fp32", "--eval", str(bad)]) == 2
    assert "test.tsv:2: corpus id 'd9' is not in" in capsys.readouterr().err
    assert not out.exists()


@pytest.fixture(scope="module")
def disagreement_set(tmp_path_factory, gated) -> Path:
    """Real English passages and queries where the tiny int8 really ranks differently from fp32.

    Passages: 60 pydoc paragraphs; candidate queries: the first 8 words of 150 others. Each
    query's relevant passage is the one fp32 ranks first by dense score (m3 eval's own
    encoding and ranking, on the package ``gated`` exported from the same checkpoint), so
    fp32's dense nDCG@10 is 1 on every query. Kept: every query whose int8 dense top-1 is
    another passage (int8's nDCG@10 there is at most 1/log2(3)), and as many where the two
    agree. The drop is then the int8's own, measured by the gate on whatever CPU runs the
    suite (7-bit activations without VNNI, 8-bit with it), never a figure set by hand."""
    from m3_exporter.texts import english_paragraphs
    from m3_runtime.evaluation.run import EvalConfig, VariantEvaluator

    paragraphs = english_paragraphs(210, max_words=60)
    passages, queries = paragraphs[:60], [" ".join(p.split()[:8]) for p in paragraphs[60:]]
    corpus = [(f"d{i}", "", t) for i, t in enumerate(passages)]
    probe = evdata.write(
        tmp_path_factory.mktemp("probe"),
        corpus,
        [(f"q{i}", t) for i, t in enumerate(queries)],
        {"test": [(f"q{i}", "d0", 1) for i in range(len(queries))]},
    )
    data = evdata.load(probe)
    cfg = EvalConfig(variants=["fp32", "int8"], modes=["dense"], ks=[10])
    top = {}
    for variant in ("fp32", "int8"):
        ranked, _ = VariantEvaluator(str(gated), variant, cfg, say=lambda _m: None).rankings(
            data, ["dense"], cfg.weights
        )
        top[variant] = [int(r[0]) for r in ranked["dense"].indices]
    flips = [q for q in range(len(queries)) if top["fp32"][q] != top["int8"][q]]
    assert flips, "the tiny int8 ranks every query's fp32 top-1 first: no honest drop to test the gate with"
    agree = [q for q in range(len(queries)) if q not in flips][: len(flips)]
    kept = sorted(flips + agree)
    return evdata.write(
        tmp_path_factory.mktemp("disagree"),
        corpus,
        [(f"q{q}", queries[q]) for q in kept],
        {"test": [(f"q{q}", f"d{top['fp32'][q]}", 1) for q in kept]},
    )


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_the_cli_fails_an_export_over_the_bound_and_keeps_it_with_keep_anyway(disagreement_set, tmp_path, capsys):
    """`m3-export SRC OUT --variants fp32,int8 --eval DATA --max-ndcg-drop X` as a user runs it.

    The bound comes from a first export that passes (bound 1) and measures int8's nDCG@10
    drop per mode: half the worst drop (real and positive by the eval set's construction)
    must fail. The failing export targets that first package with --force: it exits 2
    with the figures and leaves the package byte for byte as it was, with no temporary
    folder behind. With --keep-anyway the same bound writes the package, the overruns in
    its manifest and in m3 info."""
    from m3_exporter.cli import main as export
    from m3_runtime.cli import main as m3

    base = [str(CHECKPOINT)]
    flags = ["--variants", "fp32,int8", "--eval", str(disagreement_set)]
    first = tmp_path / "first"
    assert export([*base, str(first), *flags, "--max-ndcg-drop", "1"]) == 0
    deltas = json.loads((first / "manifest.json").read_text())["retrieval_eval"]["deltas"]
    worst = max(deltas, key=lambda d: -d["delta"])
    assert worst["variant"] == "int8" and -worst["delta"] > 0, deltas
    bound = -worst["delta"] / 2
    over = [f"int8 {d['mode']}" for d in deltas if -d["delta"] > bound]
    before = _files(first)
    capsys.readouterr()

    assert export([*base, str(first), *flags, "--max-ndcg-drop", repr(bound), "--force"]) == 2
    err = capsys.readouterr().err
    assert f"m3-export: error: ndcg@10 below fp32's by more than --max-ndcg-drop {bound:g}" in err
    assert f"int8 {worst['mode']} {worst['delta']:+.4f} [{worst['ci_low']:+.4f}, {worst['ci_high']:+.4f}]" in err
    assert "nothing written (--keep-anyway writes the package and records this)" in err
    assert _files(first) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["first"]  # no partial folder left

    kept = tmp_path / "kept"
    assert export([*base, str(kept), *flags, "--max-ndcg-drop", repr(bound), "--keep-anyway"]) == 0
    record = json.loads((kept / "manifest.json").read_text())["retrieval_eval"]
    assert record["max_ndcg_drop"] == bound and record["over_bound"] == over
    assert [d["delta"] for d in record["deltas"]] == pytest.approx([d["delta"] for d in deltas], abs=1e-12)
    capsys.readouterr()
    assert m3(["info", str(kept)]) == 0
    out = capsys.readouterr().out
    assert "  OVER THE BOUND (kept with --keep-anyway): " + ", ".join(over) in out
    assert f"  int8  {worst['mode']:13}" in out and f"({worst['delta']:+.4f} vs fp32, 95% [" in out
