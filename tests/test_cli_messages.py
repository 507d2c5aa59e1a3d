"""The CLI speaks CLI: its messages name the flag or subcommand to use, '-' reads standard
input for every text list, and ``m3 info`` shows a reranker's metrics."""

from __future__ import annotations

import io
import json
import re
import sys
from pathlib import Path

import pytest
from m3_runtime.cli import main

from tests.conftest import ROOT


def _run(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_a_package_of_the_other_kind_gets_the_command_to_use(capsys, package_dir: Path, reranker_dir: Path) -> None:
    rc, _, err = _run(capsys, "encode", reranker_dir, "hi")
    assert rc == 2 and f"use m3 rerank {reranker_dir} QUERY PASSAGE" in err and "M3Reranker" not in err
    rc, _, err = _run(capsys, "score", reranker_dir, "q", "p")
    assert rc == 2 and "use m3 rerank" in err
    rc, _, err = _run(capsys, "serve", reranker_dir)
    assert rc == 2 and f"pass it with --reranker {reranker_dir}" in err and "M3Model" not in err
    rc, _, err = _run(capsys, "rerank", package_dir, "q", "p")
    assert rc == 2 and "use m3 encode or m3 score" in err and "M3Model" not in err
    rc, _, err = _run(capsys, "serve", "--reranker", package_dir)
    assert rc == 2 and "pass it as PACKAGE, without --reranker" in err


def test_dash_reads_passages_from_standard_input(capsys, monkeypatch, package_dir: Path, reranker_dir: Path) -> None:
    from m3_runtime import M3Model, M3Reranker

    passages = ["first passage", "the second one", "-"]  # a literal "-" line is a passage like any other
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(p + "\n" for p in passages)))
    rc, out, err = _run(capsys, "rerank", reranker_dir, "query", "-", "--variant", "fp32")
    assert rc == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    expected = M3Reranker(reranker_dir, variant="fp32").compute_score([("query", p) for p in passages])
    assert sorted(r["index"] for r in rows) == [0, 1, 2]
    for r in rows:
        assert r["passage"] == passages[r["index"]]
        assert r["score"] == pytest.approx(expected[r["index"]], abs=1e-6)

    monkeypatch.setattr(sys, "stdin", io.StringIO("alpha\nbeta\n"))
    rc, out, err = _run(capsys, "score", package_dir, "query", "-", "--variant", "fp32")
    assert rc == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["passage"] for r in rows] == ["alpha", "beta"]
    dense = M3Model(package_dir, variant="fp32").compute_score([("query", "alpha"), ("query", "beta")])["dense"]
    assert [r["dense"] for r in rows] == pytest.approx(dense, abs=1e-6)


@pytest.mark.parametrize("command", ["encode", "score", "rerank"])
def test_dash_among_other_texts_is_refused(capsys, command: str, package_dir: Path, reranker_dir: Path) -> None:
    pkg = reranker_dir if command == "rerank" else package_dir
    argv = [command, pkg, *(["q"] if command != "encode" else []), "a", "-"]
    rc, out, err = _run(capsys, *argv)
    assert rc == 2 and out == ""
    assert "'-' reads the" in err and "give it alone" in err


def test_info_on_a_reranker_shows_its_metrics(capsys, reranker_dir: Path) -> None:
    rc, out, err = _run(capsys, "info", reranker_dir)
    assert rc == 0, err
    manifest = json.loads((reranker_dir / "manifest.json").read_text(encoding="utf-8"))
    lines = [line for line in out.splitlines() if "vs PyTorch:" in line]
    assert len(lines) == len(manifest["variants"])
    for line, info in zip(lines, manifest["variants"].values(), strict=True):
        shown = dict(re.findall(r"(\w+) (-?[\d.e+-]+)", line.split("vs PyTorch:")[1]))
        assert float(shown["scores_max_abs"]) == pytest.approx(info["validation"]["scores_max_abs"], rel=1e-2)
        assert "scores_spearman" in shown and "scores_top1_agreement" in shown


def test_rerank_names_the_passage_that_is_not_a_str(reranker_dir: Path) -> None:
    from m3_runtime import M3Reranker
    from m3_runtime.errors import InputError, InputTypeError

    reranker = M3Reranker(reranker_dir, variant="fp32")
    with pytest.raises(InputTypeError, match=r"^passages\[1\] is NoneType, expected str$"):
        reranker.rerank("q", ["fine", None])  # type: ignore[list-item]
    with pytest.raises(InputError, match=r"passages\[0\] is not valid Unicode"):
        reranker.rerank("q", ["\ud800"])
    with pytest.raises(InputError, match=r"query is not valid Unicode"):
        reranker.rerank("\ud800", ["p"])


@pytest.mark.exporter
def test_export_of_a_mistyped_local_folder_does_not_try_the_hub(capsys, monkeypatch, tmp_path: Path) -> None:
    import huggingface_hub
    from m3_exporter.cli import main as export_main

    def no_hub(*_a, **_k):
        raise AssertionError("the hub was tried")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_hub)
    monkeypatch.chdir(ROOT)
    assert export_main(["models/tiny-m4", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "models/tiny-m4: no such folder (models/ exists but has no tiny-m4; did you mean models/tiny-m3" in err
    assert "the hub is not tried" in err


@pytest.mark.exporter
def test_export_help_points_smoothquant_to_its_page(capsys) -> None:
    from m3_exporter.cli import build_parser

    text = " ".join(build_parser().format_help().split())
    smooth = text[text.index("--int8-smooth ALPHA SmoothQuant") :][:200]
    assert "see docs/exporting.md" in smooth and "README" not in smooth
