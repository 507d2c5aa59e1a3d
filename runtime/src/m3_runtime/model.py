"""``M3Model``: FlagEmbedding's ``BGEM3FlagModel`` API over an ``Engine``.

The engine loads the package and runs forward passes; this class only shapes what
FlagEmbedding users call: argument defaults and checks, the result dictionaries, the
scores. ``embed`` is the typed form underneath ``encode`` (it also gives each text's
token count), for code that is not migrating from FlagEmbedding.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import scoring
from .compat import engine_options
from .contract import COLBERT, DENSE, SPARSE, Variant
from .engine import DEFAULT_BATCH_SIZE, Engine, check_positive, check_unicode
from .errors import InputError, InputTypeError, UnsupportedOutput
from .heads import TextOutput, split_batch
from .self_check import SelfCheck
from .tokenize import format_instruction

EncodeResult = dict[str, Any]
Texts = str | Sequence[str]

DENSE_ONLY_HINT = "use return_sparse=False, return_colbert_vecs=False"


@dataclass(frozen=True)
class Embeddings:
    """Outputs of ``M3Model.embed`` in input order; ``None`` where not asked for."""

    tokens: np.ndarray  # (n,) int64: each text's token count after truncation
    dense: np.ndarray | None  # (n, hidden) float32
    lexical: list[scoring.LexicalWeights] | None
    colbert: list[np.ndarray] | None  # each (tokens_i - 1, hidden) float32


def as_texts(sentences: object, name: str) -> tuple[list[str], bool]:
    """``(texts, single)``: a str or a list of str, checked; ``single`` for a lone str."""
    if isinstance(sentences, str):
        return [sentences], True
    if (
        isinstance(sentences, (bytes, bytearray))
        or not isinstance(sentences, Iterable)
        or isinstance(sentences, Mapping)
    ):
        raise InputTypeError(f"{name} must be a str or a list of str, got {type(sentences).__name__}")
    texts = list(sentences)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise InputTypeError(f"{name}[{i}] is {type(text).__name__}, expected str")
        check_unicode(text, f"{name}[{i}]")
    return texts, False


def gather(outputs: Sequence[TextOutput], *, hidden_size: int, dense: bool, sparse: bool, colbert: bool) -> Embeddings:
    """Per-text outputs -> ``Embeddings`` (stacked dense rows)."""
    return Embeddings(
        tokens=np.array([o.tokens for o in outputs], dtype=np.int64),
        dense=(
            (
                np.stack([o.dense for o in outputs if o.dense is not None])
                if outputs
                else np.zeros((0, hidden_size), dtype=np.float32)
            )
            if dense
            else None
        ),
        lexical=[o.lexical for o in outputs] if sparse else None,  # type: ignore[misc]
        colbert=[o.colbert for o in outputs] if colbert else None,  # type: ignore[misc]
    )


def as_pairs(sentence_pairs: object) -> tuple[list[tuple[str, str]], bool]:
    """``(pairs, single)``: one ``(query, passage)`` or a list of them, each two str."""
    single = (
        isinstance(sentence_pairs, (tuple, list)) and len(sentence_pairs) == 2 and isinstance(sentence_pairs[0], str)
    )
    if not single and (isinstance(sentence_pairs, (str, bytes, Mapping)) or not isinstance(sentence_pairs, Iterable)):
        raise InputTypeError(
            f"sentence_pairs must be a (query, passage) pair or a list of them, got {sentence_pairs!r:.80}"
        )
    pairs: list[Any] = [sentence_pairs] if single else list(sentence_pairs)  # type: ignore[call-overload]
    for i, pair in enumerate(pairs):
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise InputTypeError(f"sentence_pairs[{i}] must be a (query, passage) pair, got {pair!r:.80}")
        for j, text in enumerate(pair):
            if not isinstance(text, str):
                raise InputTypeError(f"sentence_pairs[{i}][{j}] is {type(text).__name__}, expected str")
            check_unicode(text, f"sentence_pairs[{i}][{j}]")
    return [(str(a), str(b)) for a, b in pairs], single


def pair_scores(q: Embeddings, p: Embeddings, *, weights: Sequence[float], chunk: int) -> dict[str, list[float]]:
    """FlagEmbedding's five ``compute_score`` lists from queries' and passages' outputs.

    ``chunk``: the ``batch_size`` the reference scored with (its ColBERT scores pad
    passages per chunk, see ``scoring.paired_colbert_scores``)."""
    assert q.dense is not None and p.dense is not None and q.lexical is not None and p.lexical is not None
    assert q.colbert is not None and p.colbert is not None
    return scoring.combine_scores(
        dense=np.einsum("ij,ij->i", q.dense, p.dense).astype(np.float64),
        sparse=scoring.paired_lexical_scores(q.lexical, p.lexical),
        colbert=scoring.paired_colbert_scores(q.colbert, p.colbert, chunk=chunk),
        weights=weights,
    )


class M3Model(SelfCheck):
    """Dense, sparse (lexical) and ColBERT outputs of BGE-M3 from one ONNX Runtime pass.

    Args:
        package_dir: a directory written by ``m3-export``.
        variant: ``"fp32"``, ``"fp16"`` or ``"int8"``. ``None`` picks by provider: fp16
            when TensorRT or CUDA is available (and the package has it), else int8 if
            present, else fp32.
        providers: ONNX Runtime providers in order of preference. ``None`` uses those
            the variant is built for that this ONNX Runtime has, then the CPU.
        batch_size: most texts per forward pass (FlagEmbedding 1.4's default, 256).
        max_batch_tokens: most padded tokens (rows x longest row) per forward pass.
            ``None``: 16,384 on GPU providers, 256 on the CPU, where bigger batches push
            the activations out of cache (int8 queries: 1,062 tokens/s at 256, 997 at
            512, 886 at 128, 639 at 4,096; fp32: 389 at 256, 149 at 16,384).
        query_max_length: truncation for ``encode_queries`` and scored queries; ``None``
            uses 512 (FlagEmbedding's default), or the package's maximum if lower.
        passage_max_length: truncation for ``encode``/``encode_corpus`` and scored
            passages; ``None`` uses the package's maximum (8192 for BGE-M3).
        exact_batches: for packages whose int8 quantizes activations per run (packages
            written before per-token int8: one scale over the whole batch, padding
            included), run each text alone so its result never depends on its batch
            companions. ``False`` batches them anyway, and results then move with the
            batch (up to 2.5e-2 on the tiny checkpoint). Per-token int8 and the float
            variants are batch-invariant and always batch.
        pad_batches: whether texts of different lengths share a (padded) batch (default).
            ``False`` batches only texts of one length (each call then takes the
            mask-free flash attention path).
        verify: check each package file's SHA-256 at load (sizes are always checked). A
            file hashed before and unchanged since (same size, modification time and
            inode, recorded in ``<cache_dir>/verified.json``) is not hashed again.
        device_id, cache_dir, intra_op_threads: provider settings; TensorRT engine and
            timing caches go under ``cache_dir`` (default ``~/.cache/m3-runtime``).
        allow_spinning: let ONNX Runtime's worker threads spin between operators. Off by
            default (they burn shared cores); on a dedicated CPU it gave +20% on short
            queries (int8, 2 vCPUs).
        workers: forward passes run at once when a call has several batches (one
            session called from several threads; the weights are shared). With
            ``intra_op_threads=1`` and one worker per core: +26% on many short
            queries, +12% on passages, but half speed on a lone long text (2 vCPUs).
        engine: an already loaded ``Engine`` to wrap instead (the loading arguments are
            then ignored).

    FlagEmbedding 1.4's ``BGEM3FlagModel`` arguments, with its semantics where the
    package can (docs/runtime.md has the table): ``return_dense``, ``return_sparse``,
    ``return_colbert_vecs`` (what ``encode*`` return when a call does not say),
    ``query_instruction_for_retrieval`` and ``query_instruction_format`` (prepended by
    ``encode_queries``), ``truncate_dim`` (``encode*``'s dense and ColBERT vectors cut
    to their first dims and normalised again), ``devices`` (``"cpu"``, ``"cuda:N"``:
    providers and device id), ``use_fp16`` (the fp16 variant on a GPU; the CPU default
    without one, said once), ``batch_size``, ``query_max_length``,
    ``passage_max_length``, ``cache_dir``, ``trust_remote_code`` (packages hold no
    code: accepted, nothing to trust). Refused with the reason: ``normalize_embeddings``
    other than the graph's, ``pooling_method`` other than the package's, ``colbert_dim``
    other than -1, ``use_bf16=True``.
    """

    def __init__(
        self,
        package_dir: str | Path,
        variant: Variant | None = None,
        providers: Sequence[str] | None = None,
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
        max_batch_tokens: int | None = None,
        query_max_length: int | None = None,
        passage_max_length: int | None = None,
        exact_batches: bool = True,
        pad_batches: bool = True,
        verify: bool = True,
        device_id: int = 0,
        cache_dir: str | Path | None = None,
        intra_op_threads: int = 0,
        allow_spinning: bool = False,
        workers: int = 1,
        engine: Engine | None = None,
        # FlagEmbedding 1.4 (BGEM3FlagModel)
        normalize_embeddings: bool | None = None,
        use_fp16: bool | None = None,
        use_bf16: bool = False,
        query_instruction_for_retrieval: str | None = None,
        query_instruction_format: str = "{}{}",
        devices: str | int | Sequence[str | int] | None = None,
        pooling_method: str | None = None,
        trust_remote_code: bool = False,
        colbert_dim: int = -1,
        return_dense: bool = True,
        return_sparse: bool = False,
        return_colbert_vecs: bool = False,
        truncate_dim: int | None = None,
    ) -> None:
        self.engine = engine or Engine(
            package_dir,
            engine_options(
                variant=variant,
                providers=providers,
                devices=devices,
                use_fp16=use_fp16,
                use_bf16=use_bf16,
                device_id=device_id,
                cache_dir=cache_dir,
                batch_size=batch_size,
                max_batch_tokens=max_batch_tokens,
                exact_batches=exact_batches,
                pad_batches=pad_batches,
                verify=verify,
                intra_op_threads=intra_op_threads,
                allow_spinning=allow_spinning,
                workers=workers,
            ),
        )
        if self.engine.kind.pairs:
            raise InputError(
                f"{self.engine.package.root} is a {self.engine.kind.description}: load it with M3Reranker, not M3Model"
            )
        manifest = self.engine.package.manifest
        if normalize_embeddings is not None and bool(normalize_embeddings) != manifest.normalize:
            does = "normalises" if manifest.normalize else "does not normalise"
            raise InputError(
                f"normalize_embeddings={normalize_embeddings}: the graph of {self.engine.package.root} {does} its "
                f"vectors, fixed at export; leave normalize_embeddings out (or pass {manifest.normalize})"
            )
        if pooling_method is not None and pooling_method != manifest.pooling:
            raise InputError(
                f"pooling_method={pooling_method!r}: the graph of {self.engine.package.root} pools with "
                f"{manifest.pooling!r}, fixed at export; leave pooling_method out (or pass {manifest.pooling!r})"
            )
        if colbert_dim != -1:
            raise InputError(
                f"colbert_dim={colbert_dim!r}: the package's ColBERT head is the exported one "
                f"({self.engine.hidden_size} dims); pass colbert_dim=-1, or truncate_dim for shorter vectors"
            )
        if truncate_dim is not None:
            if isinstance(truncate_dim, bool) or not isinstance(truncate_dim, int) or not 1 <= truncate_dim:
                raise InputError(f"truncate_dim must be a positive integer or None, got {truncate_dim!r}")
            truncate_dim = min(truncate_dim, self.engine.hidden_size)  # FlagEmbedding slices: no error above
        self.truncate_dim = truncate_dim
        self.return_defaults = {
            "return_dense": bool(return_dense),
            "return_sparse": bool(return_sparse),
            "return_colbert_vecs": bool(return_colbert_vecs),
        }
        self.trust_remote_code = trust_remote_code
        check = self.engine.check_length
        self.query_max_length = check(
            min(512, self.max_length) if query_max_length is None else query_max_length, "query_max_length"
        )
        self.passage_max_length = check(
            self.max_length if passage_max_length is None else passage_max_length, "passage_max_length"
        )
        # FlagEmbedding: format.format(instruction, query); the package's instruction is the default.
        self.query_instruction = (
            manifest.query_instruction if query_instruction_for_retrieval is None else query_instruction_for_retrieval
        )
        self.query_instruction_format = query_instruction_format

    # Read-through views of the engine, for callers and for FlagEmbedding-style introspection.
    package = property(lambda self: self.engine.package)
    variant = property(lambda self: self.engine.variant)
    providers = property(lambda self: self.engine.providers)
    session = property(lambda self: self.engine.session)
    tokenizer = property(lambda self: self.engine.tokenizer)
    special = property(lambda self: self.engine.special)
    kind = property(lambda self: self.engine.kind.name)
    outputs = property(lambda self: self.engine.outputs)
    max_length = property(lambda self: self.engine.max_length)
    hidden_size = property(lambda self: self.engine.hidden_size)
    batch_size = property(lambda self: self.engine.batch_size)
    max_batch_tokens = property(lambda self: self.engine.max_batch_tokens)
    pad_batches = property(lambda self: self.engine.pad_batches)

    # -- typed core -----------------------------------------------------------
    def embed(
        self,
        texts: Sequence[str],
        *,
        max_length: int | None = None,
        dense: bool = True,
        sparse: bool = False,
        colbert: bool = False,
        batch_size: int | None = None,
    ) -> Embeddings:
        """Outputs of ``texts`` (a list of str) and their token counts, in input order."""
        names = [name for name, on in ((DENSE, dense), (SPARSE, sparse), (COLBERT, colbert)) if on]
        if not names:
            raise InputError("ask for at least one of return_dense, return_sparse, return_colbert_vecs")
        self.engine.check_outputs(names, DENSE_ONLY_HINT)
        ids = self.engine.tokenize(texts, self.passage_max_length if max_length is None else max_length)
        unused = self.special.unused_for_sparse
        per_text: list[TextOutput | None] = [None] * len(ids)
        for batch, results in self.engine.run_all(self.engine.plan(ids, batch_size=batch_size), names):
            for i, out in zip(batch.rows, split_batch(results, batch.input_ids, batch.lengths, unused), strict=True):
                per_text[i] = out
        done = [o for o in per_text if o is not None]
        return gather(done, hidden_size=self.hidden_size, dense=dense, sparse=sparse, colbert=colbert)

    # -- FlagEmbedding API ----------------------------------------------------
    def encode(
        self,
        sentences: Texts,
        batch_size: int | None = None,
        max_length: int | None = None,
        return_dense: bool | None = None,
        return_sparse: bool | None = None,
        return_colbert_vecs: bool | None = None,
    ) -> EncodeResult:
        """Encode texts; returns ``dense_vecs``, ``lexical_weights``, ``colbert_vecs``.

        ``dense_vecs``: float32 ``[n, hidden]``; ``lexical_weights``: list of
        ``{str(token_id): weight}``; ``colbert_vecs``: list of float32 ``[len_i - 1, hidden]``
        arrays. Outputs not asked for are ``None``; ``return_*=None`` takes the
        constructor's. A single string in gives unwrapped values out. Texts longer than
        ``max_length`` tokens (default ``passage_max_length``) are truncated, as
        FlagEmbedding does. With ``truncate_dim``, dense and ColBERT vectors keep their
        first ``truncate_dim`` dims, normalised again where the graph normalises.
        """
        texts, single = as_texts(sentences, "sentences")
        given = {
            "return_dense": return_dense,
            "return_sparse": return_sparse,
            "return_colbert_vecs": return_colbert_vecs,
        }
        asked = {k: self.return_defaults[k] if v is None else v for k, v in given.items()}
        enc = self.embed(
            texts,
            batch_size=batch_size,
            max_length=max_length,
            dense=asked["return_dense"],
            sparse=asked["return_sparse"],
            colbert=asked["return_colbert_vecs"],
        )
        dense, colbert = enc.dense, enc.colbert
        if self.truncate_dim is not None:
            dense = None if dense is None else self._truncated(dense)
            colbert = None if colbert is None else [self._truncated(c) for c in colbert]
        result: EncodeResult = {"dense_vecs": dense, "lexical_weights": enc.lexical, "colbert_vecs": colbert}
        if single:
            result = {k: (None if v is None else v[0]) for k, v in result.items()}
        return result

    def encode_queries(
        self,
        queries: Texts,
        batch_size: int | None = None,
        max_length: int | None = None,
        return_dense: bool | None = None,
        return_sparse: bool | None = None,
        return_colbert_vecs: bool | None = None,
    ) -> EncodeResult:
        """``encode`` with ``query_max_length`` as the default truncation.

        The package's query instruction, if any (e.g. bge-*-en-v1.5's "Represent this
        sentence for searching relevant passages: "), is prepended to every query, as
        FlagEmbedding does; BGE-M3 has none.
        """
        if self.query_instruction is not None:
            texts, single = as_texts(queries, "queries")
            prefixed = [format_instruction(self.query_instruction_format, self.query_instruction, q) for q in texts]
            queries = prefixed[0] if single else prefixed
        return self.encode(
            queries,
            batch_size,
            self.query_max_length if max_length is None else max_length,
            return_dense,
            return_sparse,
            return_colbert_vecs,
        )

    def encode_corpus(
        self,
        corpus: Texts,
        batch_size: int | None = None,
        max_length: int | None = None,
        return_dense: bool | None = None,
        return_sparse: bool | None = None,
        return_colbert_vecs: bool | None = None,
    ) -> EncodeResult:
        """``encode`` with ``passage_max_length`` as the default truncation."""
        return self.encode(corpus, batch_size, max_length, return_dense, return_sparse, return_colbert_vecs)

    def compute_score(
        self,
        sentence_pairs: Sequence[tuple[str, str]] | tuple[str, str],
        batch_size: int | None = None,
        max_query_length: int | None = None,
        max_passage_length: int | None = None,
        weights_for_different_modes: Sequence[float] | None = None,
    ) -> dict[str, Any]:
        """All five scores per (query, passage) pair, as FlagEmbedding computes them.

        Returns ``colbert``, ``sparse``, ``dense``, ``sparse+dense`` and
        ``colbert+sparse+dense``: lists of floats, or floats for a single pair.
        ``weights_for_different_modes`` is ``[dense, sparse, colbert]`` (default 1, 1, 1).
        """
        if not (self.engine.kind.has(SPARSE) and self.engine.kind.has(COLBERT)):
            raise UnsupportedOutput(
                f"compute_score needs sparse and ColBERT outputs, and {self.package.root} is a dense-only model: "
                "score with encode_queries(...)['dense_vecs'] @ encode_corpus(...)['dense_vecs'].T"
            )
        if weights_for_different_modes is not None and (
            isinstance(weights_for_different_modes, (str, bytes, Mapping))
            or not isinstance(weights_for_different_modes, Iterable)
        ):
            raise InputError(
                "weights_for_different_modes must be 3 numbers [dense, sparse, colbert], "
                f"got {weights_for_different_modes!r:.80}"
            )
        weights = [1.0, 1.0, 1.0] if weights_for_different_modes is None else list(weights_for_different_modes)
        scoring.check_mode_weights(weights)
        pairs, single = as_pairs(sentence_pairs)
        batch_size = self.batch_size if batch_size is None else check_positive(batch_size, "batch_size")
        q_len = self.query_max_length if max_query_length is None else max_query_length
        p_len = self.passage_max_length if max_passage_length is None else max_passage_length
        every = {"dense": True, "sparse": True, "colbert": True}
        q = self.embed([x[0] for x in pairs], batch_size=batch_size, max_length=q_len, **every)
        p = self.embed([x[1] for x in pairs], batch_size=batch_size, max_length=p_len, **every)
        scores = pair_scores(q, p, weights=weights, chunk=batch_size)
        if single:
            return {k: v[0] for k, v in scores.items()}
        return dict(scores)

    def _truncated(self, vecs: np.ndarray) -> np.ndarray:
        """FlagEmbedding's ``truncate_dim``: the first dims, normalised again if the graph normalises."""
        cut = np.ascontiguousarray(vecs[..., : self.truncate_dim])
        if self.package.manifest.normalize:
            norms = np.linalg.norm(cut, axis=-1, keepdims=True)
            cut = (cut / np.maximum(norms, 1e-12)).astype(np.float32)  # F.normalize's eps
        return cut

    @staticmethod
    def colbert_score(q_reps: np.ndarray, p_reps: np.ndarray) -> float:
        """``sum_i max_j (q_i . p_j) / len(q)``."""
        return scoring.colbert_score(q_reps, p_reps)

    @staticmethod
    def compute_lexical_matching_score(
        lexical_weights_1: Mapping[str, float] | Sequence[Mapping[str, float]],
        lexical_weights_2: Mapping[str, float] | Sequence[Mapping[str, float]],
    ) -> float | np.ndarray:
        """Sum of products of shared token weights; a matrix for two lists."""
        return scoring.lexical_matching_score(lexical_weights_1, lexical_weights_2)

    def convert_id_to_token(
        self, lexical_weights: Mapping[str, float] | Sequence[Mapping[str, float]]
    ) -> dict[str, float] | list[dict[str, float]]:
        """Replace token ids by token strings. Like FlagEmbedding, a list of one dict gives a dict."""
        items = [lexical_weights] if isinstance(lexical_weights, Mapping) else list(lexical_weights)
        converted = []
        for i, item in enumerate(items):
            if not isinstance(item, Mapping):
                raise InputTypeError(
                    f"lexical_weights[{i}] must be a dict of token id -> weight, got {type(item).__name__}"
                )
            try:
                converted.append({self.tokenizer.decode_one(int(k)): w for k, w in item.items()})
            except ValueError:
                raise InputError(f"lexical_weights[{i}] has a key that is not a token id: {list(item)[:5]}") from None
        return converted[0] if len(converted) == 1 else converted

    def __repr__(self) -> str:
        return f"M3Model({str(self.package.root)!r}, variant={self.variant!r}, providers={self.providers})"
