"""JSON encoding of the server's largest answers: the standard library (today) against
orjson, for ``/v1/embeddings`` and for ``/encode`` with all three outputs.

    python benchmarks/json_encoding.py [--texts 32] [--tokens 64,512] [--repeats 20]

Bodies are built as the handlers build them (``server/service.py``: ``ndarray.tolist()``
rows of 1,024 floats; ColBERT rows one per token; lexical weights as ``{id: weight}``),
from random unit vectors (encoding cost does not depend on the model). Three encoders:

- ``stdlib``: ``json.dumps(..., ensure_ascii=False, allow_nan=False, separators=(",", ":"))``,
  what ``server.app.dumps`` does today (Starlette's JSONResponse does the same);
- ``orjson``: ``orjson.dumps`` of the same Python lists (the one-line switch in ``dumps``);
- ``orjson-numpy``: ``orjson.dumps(OPT_SERIALIZE_NUMPY)`` of the float32 arrays themselves,
  with no ``tolist()`` (a bigger change: the handlers would keep arrays in the answer;
  float32 is then written in its shortest form, so the bytes differ but every number
  parses back to the same float32).

Each timing includes ``tolist()`` where the encoder needs it, so the columns compare what
a request costs. Every encoder's output is parsed back and checked against the arrays.
Prints the median milliseconds per body and its size; ``--json`` writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

HIDDEN = 1024


def _unit(rng: np.random.Generator, *shape: int) -> np.ndarray:
    x = rng.standard_normal((*shape, HIDDEN)).astype(np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def workloads(texts: int, tokens: list[int], seed: int = 0) -> dict[str, dict[str, Any]]:
    """name -> {"arrays": what the model gave, "lists": the body as the handlers build it,
    "numpy": the same body holding arrays}."""
    rng = np.random.default_rng(seed)
    out: dict[str, dict[str, Any]] = {}
    dense = _unit(rng, texts)

    def embeddings(vectors: Any) -> dict[str, Any]:
        return {
            "object": "list",
            "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)],
            "model": "BAAI/bge-m3",
            "usage": {"prompt_tokens": 20 * texts, "total_tokens": 20 * texts},
        }

    out[f"/v1/embeddings {texts} texts"] = {
        "arrays": dense,
        "lists": lambda: embeddings([v.tolist() for v in dense]),
        "numpy": lambda: embeddings(list(dense)),
    }
    for n in tokens:
        colbert = [_unit(rng, n - 1) for _ in range(texts)]
        ids = [rng.choice(250_000, size=min(n, 200), replace=False) for _ in range(texts)]
        lexical = [{str(int(i)): float(w) for i, w in zip(row, rng.random(len(row)), strict=True)} for row in ids]

        def encode(
            as_list: bool, colbert: list[np.ndarray] = colbert, lexical: list = lexical, n: int = n
        ) -> dict[str, Any]:
            rows = [
                {
                    "dense": dense[i].tolist() if as_list else dense[i],
                    "sparse": lexical[i],
                    "colbert": colbert[i].tolist() if as_list else colbert[i],
                }
                for i in range(texts)
            ]
            return {"results": rows, "usage": {"tokens": n * texts}}

        out[f"/encode all outputs {texts} texts x {n} tokens"] = {
            "arrays": (dense, colbert),
            "lists": lambda encode=encode: encode(True),
            "numpy": lambda encode=encode: encode(False),
        }
    return out


def encoders() -> dict[str, tuple[str, Callable[[Any], bytes]]]:
    def stdlib(body: Any) -> bytes:
        return json.dumps(body, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")

    out: dict[str, tuple[str, Callable[[Any], bytes]]] = {"stdlib": ("lists", stdlib)}
    try:
        import orjson
    except ImportError:
        print("orjson is not installed: pip install orjson (timing the standard library only)")
        return out
    out["orjson"] = ("lists", orjson.dumps)
    out["orjson-numpy"] = ("numpy", lambda body: orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY))
    return out


def check(name: str, data: bytes, arrays: Any) -> None:
    """The body parses back to the model's float32 numbers."""
    body = json.loads(data)
    if name.startswith("/v1/embeddings"):
        got = np.array([d["embedding"] for d in body["data"]], dtype=np.float32)
        assert np.array_equal(got, arrays), name
        return
    dense, colbert = arrays
    assert np.array_equal(np.array([r["dense"] for r in body["results"]], dtype=np.float32), dense), name
    for row, vecs in zip(body["results"], colbert, strict=True):
        assert np.array_equal(np.array(row["colbert"], dtype=np.float32), vecs), name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--texts", type=int, default=32, help="texts per request")
    parser.add_argument("--tokens", default="64,512", help="ColBERT rows per text, comma-separated")
    parser.add_argument("--repeats", type=int, default=20, help="timed encodings per body and encoder")
    parser.add_argument("--json", default=None, help="write the results to this file")
    args = parser.parse_args()
    results: list[dict[str, Any]] = []
    for name, work in workloads(args.texts, [int(x) for x in args.tokens.split(",")]).items():
        print(name)
        base = None
        for label, (kind, dumps) in encoders().items():
            build = work[kind]
            data = dumps(build())
            check(name, data, work["arrays"])
            seconds = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                dumps(build())
                seconds.append(time.perf_counter() - start)
            ms = statistics.median(seconds) * 1000
            base = base or ms
            print(f"  {label:13} {ms:9.2f} ms  {len(data) / 1e6:7.2f} MB  {base / ms:5.2f}x stdlib's speed")
            results.append({"body": name, "encoder": label, "median_ms": ms, "bytes": len(data)})
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
