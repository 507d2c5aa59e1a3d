"""Write the parity contract: FlagEmbedding's outputs on the tiny checkpoint.

The runtime's parity tests compare against the files this writes to tests/golden/.
It runs the reference itself, ``FlagEmbedding.BGEM3FlagModel(..., use_fp16=False)`` on
the CPU, so it needs FlagEmbedding 1.4 and transformers<5, which is why it lives in its
own environment and is not part of the test run:

    python -m venv .venv-flag
    .venv-flag/bin/pip install torch==2.13.0
    .venv-flag/bin/pip install FlagEmbedding==1.4.2 transformers==4.57.6
    .venv-flag/bin/python scripts/make_goldens.py

Outputs (tests/golden/):
- ``texts.json``: the texts, the scoring pairs and the call arguments used;
- ``reference.json``: token ids, lexical weights, tokens of lexical weights, scores;
- ``reference.npz``: dense vectors and ColBERT vectors (float32).
"""

from __future__ import annotations

import json
import sys
from importlib.metadata import version
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT = ROOT / "models" / "tiny-m3"
OUT = ROOT / "tests" / "golden"


def long_text() -> str:
    """A text well over 8192 tokens of the tiny tokenizer, so truncation is exercised."""
    lines = (ROOT / "models" / "source" / "multilingual.txt").read_text(encoding="utf-8").splitlines()
    return " ".join(lines * 12)


TEXTS: list[str] = [
    "What is BGE M3?",
    "Defination of BM25",
    "BGE M3 is an embedding model supporting dense retrieval, lexical matching and multi-vector interaction.",
    "BM25 is a bag-of-words retrieval function that ranks a set of documents based on the query terms appearing in each document",
    "The quick brown fox jumps over the lazy dog.",
    "Der schnelle braune Fuchs springt über den faulen Hund.",
    "Le renard brun rapide saute par-dessus le chien paresseux.",
    "El rápido zorro marrón salta sobre el perro perezoso.",
    "Быстрая коричневая лиса прыгает через ленивую собаку.",
    "الثعلب البني السريع يقفز فوق الكلب الكسول.",
    "השועל החום המהיר קופץ מעל הכלב העצלן.",
    "तेज़ भूरी लोमड़ी आलसी कुत्ते के ऊपर कूदती है।",
    "จิ้งจอกสีน้ำตาลตัวเร็วกระโดดข้ามสุนัขขี้เกียจ",
    "敏捷的棕色狐狸跳过了懒狗。",
    "什么是大熊猫？",
    "大熊猫是一种生活在中国山区的熊科动物，主要以竹子为食。",
    "素早い茶色の狐はのろまな犬を飛び越える。",
    "빠른 갈색 여우가 게으른 개를 뛰어넘는다.",
    "Η γρήγορη καφέ αλεπού πηδάει πάνω από τον τεμπέλη σκύλο.",
    "Con cáo nâu nhanh nhẹn nhảy qua con chó lười biếng.",
    "😀 😂 ❤️ 👍 🎉 🚀 🔥 🌍 👩‍💻 🇫🇷",
    "I love this 😍 so much!!! 🎉🎉",
    "",
    " ",
    "   \t\n  ",
    '<html><body><p class="intro">Hello <b>world</b>!</p><a href="https://example.com/a?b=c&d=e">link</a></body></html>',
    "def encode(texts: list[str], batch_size: int = 32) -> dict:\n    return {'dense_vecs': model(texts)[0]}",
    "SELECT id, title FROM documents WHERE score > 0.5 ORDER BY score DESC LIMIT 10;",
    "0 1 2 3 42 3.14159 2.71828 1,000,000 -17 +3.5e-7 8192",
    "Prices: $19.99, €5,50, £100, ¥1000, ₹250, 100%.",
    "ＦＵＬＬＷＩＤＴＨ ｔｅｘｔ ① ﬁ ligature Ⅻ",  # exercises nmt_nfkc normalisation
    "Mixed: Paris 巴黎 Париж باريس パリ 파리",
    "a",
    "repeat repeat repeat repeat repeat the the the the",
    "Unknown chars: ꙮ 𓀀 ☃ ᚠ",
    long_text(),
]

PAIRS: list[tuple[str, str]] = [
    (
        "What is BGE M3?",
        "BGE M3 is an embedding model supporting dense retrieval, lexical matching and multi-vector interaction.",
    ),
    (
        "What is BGE M3?",
        "BM25 is a bag-of-words retrieval function that ranks a set of documents based on the query terms appearing in each document",
    ),
    (
        "Defination of BM25",
        "BGE M3 is an embedding model supporting dense retrieval, lexical matching and multi-vector interaction.",
    ),
    (
        "Defination of BM25",
        "BM25 is a bag-of-words retrieval function that ranks a set of documents based on the query terms appearing in each document",
    ),
    ("什么是大熊猫？", "大熊猫是一种生活在中国山区的熊科动物，主要以竹子为食。"),
    ("fox", "Der schnelle braune Fuchs springt über den faulen Hund."),
    ("lazy dog", "The quick brown fox jumps over the lazy dog."),
    ("", "a"),
    ("capital of France", "Paris est la capitale de la France et sa plus grande ville."),
    ("😀", "I love this 😍 so much!!! 🎉🎉"),
    ("query about a long text", long_text()),
]

ENCODE_ARGS = {"batch_size": 4, "max_length": 8192}
SHORT_ARGS = {"batch_size": 8, "max_length": 16}
SCORE_ARGS = {"batch_size": 4, "max_query_length": 12, "max_passage_length": 8192}
WEIGHTS = [0.4, 0.2, 0.4]


def main() -> None:
    import torch
    from FlagEmbedding import BGEM3FlagModel

    torch.manual_seed(0)
    model = BGEM3FlagModel(str(CHECKPOINT), use_fp16=False, devices="cpu")
    tok = model.tokenizer

    full = model.encode(TEXTS, return_dense=True, return_sparse=True, return_colbert_vecs=True, **ENCODE_ARGS)
    short = model.encode(TEXTS, return_dense=True, return_sparse=True, return_colbert_vecs=True, **SHORT_ARGS)
    single = model.encode(TEXTS[0], return_dense=True, return_sparse=True, return_colbert_vecs=True, **ENCODE_ARGS)
    scores = model.compute_score(PAIRS, **SCORE_ARGS)
    scores_weighted = model.compute_score(PAIRS, weights_for_different_modes=WEIGHTS, **SCORE_ARGS)

    n_q = 4
    colbert_scores = [
        [float(model.colbert_score(full["colbert_vecs"][i], full["colbert_vecs"][j])) for j in range(len(TEXTS))]
        for i in range(n_q)
    ]
    lexical_matrix = model.compute_lexical_matching_score(full["lexical_weights"][:n_q], full["lexical_weights"])
    lexical_pair = model.compute_lexical_matching_score(full["lexical_weights"][0], full["lexical_weights"][2])

    def weights_json(items: list[dict]) -> list[dict[str, float]]:
        return [{k: float(v) for k, v in item.items()} for item in items]

    reference = {
        "versions": {p: version(p) for p in ("FlagEmbedding", "transformers", "torch", "tokenizers")},
        "python": sys.version.split()[0],
        "input_ids": [tok(t, truncation=True, max_length=ENCODE_ARGS["max_length"])["input_ids"] for t in TEXTS],
        "input_ids_short": [tok(t, truncation=True, max_length=SHORT_ARGS["max_length"])["input_ids"] for t in TEXTS],
        "lexical_weights": weights_json(full["lexical_weights"]),
        "lexical_weights_short": weights_json(short["lexical_weights"]),
        "lexical_tokens": [
            {k: float(v) for k, v in model.convert_id_to_token(item).items()} for item in full["lexical_weights"]
        ],
        "single_lexical_weights": {k: float(v) for k, v in single["lexical_weights"].items()},
        "compute_score": {k: [float(x) for x in v] for k, v in scores.items()},
        "compute_score_weighted": {k: [float(x) for x in v] for k, v in scores_weighted.items()},
        "colbert_score": colbert_scores,
        "lexical_matrix": np.asarray(lexical_matrix, dtype=np.float64).tolist(),
        "lexical_pair": float(lexical_pair),
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "texts.json").write_text(
        json.dumps(
            {
                "texts": TEXTS,
                "pairs": PAIRS,
                "encode_args": ENCODE_ARGS,
                "short_args": SHORT_ARGS,
                "score_args": SCORE_ARGS,
                "weights": WEIGHTS,
                "n_queries": n_q,
            },
            ensure_ascii=False,
            indent=1,
        ),
        encoding="utf-8",
    )
    (OUT / "reference.json").write_text(json.dumps(reference, ensure_ascii=False), encoding="utf-8")
    arrays: dict[str, np.ndarray] = {
        "dense": np.asarray(full["dense_vecs"], dtype=np.float32),
        "dense_short": np.asarray(short["dense_vecs"], dtype=np.float32),
        "single_dense": np.asarray(single["dense_vecs"], dtype=np.float32),
        "single_colbert": np.asarray(single["colbert_vecs"], dtype=np.float32),
    }
    for i, vecs in enumerate(full["colbert_vecs"]):
        arrays[f"colbert_{i}"] = np.asarray(vecs, dtype=np.float32)
    for i, vecs in enumerate(short["colbert_vecs"]):
        arrays[f"colbert_short_{i}"] = np.asarray(vecs, dtype=np.float32)
    np.savez_compressed(OUT / "reference.npz", **arrays)
    lengths = [len(ids) for ids in reference["input_ids"]]
    print(f"wrote {OUT}: {len(TEXTS)} texts (token lengths {min(lengths)}..{max(lengths)}), {len(PAIRS)} pairs")


if __name__ == "__main__":
    main()
