"""Reference outputs stored in a package (``reference.npz``) and the probes they are of.

At export, after validation, ``m3-export`` runs these probes through the PyTorch model in
fp32 and stores the outputs here; ``m3 check`` (``check.py``) runs the same probes through
``encode`` / ``compute_score`` on the machine that will serve the package and compares.
The probes are stored in the file with their outputs, so a package is always checked
against what it was exported with, whatever this module's probes are later.

Embedder probes (``embedder_probes``): short texts in several scripts, the empty text,
emoji, markup, code and numbers; three mid-length passages; and one text longer than
the package's ``max_length``, truncated to it (8,192 tokens for BGE-M3). All are encoded
with truncation at ``max_length`` (``encode``'s default).

Reranker probes (``reranker_probes``): (query, passage) pairs in several languages, an
instruction in front of the query (``"{}{}"``, FlagReranker's default format), an empty
query and an empty passage, and pairs cut by truncation: a passage cut at 512 tokens, a
query cut at ``3/4`` of the length, and one pair cut at the package's ``max_length``.

File layout: a NumPy ``.npz`` (``np.savez_compressed``, no pickled objects; read with
``allow_pickle=False``). ``n`` probes, ``H`` hidden size, ``T`` = sum of token counts::

    kind            ()            str: the manifest's model_kind
    names           (n,)          str: probe names, used in messages
    tokens          (n,) int64    each probe's token count after truncation
  embedders:
    texts           (B,) uint8    the probes' UTF-8 bytes, concatenated (``pack_texts``;
    texts_bytes     (n,) int64    each probe's byte count)
    max_length      () int64      the truncation every probe was encoded with
    dense           (n, H) f32    dense_vecs
  bge-m3 also:
    token_ids       (T,) int64    each probe's token ids, concatenated
    sparse          (T,) f32      sparse_weights per token (lexical weights are made from them)
    colbert_norms   (T - n,) f32  the L2 norm of every ColBERT row (tokens - 1 per probe)
    colbert_count   (n,) int64    ColBERT rows stored per probe: all of them up to
                                  ``COLBERT_SAMPLE``, else ``COLBERT_SAMPLE`` evenly spaced
    colbert_index   (R,) int64    the stored rows' positions within their probe
    colbert_rows    (R, H) f32    the stored rows
  rerankers:
    queries, passages             packed as texts are (with ``queries_bytes``, ``passages_bytes``)
    max_length      (n,) int64    the max_length each pair was tokenized with
    scores          (n,) f32      the raw logit per pair

Size for the full-size BGE-M3 architecture (H = 1,024) with the tiny checkpoint's
1,094-piece tokenizer (``benchmarks/full_checkpoint.py``'s): 23 probes, 9,548 tokens, 689
stored ColBERT rows x 4 KiB = 2.82 MB, dense 0.09 MB, ids, sparse weights and norms
0.15 MB, texts 0.19 MB: 3.25 MB in memory, ~2.8 MB on disk (float data hardly
compresses). The real 250k vocabulary makes fewer tokens per text, so fewer rows.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .contract import RERANKER_KIND
from .errors import M3Error

# ColBERT rows stored per probe: every row of a probe with at most this many, else this
# many evenly spaced ones (first and last included). Every row's norm is stored.
COLBERT_SAMPLE = 48
# Reranker probes are tokenized at this length (FlagReranker's default), except the
# pair cut at the package's max_length.
RERANK_LENGTH = 512

SHORT_TEXTS: tuple[tuple[str, str], ...] = (
    ("en question", "What is BGE M3?"),
    (
        "en sentence",
        "BGE M3 is an embedding model supporting dense retrieval, lexical matching and multi-vector interaction.",
    ),
    ("de", "Der schnelle braune Fuchs springt über den faulen Hund."),
    ("fr", "La bibliothèque ouvre à neuf heures du matin et ferme à six heures du soir."),
    ("es", "Los investigadores midieron la velocidad del nuevo motor en tres máquinas distintas."),
    ("ru", "Москва является столицей России и крупнейшим городом страны."),
    ("ar", "القاهرة هي عاصمة مصر وأكبر مدنها."),
    ("he", "ירושלים היא עיר עתיקה עם היסטוריה ארוכה."),
    ("hi", "नई दिल्ली भारत की राजधानी है।"),
    ("th", "กรุงเทพมหานครเป็นเมืองหลวงของประเทศไทย"),
    ("zh", "北京是中华人民共和国的首都，也是全国的政治和文化中心。"),
    ("ja", "東京は日本の首都であり、最大の都市です。"),
    ("ko", "서울은 대한민국의 수도이자 가장 큰 도시입니다."),
    ("vi", "Hà Nội là thủ đô của Việt Nam."),
    ("emoji", "😀 🚀 🔥 👩‍💻 🇯🇵"),
    ("empty", ""),
    ("markup", "<p>Hello <b>world</b></p>"),
    ("code", "def f(x: int) -> int:\n    return x * 2"),
    ("numbers", "3.14159 2.71828 1,000,000 -17"),
)

PASSAGES: tuple[tuple[str, str], ...] = (
    (
        "passage en",
        "Dense retrieval encodes a query and every passage of a collection into vectors of one fixed size, "
        "and ranks the passages by the inner product of their vector with the query's. Lexical matching "
        "instead weighs the tokens the query and a passage share, which keeps rare names and numbers "
        "exact where a dense vector blurs them. Multi-vector interaction keeps one vector per token and "
        "scores a passage by the best match of each query token, at the price of storing a vector for "
        "every token of the collection. A model that produces all three from one forward pass lets a "
        "system combine them: retrieve candidates cheaply with one, and re-score the few best with the "
        "others. The weights of the combination are tuned on held-out queries of the target domain.",
    ),
    (
        "passage de+fr",
        "Die Stadtbibliothek wurde im Jahr 1897 gegründet und besitzt heute mehr als zwei Millionen "
        "Bücher, Zeitschriften und Karten. Ihre Lesesäle sind an sechs Tagen der Woche geöffnet, und "
        "seit der Renovierung im Jahr 2015 gibt es auch Arbeitsplätze mit Computern. "
        "La bibliothèque municipale propose aussi des ateliers pour les enfants, des expositions "
        "temporaires et un service de prêt entre bibliothèques qui couvre tout le pays. Les chercheurs "
        "peuvent consulter les manuscrits anciens sur rendez-vous, dans une salle climatisée où la "
        "lumière et l'humidité sont contrôlées en permanence.",
    ),
    (
        "passage zh+ja",
        "长江是亚洲最长的河流，全长约六千三百公里，流经青海、西藏、四川、云南、重庆、湖北、湖南、江西、"
        "安徽、江苏和上海，最后注入东海。长江流域面积约一百八十万平方公里，养育了中国三分之一的人口。"
        "三峡工程是世界上最大的水力发电站之一，于二零零六年完工。"
        "富士山は日本で最も高い山で、標高は三千七百七十六メートルです。静岡県と山梨県にまたがり、"
        "二千十三年に世界文化遺産に登録されました。毎年夏には多くの登山者が頂上を目指します。",
    ),
)

_LONG_SENTENCES = (
    "Multilingual retrieval needs long passages too.",
    "Die Suche über viele Sprachen braucht auch lange Texte.",
    "多语言检索也需要长文本。",
    "Поиск на многих языках требует длинных текстов.",
    "La recherche multilingue a aussi besoin de longs passages.",
    "長い文書も検索の対象になります。",
)


def long_text(max_length: int) -> str:
    """A text of more than ``max_length`` tokens: numbered sentences in six languages
    (every one is at least three tokens: a number, a full stop and a word or more)."""
    return " ".join(f"{i}. {_LONG_SENTENCES[i % len(_LONG_SENTENCES)]}" for i in range(max_length // 3 + 8))


def embedder_probes(max_length: int) -> list[tuple[str, str]]:
    """``(name, text)`` of every embedder probe; the last is longer than ``max_length`` tokens."""
    return [*SHORT_TEXTS, *PASSAGES, (f"long ({max_length} tokens)", long_text(max_length))]


INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query. "


@dataclass(frozen=True)
class PairProbe:
    name: str
    query: str
    passage: str
    max_length: int


def reranker_probes(max_length: int) -> list[PairProbe]:
    """The reranker probes (see the module docstring) for a package of ``max_length``."""
    short = min(RERANK_LENGTH, max_length)
    en_pos = PASSAGES[0][1]
    pairs = [
        ("en relevant", "What is dense retrieval?", en_pos),
        ("en unrelated", "What is dense retrieval?", SHORT_TEXTS[5][1]),
        ("en empty passage", "What is dense retrieval?", ""),
        ("empty query", "", "Hà Nội là thủ đô của Việt Nam."),
        ("zh", "什么是大熊猫？", "大熊猫是一种生活在中国山区的熊科动物，主要以竹子为食。"),
        (
            "zh-en",
            "什么是大熊猫？",
            "The giant panda is a bear native to the mountains of central China; it eats bamboo.",
        ),
        ("ru-fr", "Столица Франции", "Paris est la capitale de la France et sa plus grande ville."),
        ("es code", "¿Cómo se ordena una lista en Python?", "sorted(xs) returns a new list; xs.sort() sorts in place."),
        ("ko emoji", "서울의 인구는 얼마입니까?", "😀 🚀 🔥 👩‍💻 🇯🇵 <p>Hello <b>world</b></p>"),
        ("instruction", INSTRUCTION + "What is dense retrieval?", en_pos),
        ("instruction unrelated", INSTRUCTION + "What is dense retrieval?", PASSAGES[2][1]),
        ("passage cut", "What is multilingual retrieval?", long_text(short)),
        ("query cut", long_text(short), "Multilingual retrieval needs long passages too."),
    ]
    out = [PairProbe(n, q, p, short) for n, q, p in pairs]
    if max_length > short:
        out.append(
            PairProbe(f"cut at {max_length}", "What is multilingual retrieval?", long_text(max_length), max_length)
        )
    return out


class ReferenceFileError(M3Error, ValueError):
    """The reference file does not hold what its kind needs (written by another version?)."""


@dataclass(frozen=True)
class References:
    """The arrays of a reference file (see the module docstring), by name."""

    arrays: Mapping[str, np.ndarray]

    @property
    def kind(self) -> str:
        return str(self.arrays["kind"])

    @property
    def names(self) -> list[str]:
        return [str(x) for x in self.arrays["names"]]

    def texts(self, name: str) -> list[str]:
        """The texts packed as ``name`` (``pack_texts``)."""
        data = self[name].tobytes()
        ends = np.cumsum(self[f"{name}_bytes"]).tolist()
        return [data[a:b].decode("utf-8") for a, b in zip([0, *ends[:-1]], ends, strict=True)]

    def __getitem__(self, key: str) -> np.ndarray:
        try:
            return self.arrays[key]
        except KeyError:
            raise ReferenceFileError(f"the reference file has no {key!r} array") from None


def sample_rows(rows: int) -> np.ndarray:
    """Positions of the ColBERT rows stored for a probe with ``rows`` rows."""
    if rows <= COLBERT_SAMPLE:
        return np.arange(rows, dtype=np.int64)
    return np.unique(np.linspace(0, rows - 1, COLBERT_SAMPLE).round().astype(np.int64))


def embedder_arrays(
    kind: str,
    names: list[str],
    texts: list[str],
    max_length: int,
    ids: list[list[int]],
    dense: list[np.ndarray],
    sparse: list[np.ndarray] | None,
    colbert: list[np.ndarray] | None,
) -> dict[str, np.ndarray]:
    """The arrays of an embedder's reference file from per-probe outputs on real tokens
    (dense ``[H]``, sparse ``[tokens]``, ColBERT ``[tokens - 1, H]``)."""
    out: dict[str, np.ndarray] = {
        "kind": np.array(kind),
        "names": np.array(names),
        **pack_texts("texts", texts),
        "max_length": np.array(max_length, dtype=np.int64),
        "tokens": np.array([len(x) for x in ids], dtype=np.int64),
        "dense": np.stack(dense).astype(np.float32),
    }
    if sparse is not None and colbert is not None:
        index = [sample_rows(len(c)) for c in colbert]
        hidden = out["dense"].shape[1]
        out |= {
            "token_ids": np.concatenate([np.asarray(x, dtype=np.int64) for x in ids]),
            "sparse": np.concatenate(sparse).astype(np.float32),
            "colbert_norms": np.concatenate([np.linalg.norm(c, axis=-1) for c in colbert]).astype(np.float32),
            "colbert_count": np.array([len(i) for i in index], dtype=np.int64),
            "colbert_index": np.concatenate(index),
            "colbert_rows": np.concatenate([c[i] for c, i in zip(colbert, index, strict=True)])
            .reshape(-1, hidden)
            .astype(np.float32),
        }
    return out


def reranker_arrays(probes: list[PairProbe], ids: list[list[int]], scores: np.ndarray) -> dict[str, np.ndarray]:
    """The arrays of a reranker's reference file."""
    return {
        "kind": np.array(RERANKER_KIND),
        "names": np.array([p.name for p in probes]),
        **pack_texts("queries", [p.query for p in probes]),
        **pack_texts("passages", [p.passage for p in probes]),
        "max_length": np.array([p.max_length for p in probes], dtype=np.int64),
        "tokens": np.array([len(x) for x in ids], dtype=np.int64),
        "scores": np.asarray(scores, dtype=np.float32),
    }


def pack_texts(name: str, texts: list[str]) -> dict[str, np.ndarray]:
    """``texts`` as ``name`` (their UTF-8 bytes, concatenated, uint8) and ``name_bytes``
    (each one's byte count): a NumPy str array pads every text to the longest one."""
    data = [t.encode("utf-8") for t in texts]
    return {
        name: np.frombuffer(b"".join(data), dtype=np.uint8),
        f"{name}_bytes": np.array([len(d) for d in data], dtype=np.int64),
    }


def write_references(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    np.savez_compressed(path, **arrays)  # type: ignore[arg-type]


def read_references(path: Path) -> References:
    try:
        with np.load(path, allow_pickle=False) as data:
            return References({k: data[k] for k in data.files})
    except (OSError, ValueError) as exc:
        raise ReferenceFileError(f"cannot read the reference file {path}: {exc}") from None


def split(flat: np.ndarray, counts: np.ndarray) -> list[np.ndarray]:
    """``flat`` cut into consecutive pieces of ``counts`` rows."""
    return np.split(flat, np.cumsum(counts)[:-1])
