"""Batch planning and padding: pure functions, no ONNX Runtime.

Texts are sorted longest first and packed into batches bounded both by
``batch_size`` and by a budget of padded tokens (rows x longest row). A text longer
than the budget runs alone, unpadded. What makes CPU batches slow is their size, not
their padding (full-size model, 2 vCPUs: fp32 queries 389 tokens/s under a 256-token
budget, 149 under 16,384), hence the runtime's small CPU budget (``M3Model``).
``pad=False`` batches only texts of one length; ``pad_limit`` keeps long texts
unpadded so they keep the flash attention kernel.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def plan_batches(
    lengths: Sequence[int], *, batch_size: int, max_tokens: int, pad: bool = True, pad_limit: int | None = None
) -> list[np.ndarray]:
    """Indices of each batch, longest texts first; every index appears exactly once.

    With ``pad=False`` a batch only holds texts of one length: nothing is padded. With
    ``pad_limit``, texts longer than it are batched only with texts of their own length
    (the graph's flash attention path, see ``VariantInfo.flash_min_tokens``).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_tokens < 1:
        raise ValueError(f"max_batch_tokens must be >= 1, got {max_tokens}")
    lengths_arr = np.asarray(lengths, dtype=np.int64)
    order = np.argsort(-lengths_arr, kind="stable")
    batches: list[np.ndarray] = []
    start = 0
    n = len(order)
    while start < n:
        longest = int(lengths_arr[order[start]])
        rows = max(1, min(batch_size, max_tokens // max(longest, 1), n - start))
        if not pad or (pad_limit is not None and longest > pad_limit):
            same = int(np.searchsorted(-lengths_arr[order[start : start + rows]], -longest, side="right"))
            rows = max(1, same)
        batches.append(order[start : start + rows])
        start += rows
    return batches


def take_batch(
    lengths: Sequence[int], *, batch_size: int, max_tokens: int, pad: bool = True, pad_limit: int | None = None
) -> int:
    """How many of ``lengths``, taken in the caller's order, make the next batch (at least one).

    The scheduler's counterpart of ``plan_batches`` for a queue in priority order: the
    longest prefix with at most ``batch_size`` rows and ``rows x longest <= max_tokens``,
    of one length only when ``pad`` is off or a text is longer than ``pad_limit``.
    """
    if not lengths:
        return 0
    first = longest = int(lengths[0])
    n = 1
    for length in lengths[1:]:
        wider = max(longest, int(length))
        one_length = not pad or (pad_limit is not None and wider > pad_limit)
        if n >= batch_size or (one_length and length != first) or (n + 1) * wider > max_tokens:
            break
        longest, n = wider, n + 1
    return n


def pad_batch(ids: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(batch, longest) int64 ``input_ids`` and ``attention_mask``, padded on the right."""
    width = max(len(row) for row in ids)
    input_ids = np.full((len(ids), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(ids), width), dtype=np.int64)
    for i, row in enumerate(ids):
        input_ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
    return input_ids, mask
