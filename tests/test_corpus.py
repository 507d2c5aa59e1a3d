"""embed-corpus on a real local Ray instance (2 CPUs) with the tiny checkpoint."""

from __future__ import annotations

import json
import os
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


def _parts(tmp_path: Path, files: int, seed: int) -> tuple[Path, list[str]]:
    """``files`` Parquet inputs of 20 rows each under ``tmp_path/in`` (ids 0, 1, ...): (folder, texts)."""
    root = tmp_path / "in"
    root.mkdir()
    texts = _texts(20 * files, seed=seed)
    for f in range(files):
        rows = range(f * 20, f * 20 + 20)
        pq.write_table(pa.table({"id": list(rows), "text": [texts[i] for i in rows]}), root / f"part-{f:02}.parquet")
    return root, texts


@pytest.mark.exporter  # its texts: m3_exporter.texts
def test_killed_run_resumes_without_loss_or_duplicates(package_dir, tmp_path):
    root, _ = _parts(tmp_path, 6, seed=1)
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


def _descendants(pid: int) -> dict[int, str]:
    """Processes under ``pid`` (Linux /proc): pid -> command line."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    found, frontier = {}, [pid]
    while frontier:
        parent = frontier.pop()
        for child, ppid in parents.items():
            if ppid == parent and child not in found:
                try:
                    found[child] = (Path("/proc") / str(child) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                except OSError:
                    continue
                frontier.append(child)
    return found


@pytest.mark.exporter  # its texts: m3_exporter.texts
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the actor's process in /proc")
def test_one_actor_killed_mid_run_then_a_rerun_completes_every_id_once(package_dir, tmp_path):
    """One of two Ray actors SIGKILLed while the run is under way: Ray replaces it and the
    run completes, or the run fails with a message; either way a rerun leaves every id
    exactly once, with the model's numbers."""
    root, texts = _parts(tmp_path, 12, seed=2)
    out = tmp_path / "out"
    cmd = [str(Path(sys.executable).parent / "m3"), "embed-corpus", str(package_dir), str(root), str(out)]
    cmd += ["--workers", "2", "--batch-rows", "2"]
    first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    killed, done_at_kill = None, 0
    deadline = time.monotonic() + 180
    while killed is None and time.monotonic() < deadline and first.poll() is None:
        done_at_kill = len(list(out.glob("*.parquet")))
        if done_at_kill:
            actors = [p for p, line in _descendants(first.pid).items() if "MapWorker" in line]
            if actors:
                killed = actors[0]
                os.kill(killed, signal.SIGKILL)
        time.sleep(0.02)
    _, err = first.communicate(timeout=300)
    assert killed is not None, f"no actor found to kill (rc {first.returncode}): {err[-2000:]}"
    assert 1 <= done_at_kill < 12, "the kill should land mid-run"
    model = M3Model(package_dir)

    def check_complete() -> None:
        table = _read_all(out)
        ids = table["id"].to_pylist()
        assert sorted(ids) == list(range(240)) and len(ids) == len(set(ids))
        assert not list(out.glob(".*partial*"))
        want = model.encode([texts[i] for i in ids])["dense_vecs"]
        np.testing.assert_allclose(np.array(table["dense"].to_pylist(), dtype=np.float32), want, atol=1e-5)

    if first.returncode == 0:  # Ray replaced the actor (what Ray 2.60 does here): already whole
        check_complete()
    else:  # failed: it must say so, not end silently short
        assert "Error" in err, err[-2000:]
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr
    check_complete()


def test_variant_flag_embeds_with_that_variant(local_ray, package_dir, golden, tmp_path):
    """`m3 embed-corpus --variant fp32` embeds with fp32: its dense rows are FlagEmbedding's
    (the goldens); the default on a CPU (int8) is not, at that tolerance, so the flag took effect."""
    from m3_runtime.cli import main

    src = tmp_path / "in.jsonl"
    with src.open("w", encoding="utf-8") as fh:
        for i, text in enumerate(golden["texts"]):
            fh.write(json.dumps({"id": i, "text": text}, ensure_ascii=False) + "\n")
    argv = [str(package_dir), str(src)]
    assert main(["embed-corpus", *argv, str(tmp_path / "fp32"), "--variant", "fp32", "--outputs", "dense"]) == 0
    assert main(["embed-corpus", *argv, str(tmp_path / "default"), "--outputs", "dense"]) == 0
    fp32 = pq.read_table(tmp_path / "fp32" / "in.parquet")
    assert fp32["id"].to_pylist() == list(range(len(golden["texts"])))
    np.testing.assert_allclose(
        np.array(fp32["dense"].to_pylist(), np.float32), golden["arrays"]["dense"], rtol=1e-5, atol=1e-5
    )
    default = np.array(pq.read_table(tmp_path / "default" / "in.parquet")["dense"].to_pylist(), np.float32)
    assert M3Model(package_dir).variant != "fp32"
    assert not np.allclose(default, golden["arrays"]["dense"], rtol=1e-5, atol=1e-5)
    with pytest.raises(SystemExit):
        main(["embed-corpus", *argv, str(tmp_path / "x"), "--variant", "int4"])
