"""embed-corpus on a real local Ray instance (2 CPUs) with the tiny checkpoint."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from m3_runtime import M3Model

ray = pytest.importorskip("ray")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from m3_runtime.corpus import CorpusError, CorpusJob, embed_corpus, init_ray  # noqa: E402


@pytest.fixture(scope="module")
def local_ray():
    init_ray("local", 2)
    yield
    ray.shutdown()


def _texts(n: int, seed: int = 0) -> list[str]:
    from m3_exporter.texts import english_paragraphs

    paragraphs = english_paragraphs(240)
    rng = np.random.default_rng(seed)
    return [paragraphs[int(i)][: int(rng.integers(10, 400))] for i in rng.integers(0, 240, n)]


@pytest.fixture()
def corpus(tmp_path) -> tuple[Path, dict[int, str]]:
    root = tmp_path / "in"
    (root / "shard").mkdir(parents=True)
    texts = _texts(70)
    pq.write_table(pa.table({"id": list(range(30)), "text": texts[:30]}), root / "a.parquet")
    pq.write_table(pa.table({"id": list(range(30, 50)), "text": [*texts[30:49], None]}), root / "shard" / "b.parquet")
    with (root / "c.jsonl").open("w") as fh:
        for i in range(50, 70):
            fh.write(json.dumps({"id": i, "text": texts[i], "extra": "ignored"}) + "\n")
    valid = {i: t for i, t in enumerate(texts) if i != 49}
    return root, valid


def _read_all(out: Path) -> pa.Table:
    return pa.concat_tables([pq.read_table(p) for p in sorted(out.glob("*.parquet"))])


@pytest.mark.exporter  # its texts: m3_exporter.texts
def test_outputs_equal_direct_encode(local_ray, package_dir, corpus, tmp_path):
    root, valid = corpus
    job = CorpusJob(package=str(package_dir), outputs=("dense", "sparse", "colbert"), workers=2, batch_rows=8)
    summary = embed_corpus(job, root, tmp_path / "out", say=lambda _m: None)
    assert (summary.files_done, summary.rows, summary.bad_rows) == (3, 69, 1)
    table = _read_all(tmp_path / "out")
    ids = table["id"].to_pylist()
    assert sorted(ids) == sorted(valid) and len(ids) == len(set(ids))
    model = M3Model(package_dir)
    want = model.encode([valid[i] for i in ids], return_sparse=True, return_colbert_vecs=True)
    dense = np.array(table["dense"].to_pylist(), dtype=np.float32)
    np.testing.assert_allclose(dense, want["dense_vecs"], atol=1e-5)
    for k, (idx, vals, colbert) in enumerate(
        zip(
            table["sparse_indices"].to_pylist(),
            table["sparse_values"].to_pylist(),
            table["colbert"].to_pylist(),
            strict=True,
        )
    ):
        weights = want["lexical_weights"][k]
        assert idx == [int(t) for t in weights]
        np.testing.assert_allclose(vals, list(weights.values()), atol=1e-5)
        np.testing.assert_allclose(np.array(colbert), want["colbert_vecs"][k], atol=1e-5)
    assert table["tokens"].to_pylist() == [len(x) for x in model.tokenizer.encode([valid[i] for i in ids], 8192)]

    again = embed_corpus(job, root, tmp_path / "out", say=lambda _m: None)
    assert (again.files_done, again.files_skipped) == (0, 3)


@pytest.mark.exporter  # its texts: m3_exporter.texts
def test_bad_text_can_fail_the_run_naming_file_and_row(local_ray, package_dir, corpus, tmp_path):
    root, _ = corpus
    job = CorpusJob(package=str(package_dir), on_bad_text="fail")
    with pytest.raises(CorpusError, match=r"b\.parquet row 19: 'text' is null"):
        embed_corpus(job, root / "shard", tmp_path / "out", say=lambda _m: None)


def test_missing_column_names_file_and_columns(local_ray, package_dir, tmp_path):
    pq.write_table(pa.table({"id": [1], "body": ["x"]}), tmp_path / "x.parquet")
    with pytest.raises(CorpusError, match=r"x\.parquet has no column 'text' \(columns: id, body\)"):
        embed_corpus(CorpusJob(package=str(package_dir)), tmp_path / "x.parquet", tmp_path / "out", say=lambda _m: None)


@pytest.mark.exporter  # its texts: m3_exporter.texts
def test_killed_run_resumes_without_loss_or_duplicates(package_dir, tmp_path):
    root = tmp_path / "in"
    root.mkdir()
    texts = _texts(120, seed=1)
    for f in range(6):
        rows = range(f * 20, f * 20 + 20)
        pq.write_table(pa.table({"id": list(rows), "text": [texts[i] for i in rows]}), root / f"part-{f}.parquet")
    out = tmp_path / "out"
    cmd = [
        str(Path(sys.executable).parent / "m3"),
        "embed-corpus",
        str(package_dir),
        str(root),
        str(out),
        "--batch-rows",
        "4",
    ]
    first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while not list(out.glob("*.parquet")) and time.monotonic() < deadline and first.poll() is None:
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=60)
    done_before = len(list(out.glob("*.parquet")))
    assert 1 <= done_before < 6, "the kill should land mid-run"
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr
    assert f"{done_before} already done" in second.stderr
    ids = _read_all(out)["id"].to_pylist()
    assert sorted(ids) == list(range(120)) and len(ids) == len(set(ids))
    assert not list(out.glob(".*partial*"))


@pytest.mark.exporter  # its texts: m3_exporter.texts
def test_uris_go_through_pyarrow_filesystems(local_ray, package_dir, corpus, tmp_path):
    """INPUT and OUTPUT as URIs (file:// here; s3:// and others use the same pyarrow code path)."""
    root, valid = corpus
    job = CorpusJob(package=str(package_dir), outputs=("dense",))
    out = tmp_path / "uri-out"
    summary = embed_corpus(job, root.as_uri(), out.as_uri(), say=lambda _m: None)
    assert summary.files_done == 3
    table = _read_all(out)
    ids = table["id"].to_pylist()
    assert sorted(ids) == sorted(valid)
    want = M3Model(package_dir).encode([valid[i] for i in ids])["dense_vecs"]
    np.testing.assert_allclose(np.array(table["dense"].to_pylist(), dtype=np.float32), want, atol=1e-5)
    assert sorted(p.name for p in out.iterdir()) == ["a.parquet", "c.parquet", "shard__b.parquet"]
    assert embed_corpus(job, root.as_uri(), out.as_uri(), say=lambda _m: None).files_skipped == 3
