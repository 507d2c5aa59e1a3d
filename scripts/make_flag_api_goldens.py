"""Write the drop-in contract: FlagEmbedding's README calls and constructor arguments.

Runs ``BGEM3FlagModel`` (on models/tiny-m3) and ``FlagReranker`` (on
models/tiny-reranker) exactly as the BGE-M3 and bge-reranker READMEs call them, then
once per row of a table of constructor arguments, and stores what each call returned
(values and result types) in tests/golden/flag_api.json. tests/test_flag_api.py makes
the same calls on ``M3Model`` / ``M3Reranker`` with the fp32 variant and compares.
Run it in the goldens' environment (docs/architecture.md):

    .venv-flag/bin/python scripts/make_flag_api_goldens.py

On a machine without CUDA FlagEmbedding runs fp32 whatever ``use_fp16`` says, so the
numbers are fp32 ones.
"""

from __future__ import annotations

import inspect
import json
import sys
from collections.abc import Mapping
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "golden" / "flag_api.json"

# The BGE-M3 README's texts.
SENTENCES_1 = ["What is BGE M3?", "Defination of BM25"]
SENTENCES_2 = [
    "BGE M3 is an embedding model supporting dense retrieval, lexical matching and multi-vector interaction.",
    "BM25 is a bag-of-words retrieval function that ranks a set of documents based on the query terms appearing in each document",
]
# The bge-reranker README's pairs.
RERANK_PAIRS = [
    ["what is panda?", "hi"],
    [
        "what is panda?",
        "The giant panda (Ailuropoda melanoleuca), sometimes called a panda bear or simply panda, "
        "is a bear species endemic to China.",
    ],
]

# Each row: the constructor's keyword arguments; the same calls follow every row. Rows but
# the first three say use_fp16=False: BGEM3FlagModel's default use_fp16=True loads the
# weights as float16 even on the CPU (where it then computes in float32), which moves
# the outputs by up to 1e-3, too much to see what the other arguments do.
EMBEDDER_ARGS: list[dict[str, Any]] = [
    {},
    {"use_fp16": False, "devices": "cpu"},
    {"use_fp16": True, "devices": ["cpu"]},
    {"use_fp16": False, "return_sparse": True, "return_colbert_vecs": True},
    {"use_fp16": False, "return_dense": False, "return_sparse": True},
    {"use_fp16": False, "query_instruction_for_retrieval": "Represent this query: "},
    {
        "use_fp16": False,
        "query_instruction_for_retrieval": "Find the passage",
        "query_instruction_format": "<instruct>{}\\n<query>{}",
    },
    {"use_fp16": False, "truncate_dim": 8, "return_colbert_vecs": True},
    {"use_fp16": False, "batch_size": 1, "query_max_length": 6, "passage_max_length": 10, "return_sparse": True},
    {
        "use_fp16": False,
        "normalize_embeddings": True,
        "pooling_method": "cls",
        "colbert_dim": -1,
        "trust_remote_code": False,
        "cache_dir": None,
        "use_bf16": False,
    },
]
RERANKER_ARGS: list[dict[str, Any]] = [
    {},
    {"use_fp16": True},
    {"use_fp16": False, "devices": "cpu", "trust_remote_code": False, "cache_dir": None},
    {"query_instruction_for_rerank": "A: ", "passage_instruction_for_rerank": "B: "},
    {
        "query_instruction_for_rerank": "Q",
        "query_instruction_format": "{}\\n{}",
        "passage_instruction_for_rerank": "P",
        "passage_instruction_format": "<{}>{}",
    },
    {"max_length": 24, "query_max_length": 8, "batch_size": 1},
    {"normalize": True},
]


def kind(value: Any) -> str:
    """A result's type, the same words for FlagEmbedding's and the runtime's results:
    ``ndarray[float32](2, 64)``, ``list[dict]``, ``float``, ``None``."""
    if value is None:
        return "None"
    if isinstance(value, np.ndarray):
        return f"ndarray[{value.dtype}]{tuple(value.shape)}"
    if isinstance(value, Mapping):
        return "dict"
    if isinstance(value, (list, tuple)):
        return f"list[{kind(value[0]) if value else ''}]"
    if isinstance(value, (float, np.floating)) or type(value).__name__ == "Tensor":
        return "float"
    return type(value).__name__


def plain(value: Any) -> Any:
    """JSON form of a result: arrays as lists, dicts with float values."""
    if value is None:
        return None
    if isinstance(value, np.ndarray):
        return value.astype(np.float64).tolist()
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return float(value)


def record(value: Any) -> dict[str, Any]:
    if isinstance(value, Mapping) and "dense_vecs" in value:  # encode's dict: each output with its type
        return {k: {"kind": kind(v), "value": plain(v)} for k, v in value.items()}
    return {"kind": kind(value), "value": plain(value)}


def embedder_readme(model: Any) -> dict[str, Any]:
    """The BGE-M3 README's calls, in its order."""
    out: dict[str, Any] = {}
    embeddings_1 = model.encode(SENTENCES_1, batch_size=12, max_length=8192)["dense_vecs"]
    embeddings_2 = model.encode(SENTENCES_2)["dense_vecs"]
    out["similarity"] = record(embeddings_1 @ embeddings_2.T)
    output_1 = model.encode(SENTENCES_1, return_dense=True, return_sparse=True, return_colbert_vecs=False)
    output_2 = model.encode(SENTENCES_2, return_dense=True, return_sparse=True, return_colbert_vecs=False)
    out["convert_id_to_token"] = record(model.convert_id_to_token(output_1["lexical_weights"]))
    out["lexical_scores_0"] = record(
        model.compute_lexical_matching_score(output_1["lexical_weights"][0], output_2["lexical_weights"][0])
    )
    out["lexical_scores_1"] = record(
        model.compute_lexical_matching_score(output_1["lexical_weights"][0], output_1["lexical_weights"][1])
    )
    output_1 = model.encode(SENTENCES_1, return_dense=True, return_sparse=True, return_colbert_vecs=True)
    output_2 = model.encode(SENTENCES_2, return_dense=True, return_sparse=True, return_colbert_vecs=True)
    out["encode_all"] = record(output_1)
    out["colbert_score_0"] = record(model.colbert_score(output_1["colbert_vecs"][0], output_2["colbert_vecs"][0]))
    out["colbert_score_1"] = record(model.colbert_score(output_1["colbert_vecs"][0], output_2["colbert_vecs"][1]))
    sentence_pairs = [[i, j] for i in SENTENCES_1 for j in SENTENCES_2]
    out["compute_score"] = record(
        model.compute_score(sentence_pairs, max_passage_length=128, weights_for_different_modes=[0.4, 0.2, 0.4])
    )
    return out


def embedder_calls(model: Any) -> dict[str, Any]:
    """What every constructor row is asked: the three encoders with their defaults, one text and a list."""
    return {
        "encode": record(model.encode(SENTENCES_2)),
        "encode_one": record(model.encode(SENTENCES_1[0])),
        "encode_queries": record(model.encode_queries(SENTENCES_1)),
        "encode_corpus": record(model.encode_corpus(SENTENCES_2)),
    }


def reranker_readme(reranker: Any) -> dict[str, Any]:
    """The bge-reranker README's calls."""
    return {
        "score": record(reranker.compute_score(["query", "passage"])),
        "score_normalized": record(reranker.compute_score(["query", "passage"], normalize=True)),
        "scores": record(reranker.compute_score(RERANK_PAIRS)),
        "scores_normalized": record(reranker.compute_score(RERANK_PAIRS, normalize=True)),
    }


def reranker_calls(reranker: Any) -> dict[str, Any]:
    return {
        "pairs": record(reranker.compute_score(RERANK_PAIRS)),
        "one": record(reranker.compute_score(RERANK_PAIRS[1])),
    }


def main() -> None:
    import torch
    from FlagEmbedding import BGEM3FlagModel, FlagReranker

    torch.manual_seed(0)
    embedder_dir, reranker_dir = str(ROOT / "models" / "tiny-m3"), str(ROOT / "models" / "tiny-reranker")

    def arguments(cls: Any) -> list[str]:  # the constructor's named arguments
        params = inspect.signature(cls.__init__).parameters.values()
        return [p.name for p in params if p.name not in ("self", "model_name_or_path") and p.kind != p.VAR_KEYWORD]

    golden: dict[str, Any] = {
        "versions": {p: version(p) for p in ("FlagEmbedding", "transformers", "torch", "tokenizers")},
        "arguments": {"BGEM3FlagModel": arguments(BGEM3FlagModel), "FlagReranker": arguments(FlagReranker)},
        "python": sys.version.split()[0],
        "embedder_readme": embedder_readme(BGEM3FlagModel(embedder_dir, use_fp16=True)),
        # The same calls without the float16 weight rounding of use_fp16=True, for exact comparisons.
        "embedder_readme_fp32": embedder_readme(BGEM3FlagModel(embedder_dir, use_fp16=False)),
        "reranker_readme": reranker_readme(FlagReranker(reranker_dir, use_fp16=True)),
        "embedder_args": [
            {"args": args, "calls": embedder_calls(BGEM3FlagModel(embedder_dir, **args))} for args in EMBEDDER_ARGS
        ],
        "reranker_args": [
            {"args": args, "calls": reranker_calls(FlagReranker(reranker_dir, **args))} for args in RERANKER_ARGS
        ],
    }
    OUT.write_text(json.dumps(golden, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {OUT}: {len(EMBEDDER_ARGS)} embedder and {len(RERANKER_ARGS)} reranker constructor rows")


if __name__ == "__main__":
    main()
