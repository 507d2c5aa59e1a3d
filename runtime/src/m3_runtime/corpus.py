"""Embedding whole corpora on Ray Data: Parquet/JSONL in, Parquet out, resumable.

``m3 embed-corpus PACKAGE INPUT OUTPUT`` (extra ``m3-runtime[ray]``). Each input file
becomes one output file, ``OUTPUT/<relative path, '/' -> '__'>.parquet``, written
under a temporary name and renamed when complete: a rerun skips inputs whose output
exists and redoes the rest, and a partial file is never taken for a complete one.
Rows go through ``map_batches`` on a pool of actors, each holding one loaded
``M3Model`` that batches by length under its token budget; the same code runs on a
laptop (``--ray-address local``) and on a cluster (``--ray-address auto``).

Output columns: the id column, ``tokens`` (int32), and as asked ``dense``
(fixed-size float32 list), ``sparse_indices``/``sparse_values`` (int32/float32
lists, ready for Qdrant/Milvus/Vespa sparse vectors), ``colbert`` (list of
fixed-size float32 or float16 vectors).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .contract import Variant
from .errors import M3Error, RunError

OUTPUT_KINDS = ("dense", "sparse", "colbert")
INPUT_SUFFIXES = (".parquet", ".jsonl", ".json")
ROW = "__m3_row"
FILE = "__m3_file"
# With a colbert column, files are written in row groups of at most this many bytes of
# it, so a reader (m3 eval --embedded) holds one group at a time, and the list columns
# without dictionary encoding: on float16 ColBERT rows it saved 7% of the size but made
# reading 3x slower (300 rows of 200 x 1,024: 1.85 s against 0.63 s, pyarrow 26, this
# 2-vCPU EPYC, other jobs running).
COLBERT_ROW_GROUP_BYTES = 1 << 26


def parquet_options(table: Any) -> dict[str, Any]:
    """``pq.write_table`` keywords for an output table (see ``COLBERT_ROW_GROUP_BYTES``)."""
    import pyarrow as pa

    if "colbert" not in table.column_names or table.num_rows == 0:
        return {}
    per_row = table["colbert"].nbytes / table.num_rows
    return {
        "row_group_size": max(1, int(COLBERT_ROW_GROUP_BYTES // max(per_row, 1))),
        # the flat columns (id, tokens) as pyarrow's default; list columns plain
        "use_dictionary": [f.name for f in table.schema if not pa.types.is_nested(f.type)],
    }


class CorpusError(M3Error, ValueError):
    """Bad corpus input: unreadable file, missing column, bad text (file and row named)."""


@dataclass(frozen=True)
class CorpusJob:
    package: str
    variant: Variant | None = None  # None: the one this machine's providers run best (int8 on a CPU)
    text_column: str = "text"
    id_column: str = "id"
    outputs: tuple[str, ...] = ("dense", "sparse")
    max_length: int | None = None
    colbert_dtype: str = "float32"
    on_bad_text: str = "skip"  # or "fail"
    workers: int = 1
    batch_rows: int = 256
    batch_tokens: int | None = None  # padded-token budget of each actor's batches; None: M3Model's


@dataclass
class Summary:
    files_done: int = 0
    files_skipped: int = 0
    rows: int = 0
    bad_rows: int = 0
    tokens: int = 0
    seconds: float = 0.0
    per_file: list[dict[str, Any]] = field(default_factory=list)


def resolve(location: str | Path) -> tuple[Any, str]:
    """(pyarrow filesystem, path in it) for a local path or a URI (file://, s3://, gs://, ...)."""
    from pyarrow import fs

    text = str(location)
    if "://" in text:
        try:
            return fs.FileSystem.from_uri(text)
        except Exception as exc:
            raise CorpusError(f"cannot open {text}: {exc}") from None
    return fs.LocalFileSystem(), str(Path(text).expanduser().resolve())


def _exists(filesystem: Any, path: str) -> bool:
    from pyarrow import fs

    return filesystem.get_file_info(path).type != fs.FileType.NotFound


def list_inputs(filesystem: Any, root: str) -> list[str]:
    from pyarrow import fs

    info = filesystem.get_file_info(root)
    if info.type == fs.FileType.File:
        return [root]
    if info.type != fs.FileType.Directory:
        raise CorpusError(f"input {root} does not exist")
    found = filesystem.get_file_info(fs.FileSelector(root, recursive=True))
    files = sorted(
        f.path
        for f in found
        if f.type == fs.FileType.File
        and f.extension in {s[1:] for s in INPUT_SUFFIXES}
        and not f.base_name.startswith(".")
    )
    if not files:
        raise CorpusError(f"input {root} holds no {', '.join(INPUT_SUFFIXES)} files")
    return files


def output_path(out_dir: str, inp: str, root: str, root_is_file: bool) -> str:
    rel = inp.rsplit("/", 1)[-1] if root_is_file else inp[len(root.rstrip("/")) + 1 :]
    return f"{out_dir.rstrip('/')}/" + rel.replace("/", "__").rsplit(".", 1)[0] + ".parquet"


def read_table(filesystem: Any, path: str, job: CorpusJob):
    """The input rows with a row-number column; bad texts skipped (counted) or refused by file and row."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.json as pj
    import pyarrow.parquet as pq

    try:
        if path.endswith(".parquet"):
            table = pq.read_table(path, filesystem=filesystem)
        else:
            with filesystem.open_input_stream(path) as stream:
                table = pj.read_json(stream)
    except Exception as exc:
        raise CorpusError(f"cannot read {path}: {exc}") from None
    for col in (job.text_column, job.id_column):
        if col not in table.column_names:
            raise CorpusError(f"{path} has no column {col!r} (columns: {', '.join(table.column_names)})")
    table = table.select([job.id_column, job.text_column]).append_column(
        ROW, pa.array(range(table.num_rows), pa.int64())
    )
    texts = table[job.text_column]
    bad = (
        pc.invert(pc.is_valid(texts))
        if pa.types.is_string(texts.type) or pa.types.is_large_string(texts.type)
        else None
    )
    if bad is None:
        raise CorpusError(f"{path}: column {job.text_column!r} is {texts.type}, not text")
    n_bad = int(pc.sum(bad).as_py() or 0)
    if n_bad and job.on_bad_text == "fail":
        first = int(pc.index(bad, True).as_py())
        raise CorpusError(
            f"{path} row {first}: {job.text_column!r} is null ({n_bad} such rows; --on-bad-text skip skips them)"
        )
    return table.filter(pc.invert(bad)), n_bad


class Embedder:
    """A Ray actor: one loaded model, called with pyarrow batches."""

    def __init__(self, job: CorpusJob, threads: int) -> None:
        from .model import M3Model

        self.job = job
        # The actor's CPUs as that many concurrent one-thread forward passes over one
        # session (one copy of the weights): a corpus is many batches, and concurrent
        # one-thread runs beat one multi-thread run on them (docs/benchmarks.md).
        self.model = M3Model(
            job.package,
            variant=job.variant,
            intra_op_threads=1,
            workers=threads,
            max_batch_tokens=job.batch_tokens,
        )
        self.max_length = job.max_length or self.model.passage_max_length

    def __call__(self, batch):
        import numpy as np
        import pyarrow as pa

        job = self.job
        texts = batch[job.text_column].to_pylist()
        out = self.model.embed(
            texts,
            max_length=self.max_length,
            dense="dense" in job.outputs,
            sparse="sparse" in job.outputs,
            colbert="colbert" in job.outputs,
        )
        hidden = self.model.hidden_size
        cols: dict[str, Any] = {
            job.id_column: batch[job.id_column],
            ROW: batch[ROW],
            FILE: batch[FILE],
            "tokens": pa.array(out.tokens, pa.int32()),
        }
        if out.dense is not None:
            cols["dense"] = pa.FixedSizeListArray.from_arrays(pa.array(out.dense.reshape(-1), pa.float32()), hidden)
        if out.lexical is not None:
            cols["sparse_indices"] = pa.array([[int(k) for k in w] for w in out.lexical], pa.list_(pa.int32()))
            cols["sparse_values"] = pa.array([list(w.values()) for w in out.lexical], pa.list_(pa.float32()))
        if out.colbert is not None:
            dtype = np.float16 if job.colbert_dtype == "float16" else np.float32
            arrow_type = pa.float16() if dtype == np.float16 else pa.float32()
            flat = np.concatenate([v.astype(dtype).reshape(-1) for v in out.colbert]) if texts else np.zeros(0, dtype)
            rows = pa.FixedSizeListArray.from_arrays(pa.array(flat, arrow_type), hidden)
            offsets = np.concatenate([[0], np.cumsum([len(v) for v in out.colbert])]).astype(np.int32)
            cols["colbert"] = pa.ListArray.from_arrays(pa.array(offsets), rows)
        return pa.table(cols)


def _threads_per_actor(workers: int) -> int:
    import ray

    cpus = int(ray.cluster_resources().get("CPU", os.cpu_count() or 1))
    return max(1, cpus // max(1, workers))


def embed_corpus(
    job: CorpusJob,
    inp: str | Path,
    out: str | Path,
    *,
    say: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True),
) -> Summary:
    """Embed every input file not yet done; returns counts. Ray must be initialised."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    import ray
    import ray.data
    from pyarrow import fs

    bad_outputs = [o for o in job.outputs if o not in OUTPUT_KINDS]
    if bad_outputs or not job.outputs:
        raise CorpusError(f"--outputs must name some of {', '.join(OUTPUT_KINDS)}, got {list(job.outputs)}")
    in_fs, in_root = resolve(inp)
    out_fs, out_root = resolve(out)
    files = list_inputs(in_fs, in_root)
    root_is_file = files == [in_root]
    out_fs.create_dir(out_root, recursive=True)
    for stale in out_fs.get_file_info(fs.FileSelector(out_root)):  # left by a killed run
        if stale.base_name.startswith(".") and ".partial-" in stale.base_name:
            out_fs.delete_file(stale.path)
    ray.data.DataContext.get_current().enable_progress_bars = False
    summary = Summary()
    threads = _threads_per_actor(job.workers)
    start_all = time.perf_counter()
    pending: list[tuple[str, str, Any, int]] = []  # (input, output, rows, bad rows)
    for path in files:
        target = output_path(out_root, path, in_root, root_is_file)
        if _exists(out_fs, target):
            summary.files_skipped += 1
            say(f"skip {path} (done: {target})")
            continue
        table, n_bad = read_table(in_fs, path, job)
        pending.append(
            (path, target, table.append_column(FILE, pa.array([len(pending)] * table.num_rows, pa.int32())), n_bad)
        )

    def write(k: int, parts: list) -> None:
        path, target, table, n_bad = pending[k]
        result = (pa.concat_tables(parts) if parts else table.drop_columns([job.text_column])).sort_by(ROW)
        ids_in, ids_out = table[job.id_column].to_pylist(), result[job.id_column].to_pylist()
        if ids_in != ids_out:
            raise RunError(f"{path}: {len(ids_in)} ids in, {len(ids_out)} out, or out of order; not written")
        result = result.drop_columns([ROW, FILE])
        head, name = target.rsplit("/", 1)
        partial = f"{head}/.{name}.partial-{os.getpid()}"
        pq.write_table(result, partial, filesystem=out_fs, **parquet_options(result))
        out_fs.move(partial, target)  # the final name appears only once the file is whole
        tokens = int(sum(result["tokens"].to_pylist())) if "tokens" in result.column_names else 0
        seconds = time.perf_counter() - start_all
        summary.files_done += 1
        summary.rows += result.num_rows
        summary.bad_rows += n_bad
        summary.tokens += tokens
        summary.per_file.append({"file": str(path), "rows": result.num_rows, "bad_rows": n_bad})
        say(
            f"done {path}: {result.num_rows} rows ({n_bad} bad skipped); so far {summary.rows} rows, {summary.tokens} "
            f"tokens in {seconds:.1f} s = {summary.rows / max(seconds, 1e-9):.1f} rows/s, "
            f"{summary.tokens / max(seconds, 1e-9):.0f} tokens/s"
        )

    # One pipeline over every pending file, so the actors (and their loaded models)
    # live for the whole run; a file is written as soon as all its rows are back.
    blocks = [t.slice(i, job.batch_rows) for _, _, t, _ in pending for i in range(0, t.num_rows, job.batch_rows)]
    remaining = {k: t.num_rows for k, (_, _, t, _) in enumerate(pending)}
    parts: dict[int, list] = {k: [] for k in remaining}
    for k in [k for k, n in remaining.items() if n == 0]:
        write(k, [])
        del remaining[k]
    if blocks:
        ds = ray.data.from_arrow(blocks).map_batches(
            Embedder,
            fn_constructor_kwargs={"job": job, "threads": threads},
            # ``compute`` works on every Ray since 2.9; ``concurrency`` is deprecated from 2.51.
            compute=ray.data.ActorPoolStrategy(size=job.workers),
            batch_size=job.batch_rows,
            batch_format="pyarrow",
            num_cpus=threads,
        )
        batch: Any
        seen_rows = seen_tokens = 0
        last_report = time.perf_counter()
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            seen_rows += batch.num_rows
            seen_tokens += int(pc.sum(batch["tokens"]).as_py() or 0)
            now = time.perf_counter()
            if now - last_report >= 10:  # progress while it runs, not only per finished file
                elapsed = now - start_all
                say(
                    f"progress: {seen_rows} rows, {seen_rows / elapsed:.1f} rows/s, {seen_tokens / elapsed:.0f} tokens/s"
                )
                last_report = now
            for k in sorted(set(batch[FILE].to_pylist())):
                part = batch.filter(pc.equal(batch[FILE], k))
                parts[k].append(part)
                remaining[k] -= part.num_rows
                if remaining[k] == 0:
                    write(k, parts.pop(k))
                    del remaining[k]
    if remaining:
        raise RunError(f"rows missing for {[str(pending[k][0]) for k in remaining]}; those files were not written")
    summary.seconds = time.perf_counter() - start_all
    say(
        f"summary: {summary.files_done} files embedded, {summary.files_skipped} already done, {summary.rows} rows, "
        f"{summary.bad_rows} bad rows skipped, {summary.tokens} tokens in {summary.seconds:.1f} s"
    )
    return summary


def init_ray(address: str, workers: int) -> None:
    import ray

    if ray.is_initialized():
        return
    if address == "local":
        ray.init(num_cpus=max(workers, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False)
    else:
        ray.init(address=address, log_to_driver=False)


def parse_outputs(value: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in value.split(",") if x.strip())


__all__: Sequence[str] = ("CorpusError", "CorpusJob", "embed_corpus", "init_ray", "list_inputs", "output_path")
