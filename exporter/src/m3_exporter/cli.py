"""``m3-export SRC OUT``: checkpoint in, validated model package out."""

from __future__ import annotations

import argparse
import sys

from m3_runtime.contract import VARIANTS

from .checkpoint import CheckpointError
from .export import DEFAULT_OPSET, export_package
from .graphs import ExportError


def _variants(value: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in VARIANTS]
    if bad or not items:
        raise argparse.ArgumentTypeError(f"unknown variant(s) {bad or value!r}; choose from {','.join(VARIANTS)}")
    return items


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="m3-export",
        description="Export a BGE-M3 checkpoint (local folder in the BAAI/bge-m3 layout, or a hub id) to a model "
        "package: one ONNX graph per variant with dense, sparse and ColBERT outputs, validated against PyTorch.",
    )
    parser.add_argument("src", help="checkpoint folder or hub id (e.g. BAAI/bge-m3)")
    parser.add_argument("out", help="package folder to write (must be empty or absent unless --force)")
    parser.add_argument(
        "--variants", type=_variants, default=list(VARIANTS), help="comma-separated (default: fp32,fp16,int8)"
    )
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    parser.add_argument(
        "--max-length", type=int, default=None, help="longest input in tokens (default: the model's, 8192)"
    )
    parser.add_argument("--revision", default=None, help="hub revision (hub ids only)")
    parser.add_argument("--no-validate", action="store_true", help="skip the comparison with PyTorch")
    parser.add_argument("--force", action="store_true", help="replace a non-empty OUT")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
        )
    except (CheckpointError, ExportError, FileExistsError, ValueError) as exc:
        print(f"m3-export: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
