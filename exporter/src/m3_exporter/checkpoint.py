"""Find, check and load a BGE-M3 checkpoint (BAAI/bge-m3 layout).

Everything that can be checked without loading weights is checked in
``inspect_checkpoint`` first, so a wrong folder fails in a second with a message
naming what is missing, not after minutes of loading.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from m3_runtime.contract import DENSE_KIND, M3_KIND, TOKENIZER_FILE
from m3_runtime.package import sha256_file

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
HEAD_FILES = ("colbert_linear.pt", "sparse_linear.pt")
TOKENIZER_EXTRA_FILES = ("tokenizer_config.json", "special_tokens_map.json", "sentencepiece.bpe.model")
SUPPORTED_MODEL_TYPES = ("xlm-roberta", "bert")


class CheckpointError(ValueError):
    """The checkpoint is missing files or is not a BGE-M3-layout model."""


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    source: str
    revision: str
    config: dict
    weights: Path
    tokenizer_json: Path | None  # None: converted from sentencepiece.bpe.model at export
    kind: str = M3_KIND
    pooling: str = "cls"
    normalize: bool = True
    st_max_length: int | None = None  # sentence-transformers' max_seq_length

    @property
    def hidden_size(self) -> int:
        return int(self.config["hidden_size"])

    @property
    def max_length(self) -> int:
        positions = int(self.config["max_position_embeddings"])
        if self.config.get("model_type") == "xlm-roberta":
            # XLM-R positions start at pad_id + 1 = 2, so 8194 positions hold 8192 tokens.
            positions -= int(self.config.get("pad_token_id", 1)) + 1
        return min(positions, self.st_max_length or positions)

    def weight_hashes(self) -> dict[str, str]:
        files = [self.weights, *(self.path / name for name in HEAD_FILES if self.kind == M3_KIND)]
        return {f.name: sha256_file(f) for f in files}


def read_sentence_transformers(path: Path) -> dict | None:
    """Pooling, normalisation and max length from sentence-transformers files, if any.

    ``modules.json`` lists the pipeline (a ``Normalize`` module means L2-normalised
    output); ``1_Pooling/config.json`` (or the folder modules.json names) holds the
    pooling mode; ``sentence_bert_config.json`` holds ``max_seq_length``.
    """
    modules_file = path / "modules.json"
    if not modules_file.is_file():
        return None
    try:
        modules = json.loads(modules_file.read_text(encoding="utf-8"))
        found: dict = {"normalize": any(m.get("type", "").endswith(".Normalize") for m in modules)}
        pooling_dirs = [m.get("path", "") for m in modules if m.get("type", "").endswith(".Pooling")]
        if pooling_dirs:
            pooling = json.loads((path / pooling_dirs[0] / "config.json").read_text(encoding="utf-8"))
            if pooling.get("pooling_mode_cls_token"):
                found["pooling"] = "cls"
            elif pooling.get("pooling_mode_mean_tokens"):
                found["pooling"] = "mean"
            else:
                modes = [k for k, v in pooling.items() if k.startswith("pooling_mode") and v]
                raise CheckpointError(
                    f"{path / pooling_dirs[0] / 'config.json'}: pooling {modes} is not supported (cls or mean)"
                )
        bert_config = path / "sentence_bert_config.json"
        if bert_config.is_file():
            found["max_length"] = int(json.loads(bert_config.read_text(encoding="utf-8"))["max_seq_length"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise CheckpointError(f"cannot read the sentence-transformers files in {path}: {exc}") from None
    return found


def resolve_source(src: str, revision: str | None = None) -> tuple[Path, str]:
    """A local folder as is; otherwise a hub id, downloaded with huggingface_hub."""
    path = Path(src).expanduser()
    if path.exists():
        return path.resolve(), "local"
    if src.count("/") != 1 or src.startswith((".", "/", "~")):
        raise CheckpointError(f"{src}: no such folder, and not a hub id of the form 'owner/name'")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointError(f"{src} is not a local folder; downloading it needs huggingface_hub") from None
    try:
        local = snapshot_download(
            repo_id=src,
            revision=revision,
            allow_patterns=["*.json", "*.safetensors", "*.bin", "*.pt", "*.model"],
        )
    except Exception as exc:
        raise CheckpointError(f"cannot download {src} from the hub: {exc}") from None
    return Path(local), revision or "main"


def inspect_checkpoint(
    path: Path,
    *,
    source: str | None = None,
    revision: str = "local",
    kind: str | None = None,
    pooling: str | None = None,
    normalize: bool | None = None,
) -> Checkpoint:
    """Check a checkpoint without loading weights.

    ``kind`` None decides: sentence-transformers files (``modules.json``) and no M3
    head files mean a dense-only encoder; otherwise it is BGE-M3 and both heads are
    required. ``pooling``/``normalize`` None take the sentence-transformers files'
    values, else CLS and normalised (the BGE convention).
    """
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} is not a folder")
    config_path = path / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"checkpoint {path} has no config.json")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {config_path}: {exc}") from None
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(
            f"{config_path}: model_type {model_type!r} is not a supported backbone (expected one of {SUPPORTED_MODEL_TYPES}; "
            f"architectures {config.get('architectures')})"
        )
    for key in ("hidden_size", "max_position_embeddings", "vocab_size"):
        if not isinstance(config.get(key), int):
            raise CheckpointError(f"{config_path} has no integer {key!r}")

    weights = next((path / n for n in WEIGHT_FILES if (path / n).is_file()), None)
    if weights is None:
        raise CheckpointError(f"checkpoint {path} has no backbone weights (looked for {', '.join(WEIGHT_FILES)})")
    st = read_sentence_transformers(path)
    heads_present = [n for n in HEAD_FILES if (path / n).is_file()]
    if kind is None:
        kind = DENSE_KIND if (st is not None and not heads_present) else M3_KIND
    if kind == M3_KIND:
        if model_type != "xlm-roberta":
            raise CheckpointError(f"{config_path}: BGE-M3 needs an xlm-roberta backbone, found {model_type!r}")
        missing_heads = [n for n in HEAD_FILES if n not in heads_present]
        if missing_heads:
            raise CheckpointError(
                f"checkpoint {path} is missing the M3 head file(s) {', '.join(missing_heads)}; "
                "without both heads there are no sparse or ColBERT outputs (for a dense-only encoder pass --kind dense)"
            )
    elif kind != DENSE_KIND:
        raise CheckpointError(f"kind must be {M3_KIND!r} or {DENSE_KIND!r}, got {kind!r}")
    st = st or {}

    tokenizer_json: Path | None = path / TOKENIZER_FILE
    if tokenizer_json.is_file():
        from tokenizers import Tokenizer

        try:
            Tokenizer.from_file(str(tokenizer_json))
        except Exception as exc:
            raise CheckpointError(f"cannot read tokenizer {tokenizer_json}: {exc}") from None
    elif (path / "sentencepiece.bpe.model").is_file():
        tokenizer_json = None
    else:
        raise CheckpointError(f"checkpoint {path} has no tokenizer (tokenizer.json or sentencepiece.bpe.model)")
    return Checkpoint(
        path=path,
        source=source or str(path),
        revision=revision,
        config=config,
        weights=weights,
        tokenizer_json=tokenizer_json,
        kind=kind,
        pooling=pooling or st.get("pooling", "cls"),
        normalize=st.get("normalize", True) if normalize is None else normalize,
        st_max_length=st.get("max_length"),
    )


def load_torch_model(ckpt: Checkpoint):  # -> M3Graph | DenseGraph; torch imported lazily so --help stays fast
    import torch
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    from .wrapper import DenseGraph, M3Graph

    # Eager attention: the plainest graph, and the one every exporter path handles.
    hf_logging.set_verbosity_error()  # "weights of the pooler not used" is expected: M3 has no pooler
    backbone = AutoModel.from_pretrained(ckpt.path, add_pooling_layer=False, attn_implementation="eager").eval()
    if ckpt.kind == DENSE_KIND:
        return DenseGraph(backbone, ckpt.pooling, ckpt.normalize).eval()
    hidden = backbone.config.hidden_size
    heads = {}
    for name, out_features in (("colbert_linear", None), ("sparse_linear", 1)):
        file = ckpt.path / f"{name}.pt"
        try:
            state = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointError(f"cannot read {file}: {exc}") from None
        weight = state.get("weight")
        if weight is None or weight.ndim != 2 or weight.shape[1] != hidden:
            shape = None if weight is None else tuple(weight.shape)
            raise CheckpointError(f"{file}: expected a Linear({hidden}, ...) state dict, found weight of shape {shape}")
        if out_features is not None and weight.shape[0] != out_features:
            raise CheckpointError(f"{file}: expected Linear({hidden}, {out_features}), found {tuple(weight.shape)}")
        layer = torch.nn.Linear(hidden, weight.shape[0], bias="bias" in state)
        layer.load_state_dict(state)
        heads[name] = layer
    return M3Graph(backbone, heads["colbert_linear"], heads["sparse_linear"]).eval()
