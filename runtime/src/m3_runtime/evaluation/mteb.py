"""MTEB 2.x wrappers (extra ``m3-runtime[mteb]``): run MTEB retrieval tasks with a package.

- ``M3Encoder``: MTEB's ``EncoderProtocol`` (dense vectors; queries get the package's
  query instruction and ``query_max_length``, as ``encode_queries``).
- ``M3Search``: MTEB's ``SearchProtocol`` (``index`` the corpus, ``search`` the queries)
  for every ``m3 eval`` mode, hybrid and ColBERT included, through the same functions
  ``m3 eval`` ranks with (``m3_runtime.evaluation.retrieval``).
- ``local_task(DATA, split)``: a BEIR-layout folder as an MTEB retrieval task, read by
  ``m3_runtime.evaluation.data`` (MTEB's own loader asks the Hugging Face hub).

    import mteb
    from m3_runtime.evaluation.mteb import M3Search, local_task

    result = mteb.evaluate(M3Search("out/bge-m3", "int8", mode="all"), local_task("my-set"), cache=None)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np

from ..contract import COLBERT, SPARSE
from ..errors import InputError
from . import retrieval
from .run import DEFAULT_WEIGHTS, MODES

try:
    import mteb  # noqa: F401
    from mteb.abstasks.retrieval import AbsTaskRetrieval
    from mteb.abstasks.task_metadata import TaskMetadata
    from mteb.models.model_meta import ModelMeta
except ImportError as exc:  # pragma: no cover - the extra is missing
    from .metrics import MissingExtra

    raise MissingExtra(f'the MTEB wrappers need mteb 2.x: pip install "m3-runtime[mteb]" ({exc})') from None


def _meta(name: str, dim: int | None) -> ModelMeta:
    return ModelMeta(
        loader=None,
        name=name,
        revision="local",
        release_date=None,
        languages=None,
        n_parameters=None,
        memory_usage_mb=None,
        max_tokens=None,
        embed_dim=dim,
        license=None,
        open_weights=None,
        public_training_code=None,
        public_training_data=None,
        framework=[],
        similarity_fn_name=cast(Any, "dot"),  # ScoringFunction.DOT_PRODUCT's value
        use_instructions=False,
        training_datasets=None,
    )


def _model(package: str | Path, variant: str | None):
    from ..model import M3Model

    return M3Model(package, variant=variant)  # type: ignore[arg-type]


class M3Encoder:
    """MTEB ``EncoderProtocol``: dense vectors of a package's variant."""

    def __init__(self, package: str | Path, variant: str | None = None, **_: Any) -> None:
        self.model = _model(package, variant)
        self.mteb_model_meta = _meta(f"m3/{Path(package).name}/{self.model.variant}", self.model.hidden_size)

    def encode(self, inputs, *, task_metadata=None, hf_split=None, hf_subset=None, prompt_type=None, **_: Any):
        queries = prompt_type is not None and str(getattr(prompt_type, "value", prompt_type)) == "query"
        rows = []
        for batch in inputs:
            texts = list(batch["text"])
            if queries:
                rows.append(self.model.encode_queries(texts)["dense_vecs"])
            else:
                rows.append(self.model.encode_corpus(texts)["dense_vecs"])
        return np.concatenate(rows) if rows else np.zeros((0, self.model.hidden_size), np.float32)

    def similarity(self, a, b):
        return np.asarray(a) @ np.asarray(b).T

    def similarity_pairwise(self, a, b):
        return np.einsum("ij,ij->i", np.asarray(a), np.asarray(b))


class M3Search:
    """MTEB ``SearchProtocol`` for one ``m3 eval`` mode (docs/evaluation.md: what each ranks)."""

    def __init__(
        self,
        package: str | Path,
        variant: str | None = None,
        *,
        mode: str = "dense",
        weights: Sequence[float] = DEFAULT_WEIGHTS,
        candidates: int = 100,
        **_: Any,
    ) -> None:
        if mode not in MODES:
            raise InputError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        self.model = _model(package, variant)
        kind = self.model.engine.kind
        need = {"sparse": [SPARSE], "dense+sparse": [SPARSE], "colbert": [COLBERT], "all": [SPARSE, COLBERT]}
        if any(not kind.has(o) for o in need.get(mode, [])):
            raise InputError(f"mode {mode!r}: {package} is a {kind.description}")
        self.mode, self.weights, self.candidates = mode, list(weights), candidates
        self.mteb_model_meta = _meta(f"m3/{Path(package).name}/{self.model.variant}/{mode}", self.model.hidden_size)
        self.quiet = lambda _m: None

    def index(self, corpus, **_: Any) -> None:
        self.ids = [str(x) for x in corpus["id"]]
        titles = corpus["title"] if "title" in corpus.column_names else [""] * len(self.ids)
        texts = [f"{t} {x}" if t and str(t).strip() else x for t, x in zip(titles, corpus["text"], strict=True)]
        self.texts = texts
        kind = self.model.engine.kind
        self.corpus = retrieval.encode(
            self.model,
            texts,
            sparse=kind.has(SPARSE),
            colbert=self.mode in ("colbert", "all"),
            colbert_bytes=retrieval.KEEP_COLBERT_BYTES,
            max_length=None,
            say=self.quiet,
            label="corpus",
        )

    def _colbert_rows(self) -> retrieval.ColbertRows:
        if self.corpus.colbert is not None:
            return retrieval.kept_rows(self.corpus.colbert)
        return retrieval.encoded_rows(self.model, self.texts, max_length=None)

    def search(self, queries, *, top_k: int, **_: Any) -> dict[str, dict[str, float]]:
        kind = self.model.engine.kind
        texts = [(self.model.query_instruction or "") + t for t in queries["text"]]
        q = retrieval.encode(
            self.model,
            texts,
            sparse=kind.has(SPARSE),
            colbert=kind.has(COLBERT) and self.mode in ("colbert", "all"),
            max_length=self.model.query_max_length,
            say=self.quiet,
            label="queries",
        )
        depth = max(top_k, self.candidates)
        pooled = self.mode in ("colbert", "all")
        first_modes = ["dense", *(["sparse"] if kind.has(SPARSE) else [])] if pooled else [self.mode]
        first = retrieval.first_stage(
            q, self.corpus, depth=depth, modes=first_modes, weights=self.weights, say=self.quiet
        )
        if pooled:
            pools = retrieval.pools(
                q, self.corpus, first, candidates=self.candidates, colbert_rows=self._colbert_rows(), say=self.quiet
            )
            ranked = (
                retrieval.colbert_ranking(pools)
                if self.mode == "colbert"
                else retrieval.weighted_ranking(pools, self.weights)
            )
        else:
            ranked = first[self.mode]
        return {
            str(qid): {self.ids[int(i)]: float(s) for i, s in zip(idx[:top_k], sc[:top_k], strict=True)}
            for qid, idx, sc in zip(queries["id"], ranked.indices, ranked.scores, strict=True)
        }


def local_task(root: str | Path, split: str = "test", name: str = "LocalBEIR"):
    """A BEIR-layout folder as an MTEB retrieval task (one split, English metadata)."""
    from . import data as evdata

    folder = str(root)

    class LocalBEIR(AbsTaskRetrieval):
        metadata = TaskMetadata(
            name=name,
            description=f"the BEIR-layout folder {folder}",
            dataset={"path": folder, "revision": "local"},
            type="Retrieval",
            category="t2t",
            eval_splits=[split],
            eval_langs=["eng-Latn"],
            main_score="ndcg_at_10",
            reference=None,
            date=None,
            domains=None,
            task_subtypes=None,
            license=None,
            annotations_creators=None,
            dialect=None,
            sample_creation=None,
            bibtex_citation="",
        )

        def load_data(self, num_proc: int | None = None, **_: Any) -> None:
            if self.data_loaded:
                return
            s = evdata.load(folder, split)
            self.corpus = {
                split: {i: {"title": "", "text": t} for i, t in zip(s.corpus_ids, s.corpus_texts, strict=True)}
            }
            self.queries = {split: dict(zip(s.query_ids, s.query_texts, strict=True))}
            self.relevant_docs = {split: s.qrels}
            self.convert_v1_dataset_format_to_v2(num_proc)
            self.data_loaded = True

    return LocalBEIR()
