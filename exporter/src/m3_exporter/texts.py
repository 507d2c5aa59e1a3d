"""Built-in multilingual texts (embedders) and (query, passage) pairs (rerankers) on which
every exported variant is validated, and real English text for int8 fidelity."""

from __future__ import annotations

import math
import re
from collections import Counter

# ~600 tokens with the XLM-R tokenizer: past the 512 at which validation truncates.
LONG_TEXT = " ".join(
    [
        "Multilingual retrieval needs long passages too.",
        "Die Suche über viele Sprachen braucht auch lange Texte.",
        "多语言检索也需要长文本。",
        "Поиск на многих языках требует длинных текстов.",
    ]
    * 12
)

VALIDATION_TEXTS: tuple[str, ...] = (
    "What is BGE M3?",
    "BGE M3 is an embedding model supporting dense retrieval, lexical matching and multi-vector interaction.",
    "Definition of BM25",
    "BM25 is a bag-of-words retrieval function that ranks a set of documents based on the query terms appearing in each document.",
    "Der schnelle braune Fuchs springt über den faulen Hund.",
    "La bibliothèque ouvre à neuf heures du matin et ferme à six heures du soir.",
    "Los investigadores midieron la velocidad del nuevo motor en tres máquinas distintas.",
    "Москва является столицей России и крупнейшим городом страны.",
    "القاهرة هي عاصمة مصر وأكبر مدنها.",
    "ירושלים היא עיר עתיקה עם היסטוריה ארוכה.",
    "नई दिल्ली भारत की राजधानी है।",
    "กรุงเทพมหานครเป็นเมืองหลวงของประเทศไทย",
    "北京是中华人民共和国的首都，也是全国的政治和文化中心。",
    "東京は日本の首都であり、最大の都市です。",
    "서울은 대한민국의 수도이자 가장 큰 도시입니다.",
    "Hà Nội là thủ đô của Việt Nam.",
    "😀 🚀 🔥 👩‍💻 🇯🇵",
    "",
    "<p>Hello <b>world</b></p>",
    "def f(x: int) -> int:\n    return x * 2",
    "3.14159 2.71828 1,000,000 -17",
    LONG_TEXT,
)

# Reranker validation: (query, passage) pairs, grouped by query (consecutive pairs with one
# query are that query's candidates, so the ranking metrics compare orders within it):
# several languages and scripts, cross-lingual pairs, code, markup, emoji, an empty
# passage, an empty query, and a passage cut at the validation length (512 tokens).
RERANK_PAIRS: tuple[tuple[str, str], ...] = (
    (
        "What is BGE M3?",
        "BGE M3 is an embedding model supporting dense retrieval, lexical matching and multi-vector interaction.",
    ),
    (
        "What is BGE M3?",
        "BM25 is a bag-of-words retrieval function that ranks a set of documents based on the query terms "
        "appearing in each document.",
    ),
    ("What is BGE M3?", ""),
    ("What is BGE M3?", LONG_TEXT),
    ("什么是大熊猫？", "大熊猫是一种生活在中国山区的熊科动物，主要以竹子为食。"),
    ("什么是大熊猫？", "The giant panda is a bear native to the mountains of central China; it eats bamboo."),
    ("什么是大熊猫？", "東京は日本の首都であり、最大の都市です。"),
    ("Столица Франции", "Paris est la capitale de la France et sa plus grande ville."),
    ("Столица Франции", "Москва является столицей России и крупнейшим городом страны."),
    ("Столица Франции", "القاهرة هي عاصمة مصر وأكبر مدنها."),
    ("¿Cómo se ordena una lista en Python?", "sorted(xs) returns a new list; xs.sort() sorts the list in place."),
    ("¿Cómo se ordena una lista en Python?", "def f(x: int) -> int:\n    return x * 2"),
    ("¿Cómo se ordena una lista en Python?", "Los investigadores midieron la velocidad del nuevo motor."),
    ("서울의 인구는 얼마입니까?", "서울은 대한민국의 수도이자 가장 큰 도시이며 약 천만 명이 산다."),
    ("서울의 인구는 얼마입니까?", "नई दिल्ली भारत की राजधानी है।"),
    ("서울의 인구는 얼마입니까?", "กรุงเทพมหานครเป็นเมืองหลวงของประเทศไทย"),
    ("서울의 인구는 얼마입니까?", "😀 🚀 🔥 👩‍💻 🇯🇵 <p>Hello <b>world</b></p>"),
    ("", "Hà Nội là thủ đô của Việt Nam."),
)


def english_paragraphs(n: int = 240, *, min_words: int = 30, max_words: int = 120) -> list[str]:
    """``n`` real English paragraphs, offline on every Python: the language reference topics
    shipped with the standard library (``pydoc_data.topics``), prose only (code and
    tables skipped), each cut at ``max_words`` words. Deterministic."""
    from pydoc_data.topics import topics

    out: list[str] = []
    for key in sorted(topics):
        for block in topics[key].split("\n\n"):
            words = block.split()
            text = " ".join(words)
            letters = sum(c.isalpha() or c.isspace() for c in text)
            if len(words) < min_words or letters < 0.85 * len(text) or text.startswith((">>>", "...")):
                continue
            out.append(" ".join(words[:max_words]))
    unique = list(dict.fromkeys(out))  # first occurrence of each, in order
    if len(unique) < n:
        raise RuntimeError(f"only {len(unique)} paragraphs in pydoc_data.topics, {n} asked")
    step = len(unique) / n
    return [unique[int(i * step)] for i in range(n)]


def calibration_paragraphs(n: int = 30) -> list[str]:
    """Real English paragraphs disjoint from ``english_paragraphs(240)`` (the evaluation set)."""
    return english_paragraphs(480)[1::2][:: max(1, 240 // n)][:n]


def retrieval_set(paragraphs: list[str], n_queries: int) -> tuple[list[str], list[tuple[str, int]]]:
    """A retrieval set built from real paragraphs: (corpus, [(query, index of its passage)]).

    For ``n_queries`` paragraphs spread over the list, the query is the paragraph's
    opening 8-12 words and its passage is the rest of the paragraph; the other
    paragraphs stay whole. Deterministic.
    """
    corpus = list(paragraphs)
    step = max(1, len(paragraphs) // n_queries)
    queries = []
    for k in range(n_queries):
        i = k * step
        words = paragraphs[i].split()
        size = 8 + k % 5
        queries.append((" ".join(words[:size]), i))
        corpus[i] = " ".join(words[size:])
    return corpus, queries


def keyword_queries(paragraphs: list[str]) -> list[tuple[str, int]]:
    """One keyword query per paragraph: [(query, index of its passage)], passages whole.

    The query is the paragraph's 4-6 most distinctive words (term frequency x inverse
    document frequency over ``paragraphs``, words of 3+ letters, ties by spelling) in the
    order they first appear in it: what a user types to find that passage. Deterministic;
    the model plays no part in choosing them.
    """
    words = [re.findall(r"[a-z]{3,}", p.lower()) for p in paragraphs]
    df = Counter(w for ws in words for w in set(ws))
    n = len(paragraphs)
    queries = []
    for i, ws in enumerate(words):
        tf = Counter(ws)
        weight = {w: tf[w] * math.log(n / df[w]) for w in tf}
        top = set(sorted(weight, key=lambda w: (-weight[w], w))[: 4 + i % 3])
        queries.append((" ".join(w for w in dict.fromkeys(ws) if w in top), i))
    return queries


def calibration_pairs(n: int = 30) -> list[tuple[str, str]]:
    """Reranker calibration pairs from ``calibration_paragraphs(n)`` (disjoint from the
    evaluation set): each paragraph's opening 8 words as the query, against its own
    paragraph and the next one. Deterministic."""
    paragraphs = calibration_paragraphs(n)
    return [
        (" ".join(p.split()[:8]), passage)
        for i, p in enumerate(paragraphs)
        for passage in (p, paragraphs[(i + 1) % len(paragraphs)])
    ]


def rerank_set(
    paragraphs: list[str], n_queries: int = 30, candidates: int = 8
) -> tuple[list[tuple[str, str]], list[int]]:
    """A reranking set from real paragraphs: ``n_queries`` keyword queries (``keyword_queries``)
    spread over ``paragraphs``, each with ``candidates`` passages: its own paragraph first,
    then the paragraphs at even steps after it. Returns the (query, passage) pairs, query by
    query, and each pair's query number. Deterministic; the model plays no part."""
    queries = keyword_queries(paragraphs)
    n = len(paragraphs)
    step_q = max(1, n // n_queries)
    step_c = max(1, n // candidates)
    pairs: list[tuple[str, str]] = []
    groups: list[int] = []
    for k in range(n_queries):
        query, target = queries[k * step_q]
        for c in range(candidates):
            pairs.append((query, paragraphs[(target + c * step_c + c) % n]))
            groups.append(k)
    return pairs, groups
