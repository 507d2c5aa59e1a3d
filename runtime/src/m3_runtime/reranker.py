"""``M3Reranker``: FlagEmbedding's ``FlagReranker`` API over an ``Engine``.

Reproduces FlagEmbedding 1.4's ``BaseReranker`` (``inference/reranker/encoder_only``):
instructions first (``query_instruction_format.format(instruction, query)``, likewise
for passages), then the query is tokenized alone without special tokens and truncated
to ``query_max_length`` (default ``max_length * 3 // 4``), the passage to
``max_length``, and the two are joined as ``<s> q </s></s> d </s>`` with the passage
cut from the right to fit ``max_length`` (``M3Tokenizer.encode_pairs``). The score is
the model's logit, or ``sigmoid(logit)`` with ``normalize=True``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .compat import engine_options
from .contract import SCORES, Variant
from .engine import Engine, check_positive, check_unicode
from .errors import InputError, InputTypeError
from .heads import sigmoid
from .model import as_pairs
from .self_check import SelfCheck
from .tokenize import format_instruction

# FlagReranker's defaults.
RERANK_BATCH_SIZE = 128
RERANK_MAX_LENGTH = 512


@dataclass(frozen=True)
class Ranked:
    """One passage of ``rerank``: its index in the input and its score."""

    index: int
    score: float


class M3Reranker(SelfCheck):
    """Cross-encoder scores of (query, passage) pairs, FlagReranker's numbers without PyTorch.

    Args: as ``M3Model`` for ``variant``, ``providers`` and the loading options, plus
    FlagReranker's ``query_instruction_for_rerank``, ``query_instruction_format``,
    ``passage_instruction_for_rerank``, ``passage_instruction_format``, ``batch_size``
    (128), ``query_max_length`` (``None``: ``max_length * 3 // 4``), ``max_length``
    (``None``: 512, or the package's maximum if lower) and ``normalize`` (``False``);
    and its ``use_fp16`` (the fp16 variant on a GPU; the CPU default without one, said
    once), ``devices`` (``"cpu"``, ``"cuda:N"``: providers and device id) and
    ``trust_remote_code`` (packages hold no code: accepted), as ``M3Model`` takes them.
    """

    def __init__(
        self,
        package_dir: str | Path,
        variant: Variant | None = None,
        providers: Sequence[str] | None = None,
        *,
        query_instruction_for_rerank: str | None = None,
        query_instruction_format: str = "{}{}",
        passage_instruction_for_rerank: str | None = None,
        passage_instruction_format: str = "{}{}",
        batch_size: int = RERANK_BATCH_SIZE,
        query_max_length: int | None = None,
        max_length: int | None = None,
        normalize: bool = False,
        max_batch_tokens: int | None = None,
        verify: bool = True,
        device_id: int = 0,
        cache_dir: str | Path | None = None,
        intra_op_threads: int = 0,
        allow_spinning: bool = False,
        workers: int = 1,
        engine: Engine | None = None,
        # FlagEmbedding 1.4 (FlagReranker)
        use_fp16: bool | None = None,
        devices: str | int | Sequence[str | int] | None = None,
        trust_remote_code: bool = False,
    ) -> None:
        self.engine = engine or Engine(
            package_dir,
            engine_options(
                variant=variant,
                providers=providers,
                devices=devices,
                use_fp16=use_fp16,
                device_id=device_id,
                cache_dir=cache_dir,
                who="M3Reranker",
                batch_size=batch_size,
                max_batch_tokens=max_batch_tokens,
                verify=verify,
                intra_op_threads=intra_op_threads,
                allow_spinning=allow_spinning,
                workers=workers,
            ),
        )
        self.trust_remote_code = trust_remote_code
        if not self.engine.kind.has(SCORES):
            raise InputError(
                f"{self.engine.package.root} is a {self.engine.kind.description}, not a reranker: load it with M3Model"
            )
        default = min(RERANK_MAX_LENGTH, self.engine.max_length)
        self.max_length = self.engine.check_length(default if max_length is None else max_length, "max_length")
        self.query_max_length = (
            None if query_max_length is None else self.engine.check_length(query_max_length, "query_max_length")
        )
        self.batch_size = check_positive(batch_size, "batch_size")
        self.normalize = bool(normalize)
        self.query_instruction = (query_instruction_for_rerank, query_instruction_format)
        self.passage_instruction = (passage_instruction_for_rerank, passage_instruction_format)

    package = property(lambda self: self.engine.package)
    variant = property(lambda self: self.engine.variant)
    providers = property(lambda self: self.engine.providers)
    tokenizer = property(lambda self: self.engine.tokenizer)

    def _detailed(self, pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
        (q_ins, q_fmt), (p_ins, p_fmt) = self.query_instruction, self.passage_instruction
        return [
            (
                q if q_ins is None else format_instruction(q_fmt, q_ins, q),
                p if p_ins is None else format_instruction(p_fmt, p_ins, p),
            )
            for q, p in pairs
        ]

    def tokenize(
        self, sentence_pairs: object, *, max_length: int | None = None, query_max_length: int | None = None
    ) -> list[list[int]]:
        """The token ids FlagReranker feeds the model for each pair (instructions applied)."""
        pairs, _ = as_pairs(sentence_pairs)
        length = self.engine.check_length(self.max_length if max_length is None else max_length, "max_length")
        q_len = query_max_length if query_max_length is not None else self.query_max_length
        q_len = length * 3 // 4 if q_len is None else check_positive(q_len, "query_max_length")
        return self.engine.tokenizer.encode_pairs(self._detailed(pairs), max_length=length, query_max_length=q_len)

    def scores(self, ids: Sequence[Sequence[int]], *, batch_size: int | None = None) -> np.ndarray:
        """Raw logits of tokenized pairs, in input order: ``(n,)`` float32."""
        out = np.zeros(len(ids), dtype=np.float32)
        batches = self.engine.plan(ids, batch_size=self.batch_size if batch_size is None else batch_size)
        for batch, results in self.engine.run_all(batches, [SCORES]):
            out[batch.rows] = results[SCORES]
        return out

    def compute_score(
        self,
        sentence_pairs: Sequence[tuple[str, str]] | tuple[str, str],
        batch_size: int | None = None,
        max_length: int | None = None,
        normalize: bool | None = None,
        query_max_length: int | None = None,
    ) -> list[float]:
        """One score per pair, in input order; a list also for a single pair (FlagEmbedding 1.4).

        Pairs longer than ``max_length`` tokens are truncated as the reference does: the
        query to ``query_max_length`` first, then the passage from the right."""
        ids = self.tokenize(sentence_pairs, max_length=max_length, query_max_length=query_max_length)
        logits = self.scores(ids, batch_size=batch_size)
        norm = self.normalize if normalize is None else normalize
        return [float(x) for x in (sigmoid(logits) if norm else logits.astype(np.float64))]

    def rerank(
        self, query: str, passages: Sequence[str], *, top_n: int | None = None, normalize: bool | None = None
    ) -> list[Ranked]:
        """Passages' indices and scores, best first (ties keep input order); ``top_n`` keeps the first n.

        ``normalize``: sigmoid of the logits; ``None`` takes the constructor's setting."""
        if not isinstance(query, str):
            raise InputTypeError(f"query must be a str, got {type(query).__name__}")
        check_unicode(query, "query")
        if isinstance(passages, str) or not isinstance(passages, Sequence):
            raise InputTypeError(f"passages must be a list of str, got {type(passages).__name__}")
        for i, passage in enumerate(passages):
            if not isinstance(passage, str):
                raise InputTypeError(f"passages[{i}] is {type(passage).__name__}, expected str")
            check_unicode(passage, f"passages[{i}]")
        if top_n is not None:
            check_positive(top_n, "top_n")
        scores = self.compute_score([(query, p) for p in passages], normalize=normalize) if passages else []
        order = sorted(range(len(scores)), key=lambda i: -scores[i])
        return [Ranked(i, scores[i]) for i in order[:top_n]]

    def __repr__(self) -> str:
        return f"M3Reranker({str(self.package.root)!r}, variant={self.variant!r}, providers={self.providers})"
