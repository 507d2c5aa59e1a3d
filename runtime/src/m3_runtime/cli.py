"""``m3``: encode, score and inspect with a model package from the command line."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import fields

from .contract import SPARSE, VARIANTS
from .engine import DEFAULT_BATCH_SIZE
from .errors import InputError, M3Error
from .package import load_package
from .reranker import RERANK_BATCH_SIZE
from .session import available_providers, default_cache_dir, default_variant


def _check_kind(package: str, *, reranker: bool, hint: str) -> None:
    """Refuse a package of the other kind with what to type instead (``hint``)."""
    kind = load_package(package).manifest.kind
    if kind.pairs != reranker:
        raise InputError(f"{package} is a {kind.description}: {hint}")


def _model(args: argparse.Namespace, **kwargs: object):
    from .model import M3Model

    serving = hasattr(args, "reranker")  # m3 serve has --reranker; encode and score do not
    _check_kind(
        args.package,
        reranker=False,
        hint=f"pass it with --reranker {args.package}" if serving else f"use m3 rerank {args.package} QUERY PASSAGE...",
    )
    return M3Model(args.package, variant=args.variant, batch_size=args.batch_size, **kwargs)  # type: ignore[arg-type]


def _reranker(package: str, *, serving: bool, **kwargs: object):
    from .reranker import M3Reranker

    _check_kind(
        package,
        reranker=True,
        hint="pass it as PACKAGE, without --reranker" if serving else f"use m3 encode or m3 score {package} ...",
    )
    return M3Reranker(package, **kwargs)  # type: ignore[arg-type]


def _texts(items: Sequence[str], what: str = "texts") -> list[str]:
    """The texts given, or one per line of standard input for a lone '-'."""
    if list(items) == ["-"]:
        return [line.rstrip("\n") for line in sys.stdin]
    if "-" in items:
        raise InputError(f"'-' reads the {what} from standard input, one per line: give it alone, not among others")
    if not items:
        raise InputError(f"give {what} as arguments, or '-' to read one per line from standard input")
    return list(items)


def cmd_encode(args: argparse.Namespace) -> None:
    texts = _texts(args.texts)
    dense, sparse, colbert = args.dense, args.sparse, args.colbert
    model = _model(args)
    if not (dense or sparse or colbert):
        dense, sparse = True, model.engine.kind.has(SPARSE)  # dense-only packages have no sparse output
    out = model.embed(texts, max_length=args.max_length, dense=dense, sparse=sparse, colbert=colbert)
    for i in range(len(texts)):
        row: dict[str, object] = {"index": i}
        if out.dense is not None:
            row["dense"] = out.dense[i].tolist()
        if out.lexical is not None:
            weights = out.lexical[i]
            row["sparse"] = (
                {model.tokenizer.decode_one(int(k)): w for k, w in weights.items()} if args.tokens else weights
            )
        if out.colbert is not None:
            row["colbert"] = out.colbert[i].tolist()
        print(json.dumps(row, ensure_ascii=False))


def _weights(value: str) -> list[float]:
    try:
        weights = [float(x) for x in value.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--weights takes three numbers like 0.4,0.2,0.4, got {value!r}") from None
    if len(weights) != 3:
        raise argparse.ArgumentTypeError(f"--weights takes three numbers (dense,sparse,colbert), got {value!r}")
    return weights


def cmd_score(args: argparse.Namespace) -> None:
    args.passages = _texts(args.passages, "passages")
    model = _model(args)
    pairs = [(args.query, p) for p in args.passages]
    scores = model.compute_score(
        pairs,
        max_query_length=args.max_query_length,
        max_passage_length=args.max_passage_length,
        weights_for_different_modes=args.weights,
    )
    for i, passage in enumerate(args.passages):
        print(json.dumps({"passage": passage[:80], **{k: v[i] for k, v in scores.items()}}, ensure_ascii=False))


def cmd_info(args: argparse.Namespace) -> None:
    package = load_package(args.package)
    m = package.manifest
    providers = available_providers()
    record = default_cache_dir() / "verified.json"
    lines = [
        f"package      {package.root}",
        f"format       {m.format_version} ({m.model_kind})",
        f"source       {m.source.get('id')} (revision {m.source.get('revision')})",
        f"hidden size  {m.hidden_size}; max length {m.max_length} tokens; vocab {m.vocab_size}",
        f"special ids  <s> {m.special_tokens.bos}, <pad> {m.special_tokens.pad}, </s> {m.special_tokens.eos}, "
        f"<unk> {m.special_tokens.unk}",
        "inputs       " + ", ".join(f"{k} {v}" for k, v in m.inputs.items()),
        "outputs      " + ", ".join(f"{k} {v}" for k, v in m.outputs.items()),
        "variants",
    ]
    for name, info in m.variants.items():
        size = sum(f.bytes for f in info.files) / 1e6
        lines.append(f"  {name:5} {size:9.1f} MB  {info.precision}; for {', '.join(info.providers)}")
        if info.validation:
            shown = (
                "dense_cos_min",
                "dense_max_abs",
                "sparse_max_abs",
                "colbert_max_abs",
                "sparse_top10_overlap",
                "scores_max_abs",
                "scores_sigmoid_max_abs",
                "scores_spearman",
                "scores_order_agreement",
                "scores_top1_agreement",
            )
            lines.append(
                "        vs PyTorch: "
                + ", ".join(f"{k} {info.validation[k]:.3g}" for k in shown if k in info.validation)
            )
            real = [k for k in info.validation if k.startswith("real_")]
            if real:
                lines.append(
                    "        vs fp32 on real English text: " + ", ".join(f"{k} {info.validation[k]:.4g}" for k in real)
                )
        entries = m.tokenizer_files + info.files
        lines.extend(f"        UNREADABLE: {why}" for why in package.unreadable(entries))
        todo = package.unverified(entries, record)
        lines.append(
            "        SHA-256: "
            + (
                f"{len(todo)} of {len(entries)} files to hash at the next load "
                f"({sum(f.bytes for f in todo) / 1e6:.1f} MB; not in {record} as they are now)"
                if todo
                else f"verified, unchanged since ({record})"
            )
        )
    if m.retrieval_eval:
        from .evaluation.report import manifest_lines

        lines.extend(manifest_lines(m.retrieval_eval))
    lines.append("built with   " + ", ".join(f"{k} {v}" for k, v in m.versions.items()))
    lines.append(f"providers    {', '.join(providers)} (this ONNX Runtime)")
    lines.append(f"default      {default_variant(list(m.variants), providers)} on this machine")
    from .check import provider_in_use

    used, why = provider_in_use(package, default_variant(list(m.variants), providers))
    lines.append(f"in use       {used}" + (f" ({'; '.join(why)})" if why else ""))
    lines.append(
        "references   "
        + (
            f"{m.references.path} ({m.references.bytes / 1e6:.2f} MB): m3 check {package.root} compares with them"
            if m.references is not None
            else "none (exported before m3 check): m3 check compares the variants with fp32 here"
        )
    )
    print("\n".join(lines))


def cmd_check(args: argparse.Namespace) -> int:
    from .check import check_package, parse_list

    def progress(row) -> None:  # one line per row on stderr while the others run
        print(f"m3 check: {row.variant} on {row.provider}: {row.status} ({row.seconds:.1f} s)", file=sys.stderr)

    report = check_package(
        args.package,
        variants=parse_list(args.variants, "--variants") if args.variants else None,
        providers=parse_list(args.providers, "--providers") if args.providers else None,
        progress=progress,
        skip_long=args.skip_long,
    )
    print(report.to_json() if args.json else report.table())
    return 0 if report.passed else 1


def cmd_serve(args: argparse.Namespace) -> None:
    from .server import ServerConfig, check_port, serve
    from .server.flags import named

    if args.env_errors:
        raise InputError(args.env_errors[0])
    if args.request_timeout_s < 0:
        raise InputError(
            f"{named('request_timeout_s', '--request-timeout-s')} must be >= 0 (0: no limit), "
            f"got {args.request_timeout_s:g}"
        )
    for name in ("workers", "max_queue", "max_texts", "max_chars", "max_body_bytes", "drain_timeout_s"):
        if getattr(args, name) < 1:
            raise InputError(f"{named(name, '--' + name.replace('_', '-'))} must be >= 1, got {getattr(args, name)}")
    api_key = args.api_key
    if api_key is not None and not api_key.strip():
        raise InputError("the API key (--api-key or M3_API_KEY) is empty: give a key, or unset it for no auth")
    if args.package is None and args.reranker is None:
        raise InputError("m3 serve needs an embedding package (or M3_PACKAGE), --reranker PACKAGE, or both")
    check_port(args.host, args.port)  # before the models load, which takes a while
    threads = {"max_batch_tokens": args.max_batch_tokens, "intra_op_threads": args.intra_op_threads}
    model = None if args.package is None else _model(args, **threads)
    reranker = None
    if args.reranker is not None:
        reranker = _reranker(args.reranker, serving=True, variant=args.variant, **threads)
    if args.check:
        from .check import refuse_failed

        for held in (model, reranker):
            if held is not None:
                report = held.check()  # kept on the model: /info shows it
                print(report.table(), file=sys.stderr)
                refuse_failed(report)
    config = ServerConfig(
        max_wait_ms=args.max_wait_ms,
        max_queue=args.max_queue,
        max_texts=args.max_texts,
        max_chars=args.max_chars,
        request_timeout_s=args.request_timeout_s or None,
        workers=args.workers,
        long_pass_nice=args.long_pass_nice,
        max_body_bytes=args.max_body_bytes,
        api_key=api_key.strip() if api_key is not None else None,
        log_texts=args.log_texts,
        drain_timeout_s=args.drain_timeout_s,
    )
    serve(model, host=args.host, port=args.port, config=config, reranker=reranker)


def cmd_rerank(args: argparse.Namespace) -> None:
    args.passages = _texts(args.passages, "passages")
    reranker = _reranker(
        args.package, serving=False, variant=args.variant, batch_size=args.batch_size, max_length=args.max_length
    )
    for ranked in reranker.rerank(args.query, args.passages, top_n=args.top_n, normalize=args.normalize):
        passage = args.passages[ranked.index]
        print(json.dumps({"index": ranked.index, "score": ranked.score, "passage": passage[:80]}, ensure_ascii=False))


def cmd_embed_corpus(args: argparse.Namespace) -> None:
    from pathlib import Path

    from .corpus import CorpusJob, embed_corpus, init_ray, parse_outputs

    job = CorpusJob(
        package=str(Path(args.package).resolve()),
        variant=args.variant,
        text_column=args.text_column,
        id_column=args.id_column,
        outputs=parse_outputs(args.outputs),
        max_length=args.max_length,
        colbert_dtype=args.colbert_dtype,
        on_bad_text=args.on_bad_text,
        workers=args.workers,
        batch_rows=args.batch_rows,
        batch_tokens=args.batch_tokens,
    )
    init_ray(args.ray_address, args.workers)
    embed_corpus(job, args.input, args.output)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .server import ServerConfig

    parser = argparse.ArgumentParser(prog="m3", description="BGE-M3 runtime: dense, sparse and ColBERT outputs.")
    parser.add_argument("--version", action="version", version=f"m3 (m3-runtime) {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser, optional: bool = False) -> None:
        p.add_argument("package", nargs="?" if optional else None, help="model package folder written by m3-export")
        p.add_argument("--variant", choices=VARIANTS, default=None, help="default: picked by provider")
        p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="most texts per forward pass")

    enc = sub.add_parser("encode", help="print one JSON line per text")
    common(enc)
    enc.add_argument("texts", nargs="*", help="texts, or '-' for one text per line on standard input")
    enc.add_argument("--dense", action="store_true", help="dense vector (default with --sparse when none given)")
    enc.add_argument("--sparse", action="store_true", help="lexical weights {token_id: weight}")
    enc.add_argument("--colbert", action="store_true", help="ColBERT vectors, one per token after <s>")
    enc.add_argument("--tokens", action="store_true", help="key lexical weights by token string, not id")
    enc.add_argument("--max-length", type=int, default=None, help="truncate texts to this many tokens")
    enc.set_defaults(func=cmd_encode)

    score = sub.add_parser("score", help="all five scores of QUERY against each PASSAGE")
    common(score)
    score.add_argument("query")
    score.add_argument("passages", nargs="+", help="passages, or '-' for one passage per line on standard input")
    score.add_argument("--max-query-length", type=int, default=None)
    score.add_argument("--max-passage-length", type=int, default=None)
    score.add_argument("--weights", type=_weights, default=None, help="dense,sparse,colbert weights (default 1,1,1)")
    score.set_defaults(func=cmd_score)

    rr = sub.add_parser("rerank", help="score each PASSAGE against QUERY with a reranker package, best first")
    common(rr)
    rr.set_defaults(batch_size=RERANK_BATCH_SIZE)  # FlagReranker's default, not the embedder's
    rr.add_argument("query")
    rr.add_argument("passages", nargs="+", help="passages, or '-' for one passage per line on standard input")
    rr.add_argument("--max-length", type=int, default=None, help="tokens per pair (default 512, FlagReranker's)")
    rr.add_argument("--top-n", type=int, default=None, help="print only the best N")
    rr.add_argument("--normalize", action="store_true", help="sigmoid of the logit (0..1) instead of the raw logit")
    rr.set_defaults(func=cmd_rerank)

    srv = sub.add_parser("serve", help="HTTP server with dynamic batching (needs m3-runtime[server])")
    common(srv, optional=True)
    srv.add_argument("--reranker", default=None, help="a reranker package to serve next to (or instead of) PACKAGE")
    srv.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface; see --api-key)"
    )
    srv.add_argument("--port", type=int, default=8000, help="TCP port to listen on")
    defaults = {f.name: f.default for f in fields(ServerConfig)}
    srv.add_argument(
        "--max-batch-tokens",
        type=int,
        default=None,
        help="padded tokens per forward pass (default: 256 on the CPU, 16384 on GPUs)",
    )
    srv.add_argument(
        "--max-wait-ms", type=float, default=defaults["max_wait_ms"], help="how long a text waits for company"
    )
    srv.add_argument(
        "--max-queue", type=int, default=defaults["max_queue"], help="texts waiting before requests get 429"
    )
    srv.add_argument("--max-texts", type=int, default=defaults["max_texts"], help="texts per request (413 above)")
    srv.add_argument("--max-chars", type=int, default=defaults["max_chars"], help="characters per text (413 above)")
    srv.add_argument(
        "--workers",
        type=int,
        default=defaults["workers"],
        help="N: short forward passes run at once, and N - 1 passages beside them on a second session "
        "(CPU: one more copy of the prepacked weights); 1: one pass at a time, one session",
    )
    srv.add_argument(
        "--intra-op-threads", type=int, default=0, help="ONNX Runtime threads per forward pass (0: one per core)"
    )
    srv.add_argument(
        "--long-pass-nice",
        type=int,
        default=defaults["long_pass_nice"],
        help="how much lower (nice) the CPU priority of a passage's forward pass is than a short one's, "
        "so short requests keep the cores beside it (Linux; 0: equal)",
    )
    srv.add_argument(
        "--request-timeout-s",
        type=float,
        default=defaults["request_timeout_s"],
        help="seconds before an unanswered request gets 503 (queued: never runs) and an unsent body 408; 0: no limit",
    )
    srv.add_argument(
        "--max-body-bytes",
        type=int,
        default=defaults["max_body_bytes"],
        help="request bodies over this get 413, refused before they are read "
        "(default 16 MiB: 512 texts of 8,192 tokens)",
    )
    srv.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer KEY' on every endpoint but /health and /openapi.json "
        "(an environment variable, unlike a flag, is not shown to other users by ps; unset: no auth)",
    )
    srv.add_argument(
        "--check",
        action="store_true",
        help="run m3 check on each served model (its variant, on the provider it runs on) before serving; "
        "refuse to serve on a FAIL; /info shows the result",
    )
    srv.add_argument(
        "--log-texts", action="store_true", help="put request texts into the access log (default: counts only)"
    )
    srv.add_argument(
        "--drain-timeout-s",
        type=int,
        default=defaults["drain_timeout_s"],
        help="on SIGTERM, seconds to finish in-flight and queued requests before exiting",
    )
    srv.set_defaults(func=cmd_serve)
    from .server.flags import from_environment

    from_environment(srv)  # every flag also from M3_<FLAG>, shown in --help

    corpus = sub.add_parser("embed-corpus", help="embed Parquet/JSONL files with Ray Data (needs m3-runtime[ray])")
    corpus.add_argument("package")
    corpus.add_argument("input", help="a .parquet/.jsonl file or a folder of them (path or URI: file://, s3://, ...)")
    corpus.add_argument("output", help="folder for one .parquet per input file (path or URI)")
    corpus.add_argument("--variant", choices=VARIANTS, default=None, help="default: picked by provider (int8 on a CPU)")
    corpus.add_argument("--text-column", default="text")
    corpus.add_argument("--id-column", default="id")
    corpus.add_argument("--outputs", default="dense,sparse", help="comma-separated: dense, sparse, colbert")
    corpus.add_argument("--max-length", type=int, default=None)
    corpus.add_argument("--colbert-dtype", choices=("float32", "float16"), default="float32")
    corpus.add_argument(
        "--on-bad-text", choices=("skip", "fail"), default="skip", help="null texts: skip (counted) or fail"
    )
    corpus.add_argument(
        "--ray-address", default="local", help="'local' starts Ray here; 'auto' or an address joins a cluster"
    )
    corpus.add_argument("--workers", type=int, default=1, help="model actors")
    corpus.add_argument("--batch-rows", type=int, default=256, help="rows per map_batches call")
    corpus.add_argument(
        "--batch-tokens",
        type=int,
        default=None,
        help="padded-token budget of each actor's model batches (default: 256 on the CPU, 16384 on GPUs)",
    )
    corpus.set_defaults(func=cmd_embed_corpus)

    from .evaluation.cli import add_parser as add_eval_parser

    add_eval_parser(sub)

    chk = sub.add_parser(
        "check",
        help="run the package's variants on this machine's providers against the reference outputs stored at "
        "export; exit status 0 only if every one PASSes",
    )
    chk.add_argument("package")
    chk.add_argument("--variants", default=None, help="comma-separated (default: the package's)")
    chk.add_argument(
        "--providers",
        default=None,
        help="comma-separated ONNX Runtime providers, e.g. TensorrtExecutionProvider,CUDAExecutionProvider "
        "(default: those of TensorRT, CUDA and the CPU this ONNX Runtime has, each variant on those it is built for)",
    )
    chk.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    chk.add_argument(
        "--skip-long",
        action="store_true",
        help="leave out the probes over 512 tokens (the one at the package's max_length; for emulators)",
    )
    chk.set_defaults(func=cmd_check)

    info = sub.add_parser("info", help="show the package manifest and the providers available")
    info.add_argument("package")
    info.set_defaults(func=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    args, _ = parser.parse_known_args(argv)
    # Texts may come after options ("m3 encode PKG --sparse hello world"): parse the
    # subcommand's own arguments intermixed, which argparse only allows without subparsers.
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    args = sub.choices[args.command].parse_intermixed_args(argv[argv.index(args.command) + 1 :])
    try:
        code = args.func(args)
    except (M3Error, ImportError, OSError) as exc:  # the runtime's deliberate errors; anything else is a bug
        print(f"m3: error: {exc}", file=sys.stderr)
        return 2
    return code if isinstance(code, int) else 0  # m3 check: 1 unless everything asked for passed


if __name__ == "__main__":
    sys.exit(main())
