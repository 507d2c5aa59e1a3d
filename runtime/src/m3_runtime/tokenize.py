"""Tokenization with Hugging Face ``tokenizers`` from the package's tokenizer.json.

Matches ``XLMRobertaTokenizerFast(texts, truncation=True, max_length=L)``: special
tokens are added by the template (``<s> A </s>``) and truncation keeps the first
``L - 2`` text tokens, so a truncated text still ends in ``</s>``. No token type ids.
Truncation is applied here after encoding instead of through the tokenizer's own
settings, so one tokenizer serves calls with different ``max_length`` from any thread.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from tokenizers import Tokenizer

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
