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
