"""Tokenization with Hugging Face ``tokenizers`` from the package's tokenizer.json.

Matches ``XLMRobertaTokenizerFast(texts, truncation=True, max_length=L)``: special
tokens are added by the template (``<s> A </s>``) and truncation keeps the first
``L - 2`` text tokens, so a truncated text still ends in ``</s>``. No token type ids.
Truncation is applied here after encoding instead of through the tokenizer's own
settings, so one tokenizer serves calls with different ``max_length`` from any thread.

``encode_pairs`` builds a cross-encoder's inputs as FlagEmbedding 1.4's ``FlagReranker``
does (``inference/reranker/encoder_only/base.py``, transformers 4.57): query and passage
are tokenized alone without special tokens, the query cut to its first
``query_max_length`` tokens and the passage to its first ``max_length``; then
``prepare_for_model(q, d, truncation="only_second", max_length=max_length)`` joins them
(``<s> q </s></s> d </s>`` for XLM-R) and removes ``len(q) + len(d) + 4 - max_length``
tokens from the passage's end, so the pair still ends in ``</s>``. Only if the passage
is not longer than that count (``query_max_length`` above ``max_length - 4``) does
transformers log an error and cut nothing: the pair then exceeds ``max_length``, with
the passage at its first ``max_length`` tokens. ``format_instruction`` is how the
instructions are put in front of the texts before that.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from .errors import InputError

# transformers' ``clean_up_tokenization`` (applied by decode when the tokenizer config
# sets ``clean_up_tokenization_spaces``).
_CLEANUPS = (
    (" .", "."),
    (" ?", "?"),
    (" !", "!"),
    (" ,", ","),
    (" ' ", "'"),
    (" n't", "n't"),
    (" 'm", "'m"),
    (" 's", "'s"),
    (" 've", "'ve"),
    (" 're", "'re"),
)


def format_instruction(instruction_format: str, instruction: str | None, text: str) -> str:
    """FlagReranker's ``get_detailed_instruct``: ``instruction_format.format(instruction, text)``.

    ``None`` leaves the text as it is. As in FlagEmbedding, a literal backslash-n in the
    format (``"{}\\n{}"`` typed on a command line) becomes a newline first.
    """
    if instruction is None:
        return text
    if "\\n" in instruction_format:
        instruction_format = instruction_format.replace("\\n", "\n")
    try:
        return instruction_format.format(instruction, text)
    except (IndexError, KeyError, ValueError) as exc:
        raise InputError(f"instruction format {instruction_format!r} needs two {{}} fields: {exc}") from None


class M3Tokenizer:
    def __init__(self, tokenizer_json: Path, *, clean_up_tokenization_spaces: bool = False) -> None:
        try:
            self._tok = Tokenizer.from_file(str(tokenizer_json))
        except Exception as exc:
            raise ValueError(f"cannot read tokenizer {tokenizer_json}: {exc}") from None
        self._tok.no_truncation()
        self._tok.no_padding()
        self.clean_up = clean_up_tokenization_spaces

    def encode(self, texts: Sequence[str], max_length: int) -> list[list[int]]:
        """Token ids per text, with ``<s>``/``</s>``, at most ``max_length`` long."""
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2 (room for <s> and </s>), got {max_length}")
        out: list[list[int]] = []
        for enc in self._tok.encode_batch(list(texts), add_special_tokens=True):
            ids = enc.ids
            if len(ids) > max_length:
                ids = ids[: max_length - 1] + ids[-1:]
            out.append(ids)
        return out

    def encode_pairs(
        self, pairs: Sequence[Sequence[str]], *, max_length: int, query_max_length: int | None = None
    ) -> list[list[int]]:
        """Token ids per (query, passage) pair, as FlagReranker feeds its model (see the module doc).

        ``query_max_length`` defaults to ``max_length * 3 // 4``, FlagReranker's default.
        Instructions are not applied here (``format_instruction``). Ids only: a BERT
        backbone's token type ids are not built.
        """
        if max_length < 1:
            raise ValueError(f"max_length must be at least 1, got {max_length}")
        if query_max_length is None:
            query_max_length = max_length * 3 // 4
        if query_max_length < 1:
            raise ValueError(f"query_max_length must be at least 1, got {query_max_length}")
        for index, pair in enumerate(pairs):
            if isinstance(pair, (str, bytes)) or not isinstance(pair, Sequence) or len(pair) != 2:
                raise TypeError(f"pair {index} is not a (query, passage) pair: {pair!r:.80}")
            if not isinstance(pair[0], str) or not isinstance(pair[1], str):
                raise TypeError(
                    f"pair {index} holds {type(pair[0]).__name__} and {type(pair[1]).__name__}, not two str"
                )
        prefix, middle, suffix = self._pair_template
        n_special = len(prefix) + len(middle) + len(suffix)
        queries = self._tok.encode_batch([q for q, _ in pairs], add_special_tokens=False)
        passages = self._tok.encode_batch([p for _, p in pairs], add_special_tokens=False)
        out: list[list[int]] = []
        for q_enc, p_enc in zip(queries, passages, strict=True):
            q = q_enc.ids[:query_max_length]
            p = p_enc.ids[:max_length]
            remove = len(q) + len(p) + n_special - max_length
            # transformers' truncate_sequences(only_second) cuts only a passage longer than
            # the count; otherwise it logs an error and leaves the pair over-long.
            if 0 < remove < len(p):
                p = p[:-remove]
            out.append(prefix + q + middle + p + suffix)
        return out

    @cached_property
    def _pair_template(self) -> tuple[list[int], list[int], list[int]]:
        """The special tokens before, between and after a pair, from tokenizer.json's post-processor.

        For XLM-R ``([<s>], [</s>, </s>], [</s>])``, which is also what the
        ``build_inputs_with_special_tokens`` of transformers' XLM-R tokenizer joins.
        """
        first = self._tok.encode("a", add_special_tokens=False)
        second = self._tok.encode("b", add_special_tokens=False)
        if not first.ids or not second.ids:
            raise ValueError("the tokenizer encodes 'a' or 'b' to no tokens; cannot read its pair template")
        joined = self._tok.post_process(first, second, add_special_tokens=True)
        ids = joined.ids
        # special_tokens_mask, not sequence_ids: post_process leaves the first sequence's
        # sequence ids unset (None) in tokenizers 0.22.
        texts = [i for i, special in enumerate(joined.special_tokens_mask) if not special]
        a, b = texts[: len(first.ids)], texts[len(first.ids) :]
        if (
            len(texts) != len(first.ids) + len(second.ids)
            or [ids[i] for i in a] != first.ids
            or [ids[i] for i in b] != second.ids
            or a != list(range(a[0], a[0] + len(a)))
            or b != list(range(b[0], b[0] + len(b)))
        ):
            raise ValueError(
                f"the tokenizer's pair template is not <specials> A <specials> B <specials>: {joined.tokens}"
            )
        return ids[: a[0]], ids[a[-1] + 1 : b[0]], ids[b[-1] + 1 :]

    def tokens(self, texts: Sequence[str], *, add_special_tokens: bool = True) -> list[list[dict[str, Any]]]:
        """Per text, each token's ``{id, text, special, start, stop}`` (character offsets into
        the text; ``None`` for a special token), the shape of text-embeddings-inference's /tokenize."""
        out = []
        for text, enc in zip(
            texts, self._tok.encode_batch(list(texts), add_special_tokens=add_special_tokens), strict=True
        ):
            row = []
            for token_id, (start, stop), special in zip(enc.ids, enc.offsets, enc.special_tokens_mask, strict=True):
                row.append(
                    {
                        "id": token_id,
                        "text": text[start:stop] if not special else self._tok.id_to_token(token_id),
                        "special": bool(special),
                        "start": None if special else start,
                        "stop": None if special else stop,
                    }
                )
            out.append(row)
        return out

    def decode(self, ids: Sequence[Sequence[int]], *, skip_special_tokens: bool = True) -> list[str]:
        """The text of each list of ids (``tokenizers``' decode)."""
        return list(self._tok.decode_batch([list(row) for row in ids], skip_special_tokens=skip_special_tokens))

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def decode_one(self, token_id: int) -> str:
        """Like transformers' ``tokenizer.decode([token_id])`` (special tokens kept)."""
        text = self._tok.decode([int(token_id)], skip_special_tokens=False)
        if self.clean_up:
            for old, new in _CLEANUPS:
                text = text.replace(old, new)
        return text

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)
