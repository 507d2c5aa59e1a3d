"""The reference outputs an export stores in its package (``m3_runtime.references``).

PyTorch (fp32) runs the runtime's probes, tokenized as the runtime tokenizes them
(``M3Tokenizer.encode`` at the package's ``max_length``; reranker pairs with
``encode_pairs`` at each probe's length), and the outputs are written to
``reference.npz`` for ``m3 check``. Probes up to ``VALIDATION_MAX_LENGTH`` tokens run
in padded batches as in validation; each longer one runs alone (no padding: a batch
padded to 8,192 tokens would hold eight times the attention memory).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
from m3_runtime.contract import CPU, MANIFEST_NAME, RERANKER_KIND, Manifest, SpecialTokens
from m3_runtime.references import (
    embedder_arrays,
    embedder_probes,
    reranker_arrays,
    reranker_probes,
    write_references,
)
from m3_runtime.tokenize import M3Tokenizer

from . import validate
from .graphs import ExportError

SHORT = 512


def _groups(ids: list[list[int]]) -> list[list[int]]:
    """Probe indices run together: all short ones in one call, each long one alone."""
    short = [i for i, x in enumerate(ids) if len(x) <= SHORT]
    return ([short] if short else []) + [[i] for i, x in enumerate(ids) if len(x) > SHORT]


def torch_references(
    model, kind: str, tokenizer: M3Tokenizer, special: SpecialTokens, max_length: int
) -> dict[str, np.ndarray]:
    """The reference file's arrays: ``model`` (the exporter's PyTorch wrapper) on the probes."""
    if kind == RERANKER_KIND:
        probes = reranker_probes(max_length)
        ids = [tokenizer.encode_pairs([(p.query, p.passage)], max_length=p.max_length)[0] for p in probes]
        scores = np.zeros(len(ids), np.float32)
        for group in _groups(ids):
            scores[group] = validate.torch_scores(model, [ids[i] for i in group], special.pad).values
        return reranker_arrays(probes, ids, scores)
    names, texts = zip(*embedder_probes(max_length), strict=True)
    ids = tokenizer.encode(list(texts), max_length)
    if len(ids[-1]) != max_length:  # the last probe must fill the package's max_length
        raise ExportError(f"the long probe has {len(ids[-1])} tokens, not the package's max_length {max_length}")
    n = len(ids)
    dense: list[np.ndarray] = [np.empty(0)] * n
    sparse: list[np.ndarray] = [np.empty(0)] * n
    colbert: list[np.ndarray] = [np.empty(0)] * n
    has_heads = False
    for group in _groups(ids):
        out = validate.torch_outputs(model, [ids[i] for i in group], special.pad)
        has_heads = bool(out.sparse)
        for row, i in enumerate(group):
            dense[i] = out.dense[row]
            if out.sparse:
                sparse[i], colbert[i] = out.sparse[row], out.colbert[row]
    return embedder_arrays(
        kind,
        list(names),
        list(texts),
        max_length,
        ids,
        dense,
        sparse if has_heads else None,
        colbert if has_heads else None,
    )


def record_int8_check(work: Path, manifest: Manifest, say: Callable[[str], None]) -> Manifest:
    """Run ``m3 check`` on the int8 variant of the package in ``work`` (its manifest
    written) on this machine's CPU and record the measures in the manifest
    (``variants.int8.at_export``): int8's rounding differs with the inputs, so m3 check
    elsewhere holds int8 to its fixed bounds or to what it measured here, whichever is
    looser (``m3_runtime.check_measures.bound_for``). Returns the manifest as rewritten."""
    from m3_runtime.check import check_package

    with tempfile.TemporaryDirectory() as cache:
        report = check_package(work, variants=["int8"], providers=[CPU], cache_dir=cache)
    (row,) = report.results
    say(
        "      int8 on the probes vs PyTorch (m3 check here): "
        + ", ".join(f"{k} {v:.4g}" for k, v in row.metrics.items())
    )
    variants = dict(manifest.variants)
    variants["int8"] = replace(variants["int8"], at_export=dict(row.metrics))
    manifest = replace(manifest, variants=variants)
    (work / MANIFEST_NAME).write_text(
        json.dumps(manifest.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    return manifest


__all__ = ["record_int8_check", "torch_references", "write_references"]
