"""Write a real-text retrieval set in the BEIR layout from the Python docs this machine has.

    python scripts/make_eval_set.py OUT [--paragraphs 480]

The corpus is ``m3_exporter.texts.english_paragraphs(N)`` (the language reference's
prose in ``pydoc_data.topics``, shipped with every CPython). Queries, two kinds, each
judged relevant (score 1) to exactly one passage:

- every 4th paragraph (i % 4 == 0): its opening 8-12 words, and its passage is the
  rest of the paragraph (the words are removed from it), as
  ``m3_exporter.texts.retrieval_set`` builds them;
- paragraphs with i % 4 == 2: their 4-6 most distinctive words
  (``m3_exporter.texts.keyword_queries``), passage whole.

Splits: ``dev`` takes the queries of paragraphs with i % 8 in (0, 2), ``test`` the
others. Deterministic; no model plays a part in choosing anything.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def build(out: Path, paragraphs: int = 480) -> Path:
    from m3_exporter.texts import english_paragraphs, keyword_queries
    from m3_runtime.evaluation.data import write

    texts = english_paragraphs(paragraphs)
    keywords = dict((i, q) for q, i in keyword_queries(texts))
    corpus = list(texts)
    queries: list[tuple[str, str]] = []
    qrels: dict[str, list[tuple[str, str, int]]] = {"dev": [], "test": []}
    for i, text in enumerate(texts):
        if i % 4 == 0:
            words = text.split()
            size = 8 + (i // 4) % 5
            query, corpus[i] = " ".join(words[:size]), " ".join(words[size:])
            qid = f"open-{i}"
        elif i % 4 == 2:
            query, qid = keywords[i], f"kw-{i}"
        else:
            continue
        queries.append((qid, query))
        qrels["dev" if i % 8 in (0, 2) else "test"].append((qid, f"p{i}", 1))
    return write(out, [(f"p{i}", "", t) for i, t in enumerate(corpus)], queries, qrels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--paragraphs", type=int, default=480)
    args = parser.parse_args()
    root = build(args.out, args.paragraphs)
    print(f"wrote {root}: corpus.jsonl, queries.jsonl, qrels/dev.tsv, qrels/test.tsv")


if __name__ == "__main__":
    main()
