"""``m3 eval PACKAGE DATA``: the subcommand's arguments and its run."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import InputError, UnsupportedOutput
from .run import DEFAULT_WEIGHTS, MODES, EvalConfig


def _csv(value: str) -> list[str]:
    return [x.strip() for x in value.split(",") if x.strip()]


def _ints(value: str) -> list[int]:
    try:
        return [int(x) for x in _csv(value)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 10,100, got {value!r}") from None


def _floats(value: str) -> list[float]:
    try:
        weights = [float(x) for x in _csv(value)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--weights takes three numbers like 0.4,0.2,0.4, got {value!r}") from None
    if len(weights) != 3:
        raise argparse.ArgumentTypeError(f"--weights takes three numbers (dense,sparse,colbert), got {value!r}")
    return weights


def _embedded(value: str) -> tuple[str, str]:
    variant, sep, path = value.partition("=")
    if not sep or not variant or not path:
        raise argparse.ArgumentTypeError(f"--embedded takes VARIANT=FOLDER (e.g. int8=out/emb), got {value!r}")
    return variant, path


def add_parser(sub) -> None:
    p = sub.add_parser(
        "eval", help="retrieval quality (nDCG, recall, MRR, MAP) on a BEIR-layout set (m3-runtime[eval])"
    )
    p.add_argument("package", help="model package folder written by m3-export")
    p.add_argument("data", help="folder with corpus.jsonl, queries.jsonl and qrels/<split>.tsv")
    p.add_argument(
        "--variants", type=_csv, default=None, help="comma-separated (default: fp32 and int8, those present)"
    )
    p.add_argument(
        "--modes",
        type=_csv,
        default=None,
        help=f"comma-separated of {', '.join(MODES)} (default: all the package serves)",
    )
    p.add_argument("--weights", type=_floats, default=list(DEFAULT_WEIGHTS), help="dense,sparse,colbert (0.4,0.2,0.4)")
    p.add_argument("--k", type=_ints, default=[10, 100], help="cutoffs (default 10,100)")
    p.add_argument("--split", default="test", help="qrels/<split>.tsv (default test)")
    p.add_argument("--candidates", type=int, default=None, help="C: dense (and sparse) top-C re-scored by colbert/all")
    p.add_argument("--reranker", default=None, help="a reranker package: re-order the top of --rerank-after")
    p.add_argument("--rerank-top", type=int, default=100, help="passages per query the reranker scores (100)")
    p.add_argument("--rerank-after", default="dense", help="the first stage the reranker re-orders (dense)")
    p.add_argument("--max-length", type=int, default=None, help="truncate passages to this many tokens")
    p.add_argument(
        "--embedded",
        type=_embedded,
        action="append",
        default=[],
        help="VARIANT=FOLDER: reuse m3 embed-corpus output for that variant's corpus (repeatable)",
    )
    p.add_argument("--embedded-id-column", default="_id", help="the id column of --embedded files (_id)")
    p.add_argument("--tune", action="store_true", help="search hybrid weights and RRF on --dev-split")
    p.add_argument("--dev-split", default="dev", help="split --tune searches on (dev)")
    p.add_argument("--json", dest="json_out", default=None, help="write the results as JSON here")
    p.add_argument("--report", default=None, help="write a self-contained HTML report here (m3-runtime[report])")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> None:
    from ..contract import COLBERT, SPARSE
    from ..package import load_package
    from . import data as data_mod
    from .metrics import _pytrec_eval
    from .retrieval import stderr
    from .run import evaluate, results_json

    _pytrec_eval()  # the extra's absence is reported before any encoding
    package = load_package(args.package)
    present = list(package.manifest.variants)
    variants = args.variants or [v for v in ("fp32", "int8") if v in present] or present[:1]
    for v in variants:
        if v not in present:
            raise InputError(f"--variants: {args.package} has no {v!r} variant (it has {', '.join(present)})")
    kind = package.manifest.kind
    full = kind.has(SPARSE) and kind.has(COLBERT)
    default_modes = list(MODES) if full else ["dense", *(["sparse", "dense+sparse"] if kind.has(SPARSE) else [])]
    ks = sorted(set(args.k))
    cfg = EvalConfig(
        variants=variants,
        modes=args.modes or default_modes,
        weights=args.weights,
        ks=ks,
        candidates=args.candidates if args.candidates is not None else max(100, max(ks)),
        reranker=args.reranker,
        rerank_top=args.rerank_top,
        rerank_after=args.rerank_after,
        max_length=args.max_length,
        embedded=dict(args.embedded),
        embedded_id_column=args.embedded_id_column,
    )
    from .run import check_config

    check_config(cfg, kind)
    if args.tune and not full:
        raise UnsupportedOutput(
            f"--tune weighs dense, sparse and ColBERT scores; {args.package} is a {kind.description}"
        )
    data = data_mod.load(args.data, args.split)
    dev = data_mod.load(args.data, args.dev_split) if args.tune else None
    runs = evaluate(args.package, data, cfg, say=stderr)
    result = results_json(runs, data, cfg)
    if dev is not None:
        from .tune import tune

        result["tune"] = tune(args.package, dev, data, cfg, say=stderr)
    from .report import html_report, table

    print(table(result))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    if args.report:
        Path(args.report).write_text(html_report(result), encoding="utf-8")
