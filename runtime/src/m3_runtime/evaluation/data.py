"""A retrieval set in the BEIR/MTEB layout, read with errors that name the file and line.

``DATA/corpus.jsonl`` (``_id``, ``title``, ``text``), ``DATA/queries.jsonl`` (``_id``,
``text``) and ``DATA/qrels/<split>.tsv`` (``query-id``, ``corpus-id``, ``score``, with
or without that header line). A passage's text is ``title + " " + text`` when it has a
title (BEIR's and MTEB's concatenation), else ``text``. Judgements of 0 are kept (they
count as judged, not relevant); a query whose judgements are all 0 has nothing to find
and is left out, and the count of those is reported.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import M3Error


class EvalDataError(M3Error, ValueError):
    """A bad retrieval set: the message names the file and line."""


@dataclass
class RetrievalSet:
    root: Path
    split: str
    corpus_ids: list[str]
    corpus_texts: list[str]
    query_ids: list[str]  # judged queries of the split, in queries.jsonl order
    query_texts: list[str]
    qrels: dict[str, dict[str, int]]  # query id -> {corpus id: relevance}
    dropped_queries: list[str] = field(default_factory=list)  # judged only with 0

    def __len__(self) -> int:
        return len(self.corpus_ids)


def _jsonl(path: Path, *, need_text: bool = True) -> list[tuple[int, dict]]:
    if not path.is_file():
        raise EvalDataError(f"{path}: no such file (a BEIR-layout folder has corpus.jsonl, queries.jsonl, qrels/)")
    rows: list[tuple[int, dict]] = []
    with path.open(encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:
                raise EvalDataError(f"{path}:{line_no}: not a JSON object ({exc.args[0]})") from None
            if not isinstance(row, dict):
                raise EvalDataError(f"{path}:{line_no}: expected a JSON object, got {type(row).__name__}")
            if "_id" not in row:
                raise EvalDataError(f"{path}:{line_no}: no '_id' field (fields: {', '.join(row) or 'none'})")
            if need_text and not isinstance(row.get("text"), str):
                raise EvalDataError(f"{path}:{line_no}: 'text' must be a string, got {row.get('text')!r:.60}")
            rows.append((line_no, row))
    if not rows:
        raise EvalDataError(f"{path}: empty")
    return rows


def _ids(rows: list[tuple[int, dict]], path: Path) -> dict[str, int]:
    seen: dict[str, int] = {}
    for line_no, row in rows:
        key = str(row["_id"])
        if key in seen:
            raise EvalDataError(f"{path}:{line_no}: _id {key!r} already on line {seen[key]}")
        seen[key] = line_no
    return seen


def read_qrels(path: Path) -> list[tuple[int, str, str, int]]:
    """``(line, query id, corpus id, relevance)`` rows of a qrels TSV (header optional)."""
    if not path.is_file():
        others = sorted(p.stem for p in path.parent.glob("*.tsv")) if path.parent.is_dir() else []
        raise EvalDataError(f"{path}: no such file (splits there: {', '.join(others) or 'none'})")
    rows = []
    with path.open(encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, 1):
            if not line.strip():
                continue
            parts = line.rstrip("\n").split("\t")
            if line_no == 1 and parts[0] in ("query-id", "query_id", "qid"):
                continue
            if len(parts) not in (3, 4):  # 4: TREC's "qid iter docid rel" in tabs
                raise EvalDataError(f"{path}:{line_no}: expected query-id<TAB>corpus-id<TAB>score, got {line!r:.80}")
            qid, did, rel = (parts[0], parts[1], parts[2]) if len(parts) == 3 else (parts[0], parts[2], parts[3])
            try:
                score = int(rel)
            except ValueError:
                raise EvalDataError(f"{path}:{line_no}: score {rel!r} is not an integer") from None
            rows.append((line_no, qid, did, score))
    if not rows:
        raise EvalDataError(f"{path}: the split is empty (no judgements)")
    return rows


def load(root: str | Path, split: str = "test") -> RetrievalSet:
    """Read ``root`` (corpus.jsonl, queries.jsonl, qrels/<split>.tsv) and check they agree."""
    root = Path(root)
    if not root.is_dir():
        raise EvalDataError(f"{root}: not a folder (a BEIR-layout folder has corpus.jsonl, queries.jsonl, qrels/)")
    corpus_path, queries_path, qrels_path = (
        root / "corpus.jsonl",
        root / "queries.jsonl",
        root / "qrels" / f"{split}.tsv",
    )
    corpus = _jsonl(corpus_path)
    corpus_lines = _ids(corpus, corpus_path)
    queries = _jsonl(queries_path)
    query_lines = _ids(queries, queries_path)
    qrels: dict[str, dict[str, int]] = {}
    for line_no, qid, did, score in read_qrels(qrels_path):
        if qid not in query_lines:
            raise EvalDataError(f"{qrels_path}:{line_no}: query id {qid!r} is not in {queries_path}")
        if did not in corpus_lines:
            raise EvalDataError(f"{qrels_path}:{line_no}: corpus id {did!r} is not in {corpus_path}")
        qrels.setdefault(qid, {})[did] = score
    dropped = [q for q, judged in qrels.items() if not any(v > 0 for v in judged.values())]
    for q in dropped:
        del qrels[q]
    if not qrels:
        raise EvalDataError(f"{qrels_path}: the split has no query with a relevant (score > 0) passage")
    texts = []
    for _, row in corpus:
        title = row.get("title") or ""
        texts.append(f"{title} {row['text']}" if isinstance(title, str) and title.strip() else row["text"])
    judged = [(str(row["_id"]), row["text"]) for _, row in queries if str(row["_id"]) in qrels]
    return RetrievalSet(
        root=root,
        split=split,
        corpus_ids=[str(row["_id"]) for _, row in corpus],
        corpus_texts=texts,
        query_ids=[q for q, _ in judged],
        query_texts=[t for _, t in judged],
        qrels=qrels,
        dropped_queries=dropped,
    )


def write(
    root: str | Path,
    corpus: list[tuple[str, str, str]],
    queries: list[tuple[str, str]],
    qrels: dict[str, list[tuple[str, str, int]]],
) -> Path:
    """Write a BEIR-layout set: corpus ``(id, title, text)``, queries ``(id, text)``,
    ``{split: [(query id, corpus id, score)]}``."""
    root = Path(root)
    (root / "qrels").mkdir(parents=True, exist_ok=True)
    with (root / "corpus.jsonl").open("w", encoding="utf-8") as fh:
        for did, title, text in corpus:
            fh.write(json.dumps({"_id": did, "title": title, "text": text}, ensure_ascii=False) + "\n")
    with (root / "queries.jsonl").open("w", encoding="utf-8") as fh:
        for qid, text in queries:
            fh.write(json.dumps({"_id": qid, "text": text}, ensure_ascii=False) + "\n")
    for split, rows in qrels.items():
        with (root / "qrels" / f"{split}.tsv").open("w", encoding="utf-8") as fh:
            fh.write("query-id\tcorpus-id\tscore\n")
            fh.writelines(f"{q}\t{d}\t{s}\n" for q, d, s in rows)
    return root
