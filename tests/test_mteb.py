"""The MTEB wrappers: MTEB 2.x's own evaluator on a local BEIR folder gives the figures
m3 eval computes, for the encoder protocol (dense) and the search protocol (every mode)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

mteb = pytest.importorskip("mteb")
pytest.importorskip("pytrec_eval")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from m3_runtime.evaluation import data as evdata  # noqa: E402
from m3_runtime.evaluation.run import EvalConfig, evaluate  # noqa: E402
from test_evaluation import QUERIES, RELEVANT, TEXTS  # noqa: E402

MODES = ["dense", "sparse", "colbert", "dense+sparse", "all"]


@pytest.fixture(scope="module")
def local_set(tmp_path_factory) -> Path:
    return evdata.write(
        tmp_path_factory.mktemp("mteb-set"),
        [(f"d{i}", "", t) for i, t in enumerate(TEXTS)],
        [(f"q{i}", t) for i, t in enumerate(QUERIES)],
        {"test": [(f"q{i}", f"d{r}", 1) for i, r in enumerate(RELEVANT)]},
    )


@pytest.fixture(scope="module")
def ours(package_dir, local_set):
    cfg = EvalConfig(variants=["fp32"], modes=MODES, ks=[3, 10], candidates=12)
    (run,) = evaluate(str(package_dir), evdata.load(local_set), cfg, say=lambda _m: None)
    return {mode: {k: float(v.mean()) for k, v in values.items()} for mode, values in run.per_query.items()}


def _scores(model, local_set):
    from m3_runtime.evaluation.mteb import local_task

    result = mteb.evaluate(model, local_task(local_set), cache=None, show_progress_bar=False)
    return result.task_results[0].scores["test"][0]


@pytest.mark.parametrize("mode", MODES)
def test_search_protocol_every_mode_matches_m3_eval(package_dir, local_set, ours, mode):
    from m3_runtime.evaluation.mteb import M3Search

    got = _scores(M3Search(package_dir, "fp32", mode=mode, candidates=12), local_set)
    for k in (3, 10):
        assert got[f"ndcg_at_{k}"] == pytest.approx(ours[mode][f"ndcg@{k}"], abs=1e-5), (mode, k)
        assert got[f"recall_at_{k}"] == pytest.approx(ours[mode][f"recall@{k}"], abs=1e-5), (mode, k)
        assert got[f"mrr_at_{k}"] == pytest.approx(ours[mode][f"mrr@{k}"], abs=1e-5), (mode, k)


def test_encoder_protocol_dense_matches_m3_eval(package_dir, local_set, ours):
    from m3_runtime.evaluation.mteb import M3Encoder

    got = _scores(M3Encoder(package_dir, "fp32"), local_set)
    assert got["ndcg_at_10"] == pytest.approx(ours["dense"]["ndcg@10"], abs=1e-5)
    assert got["map_at_10"] == pytest.approx(ours["dense"]["map@10"], abs=1e-5)
