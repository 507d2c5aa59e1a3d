"""``m3-export SRC OUT``: checkpoint in, validated model package out."""

from __future__ import annotations

import argparse
import signal
import sys

from m3_runtime.contract import KINDS, VARIANTS

from .checkpoint import CheckpointError
from .export import DEFAULT_OPSET, export_package
from .graphs import ExportError
from .outliers import DEFAULT_BUDGET
from .specs import known_models


def _variants(value: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in VARIANTS]
    if bad or not items:
        raise argparse.ArgumentTypeError(f"unknown variant(s) {bad or value!r}; choose from {','.join(VARIANTS)}")
    return items


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="m3-export",
        description="Export a checkpoint (local folder or hub id) to a model package: one ONNX graph per variant, "
        "validated against PyTorch. BGE-M3 (BAAI/bge-m3 layout: dense, sparse and ColBERT outputs), dense-only "
        "encoders (dense_vecs) and rerankers (one-label XLM-R/BERT sequence classifiers such as "
        "BAAI/bge-reranker-v2-m3: scores, the raw logit per (query, passage) pair).",
    )
    parser.add_argument("src", help="checkpoint folder or hub id (e.g. BAAI/bge-m3, BAAI/bge-reranker-v2-m3)")
    parser.add_argument("out", help="package folder to write (must be empty or absent unless --force)")
    parser.add_argument(
        "--variants",
        type=_variants,
        default=None,
        help="comma-separated (default: the registry's, else fp32,fp16,int8)",
    )
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    parser.add_argument(
        "--max-length",
        type=int,
        default=None,
        help="longest input in tokens (default: the registry's, else the model's position table, 8192 for bge-m3)",
    )
    parser.add_argument("--revision", default=None, help="hub revision (hub ids only)")
    parser.add_argument("--no-validate", action="store_true", help="skip the comparison with PyTorch")
    parser.add_argument(
        "--kind",
        choices=tuple(KINDS),
        default=None,
        help="; ".join(f"{k.name}: {k.description}" for k in KINDS.values())
        + ". Default: the registry's, else detected from the files (a *ForSequenceClassification is a reranker)",
    )
    parser.add_argument(
        "--pooling", choices=("cls", "mean"), default=None, help="dense models: default from the registry or 1_Pooling"
    )
    parser.add_argument(
        "--query-instruction",
        default=None,
        help="text encode_queries prepends (dense models; '' for none); default: the registry's",
    )
    parser.add_argument(
        "--int8-fp32-budget",
        type=float,
        default=DEFAULT_BUDGET,
        help=f"share of MatMul weights int8 may keep in fp32 for outlier-heavy inputs (default {DEFAULT_BUDGET:g}: "
        "every MatMul int8; e.g. 0.06 keeps the worst within 6%% of the weights)",
    )
    parser.add_argument(
        "--int8-smooth",
        type=float,
        default=0.0,
        metavar="ALPHA",
        help="SmoothQuant before int8 with this alpha (default 0: off; 0.5 is usual); see docs/exporting.md",
    )
    parser.add_argument("--list-models", action="store_true", help="list the models of the registry and exit")
    from . import __version__

    parser.add_argument("--version", action="version", version=f"m3-export (m3-exporter) {__version__}")
    parser.add_argument(
        "--eval",
        default=None,
        metavar="DATA",
        help="BEIR-layout folder: record each variant's retrieval quality against fp32 in the manifest "
        "(m3 eval; needs m3-runtime[eval])",
    )
    parser.add_argument("--eval-split", default="test", help="qrels/<split>.tsv of --eval (default test)")
    parser.add_argument(
        "--max-ndcg-drop",
        type=float,
        default=0.01,
        help="fail the export if a variant's nDCG@10 is below fp32's by more than this in any mode (default 0.01)",
    )
    parser.add_argument(
        "--keep-anyway", action="store_true", help="write the package even over --max-ndcg-drop (recorded)"
    )
    parser.add_argument("--force", action="store_true", help="replace a non-empty OUT")
    return parser


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if "--list-models" in argv:
        for spec in known_models().values():
            print(
                f"{spec.hub_id:42} {spec.kind:8} {spec.pooling:5} max {spec.max_length:5}  {','.join(spec.recommended_variants)}"
            )
        return 0
    args = build_parser().parse_args(argv)
    # SIGTERM ends the export through SystemExit, so its temporary folder is removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        export_package(
            args.src,
            args.out,
            variants=args.variants,
            opset=args.opset,
            max_length=args.max_length,
            validate_variants=not args.no_validate,
            force=args.force,
            revision=args.revision,
            kind=args.kind,
            pooling=args.pooling,
            query_instruction=args.query_instruction,
            int8_fp32_budget=args.int8_fp32_budget,
            int8_smooth=args.int8_smooth,
            eval_data=args.eval,
            eval_split=args.eval_split,
            max_ndcg_drop=args.max_ndcg_drop,
            keep_anyway=args.keep_anyway,
        )
    except (CheckpointError, ExportError, FileExistsError, ValueError) as exc:
        print(f"m3-export: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
