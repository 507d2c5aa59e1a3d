"""The contract between exporter and runtime: graph names, variants, manifest schema.

Every string that both sides must agree on lives here and nowhere else.

BGE-M3 graph (one per variant, backbone + both heads):
    input_ids       (batch, seq) int64
    attention_mask  (batch, seq) int64
 -> dense_vecs      (batch, hidden) float32       normalize(h[:, 0])
    sparse_weights  (batch, seq) float32          relu(sparse_linear(h)).squeeze(-1)
    colbert_vecs    (batch, seq - 1, hidden) float32
                    normalize(colbert_linear(h[:, 1:]) * mask[:, 1:, None]), zero at padding

Dense-only graph (bge-*-en-v1.5, sentence-transformers encoders): the same inputs,
``dense_vecs`` alone, ``normalize?(pool(h))`` with CLS or masked-mean pooling.

Reranker graph (bge-reranker-*, ``XLMRobertaForSequenceClassification`` with one
label): the same inputs for ``<s> query </s></s> passage </s>``,
 -> scores          (batch,) float32              logits.view(-1), the raw logit

Which outputs a model kind has is one table, ``KINDS``: a new kind is one row.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Final, Literal, get_args

from .errors import M3Error

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
TOKENIZER_FILE = "tokenizer.json"
# PyTorch fp32 outputs of fixed probes, stored at export for `m3 check` (references.py).
REFERENCE_FILE = "reference.npz"

INPUT_NAMES: tuple[str, ...] = ("input_ids", "attention_mask")
DENSE = "dense_vecs"
SPARSE = "sparse_weights"
COLBERT = "colbert_vecs"
SCORES = "scores"
OUTPUT_NAMES: tuple[str, ...] = (DENSE, SPARSE, COLBERT)

M3_KIND: Final = "bge-m3"
DENSE_KIND: Final = "dense"
RERANKER_KIND: Final = "reranker"
KindName = Literal["bge-m3", "dense", "reranker"]
Pooling = Literal["cls", "mean"]


@dataclass(frozen=True)
class ModelKind:
    """A model kind: its graph outputs and what it is for (used in messages)."""

    name: KindName
    outputs: tuple[str, ...]
    description: str
    # Inputs are single texts (embedders) or (query, passage) pairs (rerankers).
    pairs: bool = False

    def has(self, output: str) -> bool:
        return output in self.outputs


KINDS: dict[str, ModelKind] = {
    M3_KIND: ModelKind(M3_KIND, (DENSE, SPARSE, COLBERT), "BGE-M3 model (dense, sparse, ColBERT)"),
    DENSE_KIND: ModelKind(DENSE_KIND, (DENSE,), "dense-only model"),
    RERANKER_KIND: ModelKind(RERANKER_KIND, (SCORES,), "reranker (cross-encoder)", pairs=True),
}


def model_kind(name: str) -> ModelKind:
    try:
        return KINDS[name]
    except KeyError:
        raise ManifestError(f"unknown model kind {name!r} (known: {', '.join(KINDS)})") from None


def output_names(kind: str) -> tuple[str, ...]:
    """Graph outputs of a model kind (``KINDS``)."""
    return model_kind(kind).outputs


Variant = Literal["fp32", "fp16", "int8"]
VARIANTS: tuple[Variant, ...] = get_args(Variant)

TENSORRT = "TensorrtExecutionProvider"
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"

# Which execution providers each variant is built for. fp16 on the CPU provider runs,
# but slower than fp32 (casts and fp32 fallbacks); int8 through ORT on GPUs is slower
# than fp16.
# The int8 graph's per-token activation quantization (exporter ``int8.py``) reads its
# range from these initializers: 1/127 (scale = amax * it) and the uint8 zero point 128,
# once as a scalar and once shaped (1, 1, 1). On x86 CPUs without VNNI ONNX Runtime's
# u8 x s8 kernel sums pairs of products in int16 with saturation (vpmaddubsw), so the
# runtime narrows activations to 7 bits there by overriding them (``session.py``).
INT8_INV_RANGE = "m3_q_inv127"
INT8_ZERO_POINT = "m3_q_zp"
INT8_ZERO_POINT_3D = "m3_q_zp3"

PROVIDERS_FOR_VARIANT: dict[Variant, tuple[str, ...]] = {
    "fp32": (CPU, CUDA),
    "fp16": (TENSORRT, CUDA),
    "int8": (CPU,),
}


def graph_file(variant: Variant) -> str:
    return f"model.{variant}.onnx"


def data_file(variant: Variant) -> str:
    """External-data file holding all weights of a variant, next to its graph."""
    return f"model.{variant}.onnx.data"


class ManifestError(M3Error, ValueError):
    """The manifest is missing fields, has wrong types or an unknown format version."""


@dataclass(frozen=True)
class FileEntry:
    path: str
    bytes: int
    sha256: str


@dataclass(frozen=True)
class VariantInfo:
    name: Variant
    precision: str
    providers: tuple[str, ...]
    files: tuple[FileEntry, ...]
    validation: dict[str, float] = field(default_factory=dict)
    # Activations quantized with one scale per run (dynamic int8): a text's result then
    # depends on the other texts and the padding in its batch.
    dynamic_activations: bool = False
    # CPU-fused graphs: an unpadded batch LONGER than this takes ONNX Runtime's flash
    # attention kernel, every other batch the masked one. The two differ by ~1e-7, which
    # int8 rounding can turn into 1e-3, so the runtime pads only texts up to this length
    # and batches longer ones with texts of their own length. None: one kernel only.
    flash_min_tokens: int | None = None
    # m3 check's measures of this variant on the export machine's CPU against the stored
    # references (int8 only): m3 check elsewhere holds it to be no worse, within a margin.
    at_export: dict[str, float] = field(default_factory=dict)

    @property
    def graph(self) -> str:
        return graph_file(self.name)


@dataclass(frozen=True)
class SpecialTokens:
    bos: int
    pad: int
    eos: int
    unk: int
    mask: int | None = None

    @property
    def unused_for_sparse(self) -> frozenset[int]:
        """Ids FlagEmbedding drops from lexical weights: cls(<s>), eos, pad, unk."""
        return frozenset((self.bos, self.eos, self.pad, self.unk))


@dataclass(frozen=True)
class Manifest:
    format_version: int
    model_kind: str
    source: dict[str, Any]
    hidden_size: int
    max_length: int
    vocab_size: int
    special_tokens: SpecialTokens
    inputs: dict[str, list[str]]
    outputs: dict[str, list[str]]
    variants: dict[str, VariantInfo]
    tokenizer_files: tuple[FileEntry, ...]
    clean_up_tokenization_spaces: bool
    versions: dict[str, str]
    pooling: str = "cls"  # dense = normalize?(pool(h)): "cls" h[:, 0], "mean" masked mean of h
    normalize: bool = True
    query_instruction: str | None = None  # prepended by encode_queries
    # The reference outputs file (REFERENCE_FILE); None in packages written before them.
    references: FileEntry | None = None
    # m3-export --eval: retrieval quality of each variant on the user's data (m3 eval's
    # figures and the bound; docs/evaluation.md). None: not evaluated at export.
    retrieval_eval: dict[str, Any] | None = None

    @property
    def kind(self) -> ModelKind:
        return model_kind(self.model_kind)

    @property
    def output_names(self) -> tuple[str, ...]:
        return self.kind.outputs

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["variants"] = {k: asdict(v) for k, v in self.variants.items()}
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        try:
            version = data["format_version"]
        except (KeyError, TypeError):
            raise ManifestError("manifest has no 'format_version'") from None
        if version != FORMAT_VERSION:
            raise ManifestError(
                f"manifest format_version {version!r} is not supported by this runtime "
                f"(it reads version {FORMAT_VERSION}); re-export the package or upgrade m3-runtime"
            )
        try:
            variants = {}
            for key, raw in data["variants"].items():
                if key not in VARIANTS:
                    raise ManifestError(f"unknown variant {key!r} (known: {', '.join(VARIANTS)})")
                variants[key] = VariantInfo(
                    name=key,
                    precision=str(raw["precision"]),
                    providers=tuple(raw["providers"]),
                    files=tuple(FileEntry(**f) for f in raw["files"]),
                    validation={k: float(v) for k, v in raw.get("validation", {}).items()},
                    dynamic_activations=bool(raw.get("dynamic_activations", False)),
                    flash_min_tokens=(None if raw.get("flash_min_tokens") is None else int(raw["flash_min_tokens"])),
                    at_export={k: float(v) for k, v in raw.get("at_export", {}).items()},
                )
            return cls(
                format_version=int(version),
                model_kind=model_kind(str(data["model_kind"])).name,
                source=dict(data["source"]),
                hidden_size=int(data["hidden_size"]),
                max_length=int(data["max_length"]),
                vocab_size=int(data["vocab_size"]),
                special_tokens=SpecialTokens(**data["special_tokens"]),
                inputs={k: list(v) for k, v in data["inputs"].items()},
                outputs={k: list(v) for k, v in data["outputs"].items()},
                variants=variants,
                tokenizer_files=tuple(FileEntry(**f) for f in data["tokenizer_files"]),
                clean_up_tokenization_spaces=bool(data["clean_up_tokenization_spaces"]),
                versions=dict(data["versions"]),
                pooling=str(data.get("pooling", "cls")),
                normalize=bool(data.get("normalize", True)),
                query_instruction=data.get("query_instruction"),
                references=None if data.get("references") is None else FileEntry(**data["references"]),
                retrieval_eval=None if data.get("retrieval_eval") is None else dict(data["retrieval_eval"]),
            )
        except KeyError as exc:
            raise ManifestError(f"manifest is missing the field {exc.args[0]!r}") from None
        except (TypeError, ValueError, AttributeError) as exc:
            if isinstance(exc, ManifestError):
                raise
            raise ManifestError(f"manifest has a malformed field: {exc}") from None


def graph_shapes(hidden_size: int, kind: str = M3_KIND) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """Symbolic shapes written to the manifest and checked against the graph at load."""
    inputs = {name: ["batch", "sequence"] for name in INPUT_NAMES}
    shapes = {
        DENSE: ["batch", str(hidden_size)],
        SPARSE: ["batch", "sequence"],
        COLBERT: ["batch", "sequence-1", str(hidden_size)],
        SCORES: ["batch"],
    }
    return inputs, {name: shapes[name] for name in output_names(kind)}
