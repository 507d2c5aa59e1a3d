"""``M3Model``: FlagEmbedding's ``BGEM3FlagModel`` API on an ONNX model package."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import scoring
from .batching import pad_batch, plan_batches
from .contract import COLBERT, DENSE, INPUT_NAMES, SPARSE, TOKENIZER_FILE, Variant
from .package import PackageError, load_package
from .session import (
    CPU,
    GPU_PROVIDERS,
    TENSORRT,
    SessionConfig,
    available_providers,
    create_session,
    default_cache_dir,
    default_variant,
    release_heap,
)
from .tokenize import M3Tokenizer

# Default padded-token budget per forward pass (``max_batch_tokens=None``).
GPU_BATCH_TOKENS = 16384
CPU_BATCH_TOKENS = 256
# After a forward pass over at least this many tokens the C heap's free memory goes
# back to the OS (``session.release_heap``).
RELEASE_AFTER_TOKENS = 4096

EncodeResult = dict[str, Any]
Texts = str | Sequence[str]


@dataclass
class _Encoded:
    """Per-text outputs in input order; ``None`` where an output was not asked for."""

    dense: np.ndarray | None
    lexical: list[scoring.LexicalWeights] | None
    colbert: list[np.ndarray] | None


def _as_texts(sentences: object, name: str) -> tuple[list[str], bool]:
    if isinstance(sentences, str):
        return [sentences], True
    if (
        isinstance(sentences, (bytes, bytearray))
        or not isinstance(sentences, Iterable)
        or isinstance(sentences, Mapping)
    ):
        raise TypeError(f"{name} must be a str or a list of str, got {type(sentences).__name__}")
    texts = list(sentences)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"{name}[{i}] is {type(text).__name__}, expected str")
    return texts, False


class M3Model:
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
    """

    def __init__(
        self,
        package_dir: str | Path,
        variant: Variant | None = None,
        providers: Sequence[str] | None = None,
        *,
        batch_size: int = 256,
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
    ) -> None:
        self.package = load_package(package_dir)
        manifest = self.package.manifest
        have = available_providers()
        self.variant: Variant = variant or default_variant(
            list(manifest.variants), list(providers) if providers else have
        )
        info = self.package.variant(self.variant)
        cache_root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.package.verify(manifest.tokenizer_files + info.files, full=verify, record=cache_root / "verified.json")

        self.max_length = manifest.max_length
        self.hidden_size = manifest.hidden_size
        self.batch_size = self._check_positive(batch_size, "batch_size")
        if max_batch_tokens is not None:
            self._check_positive(max_batch_tokens, "max_batch_tokens")
        self.query_max_length = self._check_length(
            min(512, self.max_length) if query_max_length is None else query_max_length, "query_max_length"
        )
        self.passage_max_length = self._check_length(
            self.max_length if passage_max_length is None else passage_max_length, "passage_max_length"
        )
        self.special = manifest.special_tokens
        self.kind = manifest.model_kind
        self.outputs = manifest.output_names
        self.query_instruction = manifest.query_instruction
        # Most texts per ONNX Runtime call whatever batch_size a call asks for (None: no cap).
        self._rows_cap: int | None = 1 if (exact_batches and info.dynamic_activations) else None
        self._pad_limit = info.flash_min_tokens
        self.tokenizer = M3Tokenizer(
            self.package.root / TOKENIZER_FILE, clean_up_tokenization_spaces=manifest.clean_up_tokenization_spaces
        )

        if providers is None:
            wanted = [p for p in GPU_PROVIDERS if p in info.providers and p in have] + [CPU]
        else:
            wanted = list(providers)
        config = SessionConfig(
            max_length=self.max_length,
            trt_max_batch=min(batch_size, 32),
            device_id=device_id,
            cache_dir=cache_root,
            intra_op_threads=intra_op_threads,
            allow_spinning=allow_spinning,
        )
        graph = self.package.graph_path(self.variant)
        cache_key = next(f.sha256[:16] for f in info.files if f.path == info.graph)
        self.session, self.providers = create_session(graph, wanted, config, cache_key=cache_key)
        if TENSORRT in self.providers:  # stay inside the TensorRT shape profile
            self._rows_cap = min(self._rows_cap or config.trt_max_batch, config.trt_max_batch)
        self._check_graph(graph)
        self.pad_batches = pad_batches
        on_gpu = any(p in GPU_PROVIDERS for p in self.providers)
        if max_batch_tokens is None:
            max_batch_tokens = GPU_BATCH_TOKENS if on_gpu else CPU_BATCH_TOKENS
        self.max_batch_tokens: int = max_batch_tokens

    # -- checks ---------------------------------------------------------------
    @staticmethod
    def _check_positive(value: int, name: str) -> int:
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
        return value

    def _check_length(self, value: int, name: str) -> int:
        if not isinstance(value, int) or isinstance(value, bool) or not 2 <= value <= self.max_length:
            raise ValueError(
                f"{name} must be an integer in 2..{self.max_length} (the package's maximum), got {value!r}"
            )
        return value

    def _check_graph(self, graph: Path) -> None:
        inputs = [(i.name, i.type) for i in self.session.get_inputs()]
        expected_inputs = [(name, "tensor(int64)") for name in INPUT_NAMES]
        outputs = sorted(o.name for o in self.session.get_outputs())
        expected_outputs = sorted(self.outputs)
        if inputs != expected_inputs or outputs != expected_outputs:
            raise PackageError(
                f"{graph} does not have the M3 graph interface: expected inputs {expected_inputs} and outputs "
                f"{expected_outputs}, found inputs {inputs} and outputs {outputs}"
            )

    # -- core -----------------------------------------------------------------
    def _run(self, names: list[str], input_ids: np.ndarray, mask: np.ndarray) -> list[np.ndarray]:
        try:
            return self.session.run(names, {INPUT_NAMES[0]: input_ids, INPUT_NAMES[1]: mask})
        except Exception as exc:
            raise RuntimeError(f"ONNX Runtime failed on a batch of shape {input_ids.shape}: {exc}") from None
        finally:
            if input_ids.size >= RELEASE_AFTER_TOKENS:
                release_heap()

    def _encode(
        self,
        texts: list[str],
        *,
        batch_size: int,
        max_length: int,
        dense: bool,
        sparse: bool,
        colbert: bool,
    ) -> _Encoded:
        if not (dense or sparse or colbert):
            raise ValueError("ask for at least one of return_dense, return_sparse, return_colbert_vecs")
        if (sparse or colbert) and SPARSE not in self.outputs:
            raise ValueError(
                f"{self.package.root} is a dense-only model ({self.package.manifest.source.get('id')}): "
                "it has no sparse or ColBERT output; use return_sparse=False, return_colbert_vecs=False"
            )
        self._check_positive(batch_size, "batch_size")
        self._check_length(max_length, "max_length")
        n = len(texts)
        out = _Encoded(
            dense=np.zeros((n, self.hidden_size), dtype=np.float32) if dense else None,
            lexical=[{} for _ in range(n)] if sparse else None,
            colbert=[np.zeros((0, self.hidden_size), dtype=np.float32) for _ in range(n)] if colbert else None,
        )
        if n == 0:
            return out
        ids = self.tokenizer.encode(texts, max_length)
        names = [name for name, on in ((DENSE, dense), (SPARSE, sparse), (COLBERT, colbert)) if on]
        unused = self.special.unused_for_sparse
        if self._rows_cap is not None:
            batch_size = min(batch_size, self._rows_cap)
        for batch in plan_batches(
            [len(x) for x in ids],
            batch_size=batch_size,
            max_tokens=self.max_batch_tokens,
            pad=self.pad_batches,
            pad_limit=self._pad_limit,
        ):
            input_ids, mask = pad_batch([ids[i] for i in batch], self.special.pad)
            results = dict(zip(names, self._run(names, input_ids, mask), strict=True))
            lengths = mask.sum(axis=1)
            if out.dense is not None:
                out.dense[batch] = results[DENSE]
            if out.lexical is not None:
                weights = results[SPARSE]
                for row, i in enumerate(batch):
                    length = int(lengths[row])
                    out.lexical[i] = scoring.lexical_weights(weights[row, :length], input_ids[row, :length], unused)
            if out.colbert is not None:
                vecs = results[COLBERT]
                for row, i in enumerate(batch):
                    rows = vecs[row, : int(lengths[row]) - 1]
                    # A lone text's rows are the whole output: no copy (32 MB at 8,192 tokens).
                    out.colbert[i] = rows if len(batch) == 1 else rows.copy()
        return out

    # -- FlagEmbedding API ----------------------------------------------------
    def encode(
        self,
        sentences: Texts,
        batch_size: int | None = None,
        max_length: int | None = None,
        return_dense: bool = True,
        return_sparse: bool = False,
        return_colbert_vecs: bool = False,
    ) -> EncodeResult:
        """Encode texts; returns ``dense_vecs``, ``lexical_weights``, ``colbert_vecs``.

        ``dense_vecs``: float32 ``[n, hidden]``; ``lexical_weights``: list of
        ``{str(token_id): weight}``; ``colbert_vecs``: list of float32 ``[len_i - 1, hidden]``
        arrays. Outputs not asked for are ``None``. A single string in gives unwrapped
        values out. Texts longer than ``max_length`` tokens (default
        ``passage_max_length``) are truncated, as FlagEmbedding does.
        """
        texts, single = _as_texts(sentences, "sentences")
        enc = self._encode(
            texts,
            batch_size=self.batch_size if batch_size is None else batch_size,
            max_length=self.passage_max_length if max_length is None else max_length,
            dense=return_dense,
            sparse=return_sparse,
            colbert=return_colbert_vecs,
        )
        result: EncodeResult = {"dense_vecs": enc.dense, "lexical_weights": enc.lexical, "colbert_vecs": enc.colbert}
        if single:
            result = {k: (None if v is None else v[0]) for k, v in result.items()}
        return result

    def encode_queries(
        self,
        queries: Texts,
        batch_size: int | None = None,
        max_length: int | None = None,
        return_dense: bool = True,
        return_sparse: bool = False,
        return_colbert_vecs: bool = False,
    ) -> EncodeResult:
        """``encode`` with ``query_max_length`` as the default truncation.

        The package's query instruction, if any (e.g. bge-*-en-v1.5's "Represent this
        sentence for searching relevant passages: "), is prepended to every query, as
        FlagEmbedding does; BGE-M3 has none.
        """
        if self.query_instruction:
            texts, single = _as_texts(queries, "queries")
            prefixed = [self.query_instruction + q for q in texts]
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
        return_dense: bool = True,
        return_sparse: bool = False,
        return_colbert_vecs: bool = False,
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
        if SPARSE not in self.outputs:
            raise ValueError(
                f"compute_score needs sparse and ColBERT outputs, and {self.package.root} is a dense-only model: "
                "score with encode_queries(...)['dense_vecs'] @ encode_corpus(...)['dense_vecs'].T"
            )
        weights = [1.0, 1.0, 1.0] if weights_for_different_modes is None else list(weights_for_different_modes)
        if len(weights) != 3 or not all(isinstance(w, (int, float)) for w in weights):
            raise ValueError(f"weights_for_different_modes must be 3 numbers [dense, sparse, colbert], got {weights!r}")
        if (weights[0] + weights[1]) == 0 or sum(weights) == 0:
            raise ValueError(f"weights_for_different_modes must not sum to zero, got {weights!r}")
        single = (
            isinstance(sentence_pairs, (tuple, list))
            and len(sentence_pairs) == 2
            and isinstance(sentence_pairs[0], str)
        )
        pairs: list[Any] = [sentence_pairs] if single else list(sentence_pairs)
        for i, pair in enumerate(pairs):
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise TypeError(f"sentence_pairs[{i}] must be a (query, passage) pair, got {pair!r:.80}")
            for j, text in enumerate(pair):
                if not isinstance(text, str):
                    raise TypeError(f"sentence_pairs[{i}][{j}] is {type(text).__name__}, expected str")
        batch_size = self.batch_size if batch_size is None else self._check_positive(batch_size, "batch_size")
        q_len = self.query_max_length if max_query_length is None else max_query_length
        p_len = self.passage_max_length if max_passage_length is None else max_passage_length
        q = self._encode(
            [x[0] for x in pairs], batch_size=batch_size, max_length=q_len, dense=True, sparse=True, colbert=True
        )
        p = self._encode(
            [x[1] for x in pairs], batch_size=batch_size, max_length=p_len, dense=True, sparse=True, colbert=True
        )
        assert q.dense is not None and p.dense is not None and q.lexical is not None and p.lexical is not None
        assert q.colbert is not None and p.colbert is not None
        scores = scoring.combine_scores(
            dense=np.einsum("ij,ij->i", q.dense, p.dense).astype(np.float64),
            sparse=scoring.paired_lexical_scores(q.lexical, p.lexical),
            colbert=scoring.paired_colbert_scores(q.colbert, p.colbert, chunk=batch_size),
            weights=weights,
        )
        if single:
            return {k: v[0] for k, v in scores.items()}
        return dict(scores)

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
                raise TypeError(f"lexical_weights[{i}] must be a dict of token id -> weight, got {type(item).__name__}")
            try:
                converted.append({self.tokenizer.decode_one(int(k)): w for k, w in item.items()})
            except ValueError:
                raise ValueError(f"lexical_weights[{i}] has a key that is not a token id: {list(item)[:5]}") from None
        return converted[0] if len(converted) == 1 else converted

    def __repr__(self) -> str:
        return f"M3Model({str(self.package.root)!r}, variant={self.variant!r}, providers={self.providers})"
