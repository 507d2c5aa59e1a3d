"""The PyTorch modules that are exported: XLM-R backbone plus the dense, sparse and ColBERT heads
(``M3Graph``), a dense-only encoder (``DenseGraph``), or a cross-encoder reranker (``RerankerGraph``).

Follows FlagEmbedding's ``EncoderOnlyEmbedderM3Model`` (``normalize_embeddings=True``):
    h       = backbone(input_ids, attention_mask).last_hidden_state    (batch, seq, hidden)
    dense   = normalize(h[:, 0])                                       (batch, hidden)
    sparse  = relu(sparse_linear(h)).squeeze(-1)                       (batch, seq)
    colbert = normalize(colbert_linear(h[:, 1:]) * mask[:, 1:, None])  (batch, seq - 1, hidden)
with ``normalize(x) = x / max(||x||, 1e-12)`` (``F.normalize``), so padded ColBERT rows
are exact zeros, never NaN.
"""

from __future__ import annotations

import torch
from torch import nn

NORM_EPS = 1e-12


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """``F.normalize(x, dim=-1)`` computed in fp32 whatever the dtype of ``x``.

    In fp16 the sum of squares of a 1024-d hidden state overflows (> 65504) and the
    epsilon 1e-12 rounds to 0 (a zero row gives 0/0 = NaN); fp32 avoids both.
    """
    x32 = x.float()
    norm = torch.sqrt(torch.sum(x32 * x32, dim=-1, keepdim=True))
    return x32 / torch.clamp(norm, min=NORM_EPS)


class M3Graph(nn.Module):
    """``(input_ids, attention_mask) -> (dense_vecs, sparse_weights, colbert_vecs)``, all float32."""

    def __init__(self, backbone: nn.Module, colbert_linear: nn.Linear, sparse_linear: nn.Linear) -> None:
        super().__init__()
        self.backbone = backbone
        self.colbert_linear = colbert_linear
        self.sparse_linear = sparse_linear

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = self.backbone(input_ids=input_ids, attention_mask=attention_mask, return_dict=True).last_hidden_state
        dense = l2_normalize(h[:, 0])
        sparse = torch.relu(self.sparse_linear(h)).squeeze(-1).float()
        colbert = self.colbert_linear(h[:, 1:]) * attention_mask[:, 1:, None].to(h.dtype)
        return dense, sparse, l2_normalize(colbert)


class DenseGraph(nn.Module):
    """``(input_ids, attention_mask) -> dense_vecs`` for dense-only encoders (sentence-transformers style).

    ``pool``: ``"cls"`` takes ``h[:, 0]``; ``"mean"`` is sentence-transformers' masked mean,
    ``sum(h * mask) / max(sum(mask), 1e-9)``. ``normalize`` then applies ``l2_normalize``.
    BERT's token type ids are all zero for one segment, as sentence-transformers sends them.
    """

    def __init__(self, backbone: nn.Module, pooling: str, normalize: bool) -> None:
        super().__init__()
        if pooling not in ("cls", "mean"):
            raise ValueError(f"pooling must be 'cls' or 'mean', got {pooling!r}")
        self.backbone = backbone
        self.pooling = pooling
        self.normalize = normalize
        self.uses_token_types = getattr(backbone.config, "type_vocab_size", 1) > 1

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        kwargs = {"token_type_ids": torch.zeros_like(input_ids)} if self.uses_token_types else {}
        h = self.backbone(
            input_ids=input_ids, attention_mask=attention_mask, return_dict=True, **kwargs
        ).last_hidden_state
        if self.pooling == "cls":
            pooled = h[:, 0]
        else:
            mask = attention_mask.unsqueeze(-1).to(h.dtype)
            pooled = (h * mask).sum(1) / torch.clamp(mask.sum(1), min=1e-9)
        return l2_normalize(pooled) if self.normalize else pooled.float()


class RerankerGraph(nn.Module):
    """``(input_ids, attention_mask) -> scores`` float32 ``[batch]``: the raw logit of a
    one-label ``*ForSequenceClassification`` (``logits.view(-1)``, as FlagReranker's
    ``compute_score`` with ``normalize=False``), for ``<s> query </s></s> passage </s>``.

    XLM-R has one token type and gets none (FlagReranker's tokenizer sends none). A BERT
    classifier (``type_vocab_size`` 2) is fed ``[CLS] q [SEP] d [SEP]`` with token types 0
    up to the first separator and 1 after it, what its tokenizer's ``prepare_for_model``
    sends, so the graph derives them from ``input_ids``: 1 where a ``sep_id`` came before,
    0 at padding (the tokenizer's pad type).
    """

    def __init__(self, classifier: nn.Module, *, sep_id: int | None = None) -> None:
        super().__init__()
        self.classifier = classifier
        self.uses_token_types = getattr(classifier.config, "type_vocab_size", 1) > 1
        if self.uses_token_types and sep_id is None:
            raise ValueError("a classifier with token types needs the separator id (sep_id) to derive them")
        self.sep_id = -1 if sep_id is None else sep_id  # -1: no token id; unused without token types

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        kwargs = {}
        if self.uses_token_types:
            sep = torch.eq(input_ids, self.sep_id).to(torch.int64)
            # Separators strictly before a position: 0 through the first [SEP], 1 after it.
            before = torch.cumsum(sep, dim=1) - sep
            kwargs["token_type_ids"] = (before > 0).to(torch.int64) * attention_mask
        logits = self.classifier(input_ids=input_ids, attention_mask=attention_mask, return_dict=True, **kwargs).logits
        return logits.view(-1).float()
