"""Ray's overhead at one machine: ``embed-corpus`` against a plain single-process loop.

    python benchmarks/corpus_overhead.py PACKAGE [--variant int8] [--files 3] [--rows 20]

Writes ``--files`` Parquet files of ``--rows`` real English paragraphs each, then, in
one run: (1) a plain loop (read each file, ``M3Model.encode``, write Parquet) and
(2) ``embed_corpus`` with one actor on a local Ray; all three outputs both times.
Prints rows/s of each and the overhead, with and without Ray's start-up.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("package", type=Path)
    parser.add_argument("--variant", default=None)
    parser.add_argument("--files", type=int, default=3)
    parser.add_argument("--rows", type=int, default=20)
    parser.add_argument("--json", type=Path, default=Path(__file__).resolve().parent / "corpus_results.json")
    args = parser.parse_args()

    import pyarrow as pa
    import pyarrow.parquet as pq
    from m3_exporter.texts import english_paragraphs
    from m3_runtime import M3Model
    from m3_runtime.corpus import CorpusJob, embed_corpus, init_ray

    paragraphs = english_paragraphs(240)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "in"
        root.mkdir()
        for f in range(args.files):
            rows = range(f * args.rows, (f + 1) * args.rows)
            texts = [" ".join([paragraphs[i % 240]] * 3) for i in rows]  # passage-sized
            pq.write_table(pa.table({"id": list(rows), "text": texts}), root / f"part-{f}.parquet")
        n_rows = args.files * args.rows

        model = M3Model(args.package, variant=args.variant)
        model.encode(["warm-up"], return_sparse=True, return_colbert_vecs=True)
        start = time.perf_counter()
        for path in sorted(root.glob("*.parquet")):
            table = pq.read_table(path)
            out = model.encode(table["text"].to_pylist(), return_sparse=True, return_colbert_vecs=True)
            pq.write_table(
                pa.table(
                    {
                        "id": table["id"],
                        "dense": out["dense_vecs"].tolist(),
                        "colbert": [v.tolist() for v in out["colbert_vecs"]],
                    }
                ),
                Path(tmp) / f"plain-{path.name}",
            )
        plain = time.perf_counter() - start
        variant = model.variant
        del model

        start = time.perf_counter()
        init_ray("local", 1)
        ray_start = time.perf_counter() - start
        job = CorpusJob(
            package=str(args.package.resolve()), outputs=("dense", "sparse", "colbert"), workers=1, batch_rows=8
        )
        start = time.perf_counter()
        embed_corpus(job, root, Path(tmp) / "out", say=lambda _m: None)
        ray_run = time.perf_counter() - start

    result = {
        "variant": variant,
        "rows": n_rows,
        "plain_rows_per_s": n_rows / plain,
        "ray_rows_per_s": n_rows / ray_run,
        "ray_start_s": ray_start,
        "overhead": ray_run / plain - 1,
        "overhead_with_start": (ray_run + ray_start) / plain - 1,
    }
    print(
        f"{n_rows} rows ({variant}): plain loop {result['plain_rows_per_s']:.2f} rows/s, embed-corpus "
        f"{result['ray_rows_per_s']:.2f} rows/s: overhead {result['overhead']:+.1%} "
        f"({result['overhead_with_start']:+.1%} counting Ray's {ray_start:.1f} s start-up)"
    )
    args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
