"""The export pipeline: checkpoint -> validated model package (embedders and rerankers)."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from m3_runtime.contract import (
    FORMAT_VERSION,
    M3_KIND,
    MANIFEST_NAME,
    PROVIDERS_FOR_VARIANT,
    REFERENCE_FILE,
    RERANKER_KIND,
    TOKENIZER_FILE,
    VARIANTS,
    Manifest,
    SpecialTokens,
    Variant,
    VariantInfo,
    data_file,
    graph_file,
    graph_shapes,
    output_names,
)
from m3_runtime.package import file_entry
from m3_runtime.tokenize import M3Tokenizer

from . import graphs, outliers, validate
from .checkpoint import (
    TOKENIZER_EXTRA_FILES,
    Checkpoint,
    CheckpointError,
    inspect_checkpoint,
    load_torch_model,
    resolve_source,
)
from .fusion import FLASH_MIN_TOKENS
from .graphs import ExportError
from .reference import record_int8_check, torch_references, write_references
from .specs import find_spec
from .texts import RERANK_PAIRS, VALIDATION_TEXTS, calibration_pairs, calibration_paragraphs

PRECISION = {
    "fp32": "float32; CPU-fused (MultiHeadAttention with flash path, SkipLayerNorm, BiasGelu)",
    "fp16": "float16 (normalisation in float32); unfused, for TensorRT/CUDA",
    "int8": (
        "int8 MatMuls: per-channel weights, per-token activation scales (batch-invariant); "
        "int8 word embeddings (per-row scales, blocks of 128); CPU-fused"
    ),
}
DEFAULT_OPSET = 18
# Validation inputs are cut here: FlagReranker's default max_length, and where the
# embedder's long validation text is cut.
VALIDATION_MAX_LENGTH = 512


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class _Steps:
    """Numbered progress lines with timings on stderr: ``with steps("exporting"): ...``."""

    def __init__(self, total: int, say: Callable[[str], None]) -> None:
        self.total, self.done, self.say = total, 0, say

    @contextmanager
    def __call__(self, what: str) -> Iterator[None]:
        self.done += 1
        self.say(f"[{self.done}/{self.total}] {what} ...")
        start = time.perf_counter()
        yield
        self.say(f"      done in {time.perf_counter() - start:.1f} s")


def _check_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise FileExistsError(f"{out} is not empty; pass --force to replace it")
        if not (out / MANIFEST_NAME).is_file():
            # --force replaces a package, never an arbitrary folder of the user's.
            raise FileExistsError(
                f"{out} is not empty and holds no {MANIFEST_NAME}; not replacing it, even with --force"
            )


def _versions() -> dict[str, str]:
    out = {}
    for dist in ("torch", "transformers", "onnx", "onnxruntime", "onnxruntime-gpu", "onnxscript", "m3-exporter"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            continue
    return out


def _write_tokenizer(ckpt: Checkpoint, dest: Path) -> None:
    for name in TOKENIZER_EXTRA_FILES:
        if (ckpt.path / name).is_file():
            shutil.copy2(ckpt.path / name, dest / name)
    if ckpt.tokenizer_json is not None:
        shutil.copy2(ckpt.tokenizer_json, dest / TOKENIZER_FILE)
        return
    # Only sentencepiece.bpe.model: transformers converts it to the fast-tokenizer JSON.
    from transformers import AutoTokenizer

    try:
        AutoTokenizer.from_pretrained(ckpt.path, use_fast=True).backend_tokenizer.save(str(dest / TOKENIZER_FILE))
    except Exception as exc:
        raise CheckpointError(
            f"cannot build tokenizer.json from {ckpt.path / 'sentencepiece.bpe.model'}: {exc}"
        ) from None


def _special_tokens(package: Path, tokenizer: M3Tokenizer) -> SpecialTokens:
    names = {"bos": "<s>", "pad": "<pad>", "eos": "</s>", "unk": "<unk>", "mask": "<mask>"}
    mapping = package / "special_tokens_map.json"
    if mapping.is_file():
        data = json.loads(mapping.read_text(encoding="utf-8"))
        # BERT tokenizers have [CLS]/[SEP] where XLM-R has <s>/</s>: sep stands in for eos.
        for key, field in (
            ("cls_token", "bos"),
            ("pad_token", "pad"),
            ("sep_token", "eos"),
            ("eos_token", "eos"),
            ("unk_token", "unk"),
            ("mask_token", "mask"),
        ):
            value = data.get(key)
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str):
                names[field] = value
    ids = {field: tokenizer.token_to_id(token) for field, token in names.items()}
    missing = [names[f] for f, i in ids.items() if i is None and f != "mask"]
    if missing:
        raise CheckpointError(f"tokenizer has no id for the special token(s) {missing}")
    return SpecialTokens(**ids)  # type: ignore[arg-type]


def _clean_up_flag(package: Path) -> bool:
    config = package / "tokenizer_config.json"
    if not config.is_file():
        return False
    return bool(json.loads(config.read_text(encoding="utf-8")).get("clean_up_tokenization_spaces", False))


def export_package(
    src: str,
    out: str | Path,
    *,
    variants: Sequence[Variant] | None = None,
    opset: int = DEFAULT_OPSET,
    max_length: int | None = None,
    validate_variants: bool = True,
    force: bool = False,
    revision: str | None = None,
    kind: str | None = None,
    pooling: str | None = None,
    normalize: bool | None = None,
    query_instruction: str | None = None,
    int8_fp32_budget: float = outliers.DEFAULT_BUDGET,
    int8_smooth: float = 0.0,
    eval_data: str | Path | None = None,
    eval_split: str = "test",
    max_ndcg_drop: float = 0.01,
    keep_anyway: bool = False,
    say: Callable[[str], None] = _say,
) -> Manifest:
    """Export ``src`` (a local checkpoint or hub id) to a package in ``out``.

    ``variants``, ``kind``, ``pooling``, ``normalize``, ``query_instruction`` and
    ``max_length`` left as None come from the model registry when ``src`` is a known
    hub id (``models/registry``), else from the checkpoint (sentence-transformers
    files, config); ``query_instruction=""`` means none. ``int8_fp32_budget``: share of
    MatMul weights the int8 variant may keep in fp32 for outlier-heavy inputs (see
    ``outliers``; 0: every MatMul int8). ``int8_smooth``: SmoothQuant's alpha for the
    int8 variant (see ``int8.smooth``; 0: off, 0.5 is the usual value). ``eval_data``: a
    BEIR-layout folder; the variants' retrieval quality against fp32 on its
    ``eval_split`` goes into the manifest, and an nDCG@10 drop over ``max_ndcg_drop``
    fails the export unless ``keep_anyway`` (``quality_gate``).

    A reranker (``*ForSequenceClassification`` with one label, or ``kind="reranker"``) is
    validated on ``texts.RERANK_PAIRS`` tokenised as FlagReranker does (``M3Tokenizer.encode_pairs``)
    with the score metrics of ``validate``.

    Raises ``CheckpointError`` for a bad checkpoint (before any heavy work),
    ``FileExistsError`` for a non-empty ``out`` without ``force``, and ``ExportError``
    when the fp32 graph differs from PyTorch by more than 1e-4.
    """
    if not 0 <= int8_smooth <= 1:
        raise ValueError(f"--int8-smooth must be in 0..1 (0: off), got {int8_smooth:g}")
    if not 0 <= int8_fp32_budget <= 1:
        raise ValueError(f"--int8-fp32-budget must be in 0..1, got {int8_fp32_budget:g}")
    if not 0 <= max_ndcg_drop <= 1:
        raise ValueError(f"--max-ndcg-drop must be in 0..1, got {max_ndcg_drop:g}")
    if eval_data is not None:
        from .quality_gate import check_eval_inputs

        check_eval_inputs(eval_data, eval_split)
    spec = find_spec(src)
    if spec is not None:
        kind = kind or spec.kind
        pooling = pooling or spec.pooling
        normalize = spec.normalize if normalize is None else normalize
        query_instruction = spec.query_instruction if query_instruction is None else query_instruction
        variants = variants or spec.recommended_variants  # type: ignore[assignment]
    variants = list(variants or VARIANTS)
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        raise ValueError(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    out = Path(out).expanduser().resolve()
    _check_out(out, force)
    path, resolved_revision = resolve_source(src, revision)
    ckpt = inspect_checkpoint(
        path, source=src, revision=resolved_revision, kind=kind, pooling=pooling, normalize=normalize
    )
    if ckpt.kind == M3_KIND and query_instruction:
        raise ValueError("BGE-M3 takes no query instruction")
    outputs = output_names(ckpt.kind)
    limit = ckpt.max_length
    if max_length is None:
        max_length = min(limit, spec.max_length) if spec is not None else limit
    if not 2 <= max_length <= limit:
        raise ValueError(f"--max-length must be in 2..{limit} for {src} (max_position_embeddings), got {max_length}")

    steps = _Steps(4 + validate_variants + ("fp16" in variants) + ("int8" in variants), say)
    work = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        _write_tokenizer(ckpt, work)
        tokenizer = M3Tokenizer(work / TOKENIZER_FILE)
        special = _special_tokens(work, tokenizer)
        reranker = ckpt.kind == RERANKER_KIND
        if reranker:
            ids = tokenizer.encode_pairs(RERANK_PAIRS, max_length=min(max_length, VALIDATION_MAX_LENGTH))
            groups = validate.query_groups(RERANK_PAIRS)

            def calibration() -> list[list[int]]:
                return tokenizer.encode_pairs(calibration_pairs(30), max_length=256)

        else:
            ids = tokenizer.encode(list(VALIDATION_TEXTS), min(max_length, VALIDATION_MAX_LENGTH))
            groups = []

            def calibration() -> list[list[int]]:
                return tokenizer.encode(calibration_paragraphs(30) + list(VALIDATION_TEXTS), 128)

        fp32 = work / graph_file("fp32")
        reference, probe_outputs = _export_from_torch(
            ckpt, work, variants, ids, special, steps, opset, max_length, validate_variants, outputs, tokenizer
        )
        write_references(work / REFERENCE_FILE, probe_outputs)

        infos: dict[str, VariantInfo] = {}
        for variant in VARIANTS:  # fp32 first: fp16 and int8 are judged beside it
            # fp32 is always checked: the other variants are made from it or beside it.
            if variant not in variants and variant != "fp32":
                continue
            target = work / graph_file(variant)
            if variant == "int8":
                with steps("quantizing to int8"):
                    keep, channel_max = _int8_calibration(
                        fp32, calibration, special.pad, int8_fp32_budget, int8_smooth, say
                    )
                    graphs.quantize_int8(
                        fp32, target, outputs, tuple(keep), smooth_alpha=int8_smooth, channel_max=channel_max
                    )
            metrics: dict[str, float] = {}
            if isinstance(reference, validate.Scores):
                metrics = validate.compare_scores(reference, validate.onnx_scores(target, ids, special.pad), groups)
            elif reference is not None:
                metrics = validate.compare(
                    reference, validate.onnx_outputs(target, ids, special.pad), special.unused_for_sparse
                )
            if reference is not None:
                say(f"      {variant} vs PyTorch: " + ", ".join(f"{k} {v:.3g}" for k, v in metrics.items()))
                if variant == "fp32" and validate.max_abs(metrics) > validate.FP32_TOLERANCE:
                    raise ExportError(
                        f"fp32 graph differs from PyTorch by {validate.max_abs(metrics):.3g} "
                        f"(> {validate.FP32_TOLERANCE}); the export is wrong, not written"
                    )
                if metrics["nan"]:
                    raise ExportError(f"{variant} graph produced NaN on the validation texts; not written")
                if variant == "int8":
                    if reranker:
                        real = validate.rerank_fidelity(fp32, target, tokenizer, special.pad)
                    else:
                        real = validate.retrieval_fidelity(fp32, target, tokenizer, special.pad)
                    say(
                        f"      {variant} vs fp32 on real English text: "
                        + ", ".join(f"{k} {v:.4g}" for k, v in real.items())
                    )
                    metrics |= real | {"fp32_matmuls": float(len(keep)), "smooth_alpha": float(int8_smooth)}
            if variant not in variants:
                continue
            infos[variant] = VariantInfo(
                name=variant,
                precision=PRECISION[variant],
                providers=PROVIDERS_FOR_VARIANT[variant],
                files=(file_entry(work, target), file_entry(work, work / data_file(variant))),
                validation=metrics,
                flash_min_tokens=None if variant == "fp16" else FLASH_MIN_TOKENS,
            )
        if "fp32" not in variants:
            fp32.unlink()
            (work / data_file("fp32")).unlink()

        input_shapes, output_shapes = graph_shapes(ckpt.hidden_size, ckpt.kind)
        tokenizer_files = tuple(
            file_entry(work, work / name)
            for name in (TOKENIZER_FILE, *TOKENIZER_EXTRA_FILES)
            if (work / name).is_file()
        )
        manifest = Manifest(
            format_version=FORMAT_VERSION,
            model_kind=ckpt.kind,
            source={
                "id": src,
                "path": ckpt.path.name,  # the folder's name: a package travels to other machines
                "revision": ckpt.revision,
                "weights_sha256": ckpt.weight_hashes(),
            },
            hidden_size=ckpt.hidden_size,
            max_length=max_length,
            vocab_size=int(ckpt.config["vocab_size"]),
            special_tokens=special,
            inputs=input_shapes,
            outputs=output_shapes,
            variants=infos,
            tokenizer_files=tokenizer_files,
            clean_up_tokenization_spaces=_clean_up_flag(work),
            versions=_versions() | {"opset": str(opset)},
            pooling=ckpt.pooling,
            normalize=ckpt.normalize,
            query_instruction=query_instruction or None,
            references=file_entry(work, work / REFERENCE_FILE),
        )
        (work / MANIFEST_NAME).write_text(
            json.dumps(manifest.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )
        if "int8" in infos:
            manifest = record_int8_check(work, manifest, say)
        if eval_data is not None:
            from .quality_gate import record_retrieval_eval

            manifest = record_retrieval_eval(
                work,
                manifest,
                eval_data,
                split=eval_split,
                max_ndcg_drop=max_ndcg_drop,
                keep_anyway=keep_anyway,
                say=say,
            )
        follow_umask(work)
        if out.exists():
            shutil.rmtree(out)  # only reached with force (checked above)
        work.rename(out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    say(f"wrote {out}: " + ", ".join(f"{v} ({_size(info)})" for v, info in infos.items()))
    return manifest


def current_umask() -> int:
    """The process umask, read from /proc where it is (setting it to read it races other threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(root: Path) -> None:
    """Give every file under ``root`` mode ``0o666 & ~umask`` and every folder ``0o777 & ~umask``.

    Writers differ: onnx writes the ``.onnx.data`` weights through a temporary file
    (mode 0600) while the rest get 0644, and a package exported by root would then not
    load as the unprivileged user that serves it."""
    mask = current_umask()
    root.chmod(0o777 & ~mask)
    for path in root.rglob("*"):
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def _int8_calibration(
    fp32: Path,
    calibration: Callable[[], list[list[int]]],
    pad_id: int,
    budget: float,
    smooth_alpha: float,
    say: Callable[[str], None],
) -> tuple[list[str], dict | None]:
    """MatMuls to keep in fp32 (outlier budget) and per-channel ``max|x|`` for SmoothQuant,
    both measured with the fp32 graph on the ``calibration`` token ids (embedders: 30 real
    paragraphs and the built-in texts; rerankers: 60 pairs of real paragraphs)."""
    if budget <= 0 and smooth_alpha <= 0:
        return [], None
    import onnx

    stats = outliers.activation_stats(fp32, calibration(), pad_id)
    keep: list[str] = []
    if budget > 0:
        graph = onnx.load(str(fp32), load_external_data=False)
        ratios = outliers.outlier_ratios(stats, graph)
        keep = outliers.keep_in_fp32(graph, ratios, budget)
        values = sorted(ratios.values())
        say(
            f"      keeping {len(keep)} of {len(ratios)} MatMuls in fp32: input max/rms highest {values[-1]:.0f}, "
            f"median {values[len(values) // 2]:.0f}; kept: {', '.join(f'{ratios[k]:.0f}' for k in keep) or 'none'} "
            f"(>= {outliers.OUTLIER_FACTOR:g}x median, within {budget:.0%} of the weights)"
        )
    if smooth_alpha <= 0:
        return keep, None
    say(f"      SmoothQuant (alpha {smooth_alpha:g}) on {len(stats)} MatMul inputs")
    return keep, {name: top for name, (top, _, _) in stats.items()}


def _export_from_torch(
    ckpt: Checkpoint,
    work: Path,
    variants: Sequence[str],
    ids: list[list[int]],
    special: SpecialTokens,
    steps: _Steps,
    opset: int,
    max_length: int,
    run_reference: bool,
    outputs: tuple[str, ...],
    tokenizer: M3Tokenizer,
) -> tuple[validate.Outputs | validate.Scores | None, dict]:
    """The PyTorch part: load, validation outputs, the probes' reference outputs for
    ``m3 check`` (``reference``), fp32 and fp16 graphs. The model is freed on return."""
    with steps(f"loading {ckpt.source} in PyTorch"):
        # The separator (eos; BERT's [SEP]) marks where a BERT reranker's second segment starts.
        model = load_torch_model(ckpt, sep_id=special.eos)
    reference: validate.Outputs | validate.Scores | None = None
    if run_reference:
        if ckpt.kind == RERANKER_KIND:
            with steps("running PyTorch on the validation pairs"):
                reference = validate.torch_scores(model, ids, special.pad)
        else:
            with steps("running PyTorch on the validation texts"):
                reference = validate.torch_outputs(model, ids, special.pad)
    with steps(f"running PyTorch on the probes m3 check compares with (one at {max_length} tokens)"):
        probe_outputs = torch_references(model, ckpt.kind, tokenizer, special, max_length)
    with steps(f"exporting fp32 (opset {opset}, dynamic batch and sequence <= {max_length})"):
        graphs.export_graph(model, work / graph_file("fp32"), opset=opset, max_length=max_length, outputs=outputs)
    with steps("fusing fp32 for CPU (MultiHeadAttention with a flash path, SkipLayerNorm, BiasGelu)"):
        counts = graphs.fuse_for_cpu(work / graph_file("fp32"), outputs)
        steps.say("      fusions: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    if "fp16" in variants:
        with steps("exporting fp16"):
            graphs.export_fp16(model, work / graph_file("fp16"), opset=opset, max_length=max_length, outputs=outputs)
    return reference, probe_outputs


def _size(info: VariantInfo) -> str:
    return f"{sum(f.bytes for f in info.files) / 1e6:.1f} MB"


__all__ = ["CheckpointError", "ExportError", "export_package"]
