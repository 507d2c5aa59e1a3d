"""``m3-export --eval DATA``: retrieval quality of each variant against fp32 on the
user's BEIR-layout set, recorded in the manifest, and a bound on the nDCG@10 drop.

Runs after the package is complete in its temporary folder (fp32 written): ``m3 eval``'s
machinery (``m3_runtime.evaluation``) ranks DATA's split with fp32 and every other
variant that runs on this machine's providers, in every mode the package serves. A
variant whose nDCG@10 falls below fp32's by more than ``max_ndcg_drop`` in any mode
fails the export (the figures in the message; nothing is written) unless
``keep_anyway``, which records the overrun instead.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from m3_runtime.contract import COLBERT, MANIFEST_NAME, SPARSE, Manifest

GATE_METRIC = "ndcg@10"


class QualityGateError(ValueError):
    """A variant's nDCG@10 dropped below fp32's by more than the bound."""


def check_eval_inputs(data: str | Path, split: str) -> None:
    """Before any heavy work: the extra is installed and DATA reads (file and line named if not)."""
    try:
        import pytrec_eval  # noqa: F401
        import scipy  # noqa: F401
    except ImportError:
        raise QualityGateError('--eval needs pytrec_eval and SciPy: pip install "m3-runtime[eval]"') from None
    from m3_runtime.evaluation import data as evdata

    evdata.load(data, split)


def _runnable_variants(manifest: Manifest) -> tuple[list[str], dict[str, str]]:
    from m3_runtime.session import available_providers

    providers = set(available_providers())
    run, skipped = [], {}
    for name, info in manifest.variants.items():
        if name == "fp32" or providers & set(info.providers):
            run.append(name)
        else:
            skipped[name] = (
                f"needs one of {', '.join(info.providers)}; this ONNX Runtime has {', '.join(sorted(providers))}"
            )
    return run, skipped


def record_retrieval_eval(
    work: Path,
    manifest: Manifest,
    data: str | Path,
    *,
    split: str = "test",
    max_ndcg_drop: float = 0.01,
    keep_anyway: bool = False,
    say: Callable[[str], None],
) -> Manifest:
    """Evaluate the package in ``work`` on ``data``; write the figures into its manifest."""
    from m3_runtime.evaluation import data as evdata
    from m3_runtime.evaluation.run import MODES, EvalConfig, evaluate, results_json

    if "fp32" not in manifest.variants:
        raise QualityGateError("--eval compares variants with fp32: export fp32 too (--variants fp32,...)")
    retrieval_set = evdata.load(data, split)
    variants, skipped = _runnable_variants(manifest)
    kind = manifest.kind
    modes = list(MODES) if kind.has(SPARSE) and kind.has(COLBERT) else ["dense"]
    cfg = EvalConfig(variants=variants, modes=modes, ks=[10, 100])
    say(f"      retrieval quality on {data} ({split}): {', '.join(variants)} x {', '.join(modes)}")
    result = results_json(evaluate(str(work), retrieval_set, cfg, say=lambda m: say("      " + m)), retrieval_set, cfg)
    over = [d for d in result["deltas"] if d["metric"] == GATE_METRIC and -d["delta"] > max_ndcg_drop]
    record: dict[str, Any] = {
        "data": Path(data).name,
        "split": split,
        "queries": result["queries"],
        "corpus": result["corpus"],
        "metric": GATE_METRIC,
        "max_ndcg_drop": max_ndcg_drop,
        "results": result["results"],
        "deltas": [d for d in result["deltas"] if d["metric"] == GATE_METRIC],
        "not_evaluated": skipped,
        "over_bound": [f"{d['variant']} {d['mode']}" for d in over],
    }
    for d in record["deltas"]:
        say(
            f"      {d['variant']} {d['mode']}: {GATE_METRIC} {d['delta']:+.4f} vs fp32 "
            f"[{d['ci_low']:+.4f}, {d['ci_high']:+.4f}] (p {d['p_value']:.3g})"
        )
    if over and not keep_anyway:
        figures = "; ".join(
            f"{d['variant']} {d['mode']} {d['delta']:+.4f} [{d['ci_low']:+.4f}, {d['ci_high']:+.4f}]" for d in over
        )
        raise QualityGateError(
            f"{GATE_METRIC} below fp32's by more than --max-ndcg-drop {max_ndcg_drop:g} on {data} ({split}): "
            f"{figures}; nothing written (--keep-anyway writes the package and records this)"
        )
    manifest = replace(manifest, retrieval_eval=record)
    (work / MANIFEST_NAME).write_text(
        json.dumps(manifest.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    return manifest
