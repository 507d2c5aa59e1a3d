"""Write the reranker's parity contract: FlagEmbedding's FlagReranker on the tiny reranker.

The runtime's reranker tests compare against the files this writes to
tests/golden/reranker/. It runs the reference itself, FlagEmbedding 1.4.2's
``FlagReranker(path, use_fp16=False, devices="cpu")`` (an alias of
``inference/reranker/encoder_only/base.py:BaseReranker``), on models/tiny-reranker/,
in the same environment as the embedder's goldens (scripts/make_goldens.py):

    python -m venv .venv-flag
    .venv-flag/bin/pip install torch==2.13.0
    .venv-flag/bin/pip install FlagEmbedding==1.4.2 transformers==4.57.6
    .venv-flag/bin/python scripts/make_reranker_goldens.py

Each *call* is one ``FlagReranker(...)`` construction (``init``: instructions, their
formats, constructor defaults) and one ``compute_score(...)`` on a list of pairs
(``kwargs``: exactly what was passed). ``resolved`` gives the settings that call ran
with after FlagReranker's defaults (``batch_size`` 128, ``max_length`` 512,
``query_max_length`` ``max_length * 3 // 4``, ``normalize`` False), so a test can
replay it without knowing them.

The token ids are those FlagReranker itself builds: its module-level
``prepare_for_model_compat`` is wrapped to record each pair's ``input_ids`` (in input
order), and the model's forward is wrapped to check that the rows it was fed, padding
removed, are exactly those (no ``token_type_ids``, right padding with ``<pad>``).

Outputs (tests/golden/reranker/):
- ``pairs.json``: the pairs and every call's settings;
- ``reference.json``: versions, and per call the returned scores (raw logits or
  sigmoids, as the call's ``normalize`` says), the token ids of every pair and, for
  calls with an instruction, the instruction-applied pairs that were tokenized.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from importlib.metadata import version
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT = ROOT / "models" / "tiny-reranker"
OUT = ROOT / "tests" / "golden" / "reranker"
LINES = (ROOT / "models" / "source" / "multilingual.txt").read_text(encoding="utf-8").splitlines()

# Token counts of the tiny tokenizer (no special tokens), checked in check_lengths():
PASSAGE_512 = " ".join(LINES[:20])  # 666: cut at max_length 512, whole at 1024
PASSAGE_1024 = " ".join(LINES[:50])  # 1671: cut at 512 and at 1024
QUERY_LONG = " ".join(LINES[70:85])  # over query_max_length 384 (max_length 512), under 768
QUERY_VERY_LONG = " ".join(LINES[30:55])  # over query_max_length 768 (max_length 1024)

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
    ("what is panda?", "hi"),
    ("what is panda?", "The giant panda is a bear species endemic to China."),
    ("什么是大熊猫？", "大熊猫是一种生活在中国山区的熊科动物，主要以竹子为食。"),
    ("什么是大熊猫？", "敏捷的棕色狐狸跳过了懒狗。"),
    ("狐はどこ？", "素早い茶色の狐はのろまな犬を飛び越える。"),
    ("여우", "빠른 갈색 여우가 게으른 개를 뛰어넘는다."),
    ("лиса", "Быстрая коричневая лиса прыгает через ленивую собаку."),
    ("الثعلب", "الثعلب البني السريع يقفز فوق الكلب الكسول."),
    ("השועל", "השועל החום המהיר קופץ מעל הכלב העצלן."),
    ("लोमड़ी", "तेज़ भूरी लोमड़ी आलसी कुत्ते के ऊपर कूदती है।"),
    ("จิ้งจอก", "จิ้งจอกสีน้ำตาลตัวเร็วกระโดดข้ามสุนัขขี้เกียจ"),
    ("αλεπού", "Η γρήγορη καφέ αλεπού πηδάει πάνω από τον τεμπέλη σκύλο."),
    ("con cáo", "Con cáo nâu nhanh nhẹn nhảy qua con chó lười biếng."),
    ("Fuchs", "Der schnelle braune Fuchs springt über den faulen Hund."),
    ("capital of France", "Paris est la capitale de la France et sa plus grande ville."),
    ("zorro marrón", "El rápido zorro marrón salta sobre el perro perezoso."),
    ("Paris", "Mixed: Paris 巴黎 Париж باريس パリ 파리"),
    ("", "BGE M3 is an embedding model."),
    ("What is BGE M3?", ""),
    ("", ""),
    ("whitespace", "   \t\n  "),
    ("😀", "I love this 😍 so much!!! 🎉🎉"),
    ("👩‍💻 🇫🇷", "😀 😂 ❤️ 👍 🎉 🚀 🔥 🌍 👩‍💻 🇫🇷"),
    (
        "python encode function",
        "def encode(texts: list[str], batch_size: int = 32) -> dict:\n    return {'dense_vecs': model(texts)[0]}",
    ),
    ("top documents by score", "SELECT id, title FROM documents WHERE score > 0.5 ORDER BY score DESC LIMIT 10;"),
    (
        "html link",
        '<html><body><p class="intro">Hello <b>world</b>!</p><a href="https://example.com/a?b=c&d=e">link</a></body></html>',
    ),
    ("prices", "Prices: $19.99, €5,50, £100, ¥1000, ₹250, 100%."),
    ("numbers", "0 1 2 3 42 3.14159 2.71828 1,000,000 -17 +3.5e-7 8192"),
    ("ＦＵＬＬＷＩＤＴＨ", "ＦＵＬＬＷＩＤＴＨ ｔｅｘｔ ① ﬁ ligature Ⅻ"),
    ("Unknown chars: ꙮ 𓀀", "Unknown chars: ꙮ 𓀀 ☃ ᚠ"),
    ("repeat", "repeat repeat repeat repeat repeat the the the the"),
    ("The quick brown fox jumps over the lazy dog.", "The quick brown fox jumps over the lazy dog."),
    ("a", "a"),
    ("dense retrieval", PASSAGE_512),
    ("sparse retrieval", PASSAGE_1024),
    (QUERY_LONG, "Dense retrieval maps the text into a single embedding vector."),
    (QUERY_LONG, PASSAGE_512),
    (QUERY_VERY_LONG, PASSAGE_1024),
    (QUERY_VERY_LONG, ""),
    ("multi-line\nquery\twith tabs", "line one\nline two\n\nline four"),
]
ALL = list(range(len(PAIRS)))
SHORT = [i for i, (q, p) in enumerate(PAIRS) if len(q) + len(p) < 400]  # for the settings that only need short pairs

Q_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query. "
P_INSTRUCTION = "Passage: "


def calls(edge_max_length: int) -> list[dict[str, Any]]:
    """Every (FlagReranker init, compute_score kwargs, pair indices) the goldens record."""
    both = {"query_instruction_for_rerank": Q_INSTRUCTION, "passage_instruction_for_rerank": P_INSTRUCTION}
    return [
        {"name": "default", "init": {}, "kwargs": {}, "pairs": ALL},
        {"name": "default_normalize", "init": {}, "kwargs": {"normalize": True}, "pairs": ALL},
        {"name": "max_length_1024", "init": {}, "kwargs": {"max_length": 1024}, "pairs": ALL},
        {
            "name": "max_length_1024_normalize",
            "init": {},
            "kwargs": {"max_length": 1024, "normalize": True},
            "pairs": ALL,
        },
        # Same pairs, other batch compositions: scores equal "default" within float noise.
        {"name": "batch_size_4", "init": {}, "kwargs": {"batch_size": 4}, "pairs": ALL},
        {"name": "batch_size_1", "init": {}, "kwargs": {"batch_size": 1}, "pairs": SHORT[:8]},
        # compute_score((q, p)) with one pair, not in a list: 1.4 returns a one-element list.
        {"name": "single_pair", "init": {}, "kwargs": {}, "pairs": [0], "single": True},
        # Short max_length: most pairs are cut; query_max_length 24 = 32 * 3 // 4.
        {"name": "max_length_32", "init": {}, "kwargs": {"max_length": 32}, "pairs": ALL},
        {
            "name": "max_length_32_query_12",
            "init": {},
            "kwargs": {"max_length": 32, "query_max_length": 12},
            "pairs": ALL,
        },
        # query_max_length above max_length - 4: when the passage cannot absorb the cut
        # (its length <= tokens to remove) nothing is cut and the pair exceeds max_length.
        # edge_max_length = len(query of PAIRS[0]) + 4, so that pair's passage has exactly
        # the length to remove and is kept whole.
        {
            "name": "query_fills_max_length",
            "init": {},
            "kwargs": {"max_length": edge_max_length, "query_max_length": 1000},
            "pairs": ALL,
        },
        # Constructor defaults instead of call arguments.
        {
            "name": "init_settings",
            "init": {"max_length": 64, "query_max_length": 16, "normalize": True, "batch_size": 8},
            "kwargs": {},
            "pairs": ALL,
        },
        {
            "name": "query_instruction",
            "init": {"query_instruction_for_rerank": Q_INSTRUCTION},
            "kwargs": {},
            "pairs": ALL,
        },
        {
            "name": "passage_instruction",
            "init": {"passage_instruction_for_rerank": P_INSTRUCTION},
            "kwargs": {"normalize": True},
            "pairs": ALL,
        },
        {"name": "both_instructions", "init": both, "kwargs": {}, "pairs": ALL},
        {"name": "both_instructions_normalize", "init": both, "kwargs": {"normalize": True}, "pairs": ALL},
        # query_max_length 60: the instruction (~40 tokens) takes most of it, the query is cut.
        {"name": "both_instructions_max_length_80", "init": both, "kwargs": {"max_length": 80}, "pairs": ALL},
        # Custom formats; a literal backslash-n in a format is turned into a newline.
        {
            "name": "instruction_formats",
            "init": {
                **both,
                "query_instruction_format": "<instruct>{}\\n<query>{}",
                "passage_instruction_format": "{}| {}",
            },
            "kwargs": {},
            "pairs": ALL,
        },
    ]


def check_lengths(tok: Any) -> int:
    """Fail loudly if the long texts no longer exercise the truncation they are there for."""

    def n(text: str) -> int:
        return len(tok(text, add_special_tokens=False)["input_ids"])

    wanted = {
        "PASSAGE_512": (n(PASSAGE_512), 512, 1024 - 20),
        "PASSAGE_1024": (n(PASSAGE_1024), 1024, 10**9),
        "QUERY_LONG": (n(QUERY_LONG), 384, 768),
        "QUERY_VERY_LONG": (n(QUERY_VERY_LONG), 768, 1000),
    }
    for name, (count, low, high) in wanted.items():
        if not low < count < high:
            raise SystemExit(f"{name} has {count} tokens, wanted between {low} and {high}")
    print("long texts (tokens):", {k: v[0] for k, v in wanted.items()})
    return n(PAIRS[0][0]) + 4


def main() -> None:
    import numpy as np
    import torch
    from FlagEmbedding import FlagReranker
    from FlagEmbedding.inference.reranker.encoder_only import base

    torch.manual_seed(0)
    recorded: list[list[int]] = []
    fed: list[list[int]] = []
    original_prepare = base.prepare_for_model_compat

    def recording_prepare(*args: Any, **kwargs: Any) -> Any:
        item = original_prepare(*args, **kwargs)
        recorded.append(list(item["input_ids"]))
        return item

    base.prepare_for_model_compat = recording_prepare

    def load(init: dict[str, Any]) -> Any:
        reranker = FlagReranker(str(CHECKPOINT), use_fp16=False, devices="cpu", **init)
        model_forward = reranker.model.forward

        def recording_forward(*args: Any, **kwargs: Any) -> Any:
            if args or set(kwargs) != {"input_ids", "attention_mask", "return_dict"}:
                raise SystemExit(f"unexpected model inputs: {len(args)} positional, {sorted(kwargs)}")
            pad = reranker.tokenizer.pad_token_id
            for ids, mask in zip(kwargs["input_ids"].tolist(), kwargs["attention_mask"].tolist(), strict=True):
                n = sum(mask)
                if mask != [1] * n + [0] * (len(mask) - n) or ids[n:] != [pad] * (len(ids) - n):
                    raise SystemExit(f"not right-padded with {pad}: {ids} {mask}")
                fed.append(ids[:n])
            return model_forward(*args, **kwargs)

        reranker.model.forward = recording_forward
        return reranker

    edge_max_length = check_lengths(load({}).tokenizer)
    plan = calls(edge_max_length)
    results: dict[str, Any] = {}
    for call in plan:
        reranker = load(call["init"])
        pairs = [PAIRS[i] for i in call["pairs"]]
        recorded.clear()
        fed.clear()
        arg = pairs[0] if call.get("single") else pairs
        scores = reranker.compute_score(arg, **call["kwargs"])
        if not isinstance(scores, list) or len(scores) != len(pairs):
            raise SystemExit(f"{call['name']}: compute_score returned {type(scores).__name__} {scores!r}")
        # FlagReranker runs its first (longest) batch once more to probe the batch size,
        # so the model sees every pair once plus that batch.
        batch_size = call["kwargs"].get("batch_size", call["init"].get("batch_size", 128))
        # (Which of several equally long pairs fall into that batch is up to np.argsort.)
        extra = Counter(map(tuple, fed)) - Counter(map(tuple, recorded))
        longest = sorted(map(len, recorded), reverse=True)[: min(len(pairs), batch_size)]
        if Counter(map(tuple, recorded)) - Counter(map(tuple, fed)) or sorted(map(len, extra.elements())) != sorted(
            longest
        ):
            raise SystemExit(f"{call['name']}: the model was fed other rows than prepare_for_model_compat built")
        max_length = call["kwargs"].get("max_length", call["init"].get("max_length", 512))
        query_max_length = call["kwargs"].get("query_max_length", call["init"].get("query_max_length"))
        call["resolved"] = {
            "batch_size": batch_size,
            "max_length": max_length,
            "query_max_length": max_length * 3 // 4 if query_max_length is None else query_max_length,
            "normalize": call["kwargs"].get("normalize", call["init"].get("normalize", False)),
            "query_instruction_for_rerank": reranker.query_instruction_for_rerank,
            "query_instruction_format": reranker.query_instruction_format,
            "passage_instruction_for_rerank": reranker.passage_instruction_for_rerank,
            "passage_instruction_format": reranker.passage_instruction_format,
        }
        results[call["name"]] = {"scores": [float(s) for s in scores], "input_ids": list(recorded)}
        if reranker.query_instruction_for_rerank is not None or reranker.passage_instruction_for_rerank is not None:
            results[call["name"]]["detailed_pairs"] = reranker.get_detailed_inputs([list(p) for p in pairs])
        lengths = [len(ids) for ids in recorded]
        over = sum(length > max_length for length in lengths)
        print(
            f"{call['name']:32s} {len(pairs):2d} pairs, tokens {min(lengths)}..{max(lengths)}"
            f"{f' ({over} over max_length)' if over else ''}; scores {min(scores):.4f}..{max(scores):.4f}"
        )
        del reranker

    reference = {
        "versions": {p: version(p) for p in ("FlagEmbedding", "transformers", "torch", "tokenizers", "numpy")},
        "python": sys.version.split()[0],
        "calls": results,
    }
    # The sigmoid FlagReranker applies (float64 numpy on the float32 logit) is checked here
    # on the calls that differ only by normalize, so the goldens cannot disagree with it.
    for raw, norm in (("default", "default_normalize"), ("both_instructions", "both_instructions_normalize")):
        expected = [float(1 / (1 + np.exp(-x))) for x in results[raw]["scores"]]
        if max(abs(a - b) for a, b in zip(expected, results[norm]["scores"], strict=True)) > 1e-7:
            raise SystemExit(f"{norm} is not the sigmoid of {raw}")

    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "pairs.json").write_text(
        json.dumps({"checkpoint": "models/tiny-reranker", "pairs": PAIRS, "calls": plan}, ensure_ascii=False, indent=1),
        encoding="utf-8",
    )
    (OUT / "reference.json").write_text(json.dumps(reference, ensure_ascii=False), encoding="utf-8")
    print(f"wrote {OUT}: {len(PAIRS)} pairs, {len(plan)} calls")


if __name__ == "__main__":
    main()
