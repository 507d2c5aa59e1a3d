"""Find, check and load a checkpoint: BGE-M3 (BAAI/bge-m3 layout), a dense-only encoder,
or a reranker (``XLMRobertaForSequenceClassification``/``BertForSequenceClassification``
with one label, the bge-reranker layout).

Everything that can be checked without loading weights is checked in
``inspect_checkpoint`` first, so a wrong folder fails in a second with a message
naming what is missing, not after minutes of loading.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from m3_runtime.contract import DENSE_KIND, KINDS, M3_KIND, RERANKER_KIND, TOKENIZER_FILE
from m3_runtime.package import sha256_file

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
HEAD_FILES = ("colbert_linear.pt", "sparse_linear.pt")
TOKENIZER_EXTRA_FILES = ("tokenizer_config.json", "special_tokens_map.json", "sentencepiece.bpe.model")
SUPPORTED_MODEL_TYPES = ("xlm-roberta", "bert")
CLASSIFIER_SUFFIX = "ForSequenceClassification"
# The sequence classifiers a reranker may be, by model_type: the backbones the exporter handles.
RERANKER_ARCHITECTURES = {"xlm-roberta": "XLMRobertaForSequenceClassification", "bert": "BertForSequenceClassification"}


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
    if src.count("/") != 1 or src.startswith((".", "/", "~")) or src.endswith("/") or "\\" in src:
        raise CheckpointError(f"{src}: no such folder, and not a hub id of the form 'owner/name'")
    if path.parent.is_dir():  # "models/tiny-m4" beside a models/ folder: a typo of a path, not a hub id
        near = difflib.get_close_matches(path.name, [p.name for p in path.parent.iterdir() if p.is_dir()], n=3)
        raise CheckpointError(
            f"{src}: no such folder ({path.parent}/ exists but has no {path.name}"
            + (f"; did you mean {', '.join(str(path.parent / n) for n in near)}?" if near else "")
            + f"). It looks like a local path, so the hub is not tried; to export the hub model {src}, "
            f"run m3-export from a directory without a {path.parent} folder"
        )
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


def claims_reranker(config: dict[str, Any]) -> bool:
    """Whether ``config.json``'s ``architectures`` names a ``*ForSequenceClassification``."""
    archs = config.get("architectures")
    return isinstance(archs, list) and any(str(a).endswith(CLASSIFIER_SUFFIX) for a in archs)


def num_labels(config: dict[str, Any], config_path: Path) -> int:
    """Labels of a sequence classifier, by transformers' rule: ``id2label``'s size if the
    config has one, else ``num_labels``, else 2 (``PretrainedConfig``'s default)."""
    id2label = config.get("id2label")
    declared = config.get("num_labels")
    if id2label is not None and not isinstance(id2label, dict):
        raise CheckpointError(f"{config_path}: id2label must be an object, found {type(id2label).__name__}")
    if declared is not None and not isinstance(declared, int):
        raise CheckpointError(f"{config_path}: num_labels must be an integer, found {declared!r}")
    if id2label is not None and declared is not None and len(id2label) != declared:
        raise CheckpointError(
            f"{config_path}: id2label has {len(id2label)} label(s) but num_labels says {declared}; "
            "a reranker has exactly one label"
        )
    if id2label is not None:
        return len(id2label)
    return 2 if declared is None else declared


def check_reranker_config(config: dict[str, Any], config_path: Path) -> None:
    """A reranker is an XLM-R or BERT sequence classifier with exactly one label (its score
    is that label's raw logit); refuse anything else that claims to be one, naming the field."""
    archs = config.get("architectures")
    model_type = config.get("model_type")
    expected = RERANKER_ARCHITECTURES.get(str(model_type))
    if not claims_reranker(config):
        raise CheckpointError(
            f"{config_path}: architectures {archs!r} names no *{CLASSIFIER_SUFFIX}; a reranker is a sequence "
            f"classifier with one label ({' or '.join(RERANKER_ARCHITECTURES.values())})"
        )
    if expected is None:
        raise CheckpointError(
            f"{config_path}: architectures {archs} is a sequence classifier on model_type {model_type!r}, "
            f"not a supported reranker backbone (model_type {' or '.join(map(repr, RERANKER_ARCHITECTURES))})"
        )
    classifiers = [a for a in archs if str(a).endswith(CLASSIFIER_SUFFIX)]  # type: ignore[union-attr]
    if classifiers != [expected]:
        raise CheckpointError(
            f"{config_path}: architectures {archs} does not match model_type {model_type!r} "
            f"(a {model_type} reranker is {expected})"
        )
    labels = num_labels(config, config_path)
    if labels != 1:
        if config.get("id2label") is not None:
            found = f"id2label has {labels} labels"
        elif config.get("num_labels") is not None:
            found = f"num_labels is {labels}"
        else:  # transformers would build PretrainedConfig's default two-label head
            found = f"neither id2label nor num_labels is set (transformers' default: {labels} labels)"
        raise CheckpointError(
            f"{config_path}: {found}; a reranker has exactly one label (its score is the raw logit), "
            "a classifier with several labels is not supported"
        )


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

    ``kind`` None decides: a ``*ForSequenceClassification`` in ``config.json``'s
    ``architectures`` means a reranker (checked by ``check_reranker_config``);
    otherwise sentence-transformers files (``modules.json``) and no M3 head files mean
    a dense-only encoder; otherwise it is BGE-M3 and both heads are required.
    ``pooling``/``normalize`` None take the sentence-transformers files' values, else
    CLS and normalised (the BGE convention); a reranker's scores are raw logits
    (``normalize`` False, as FlagReranker's default).
    """
    if kind is not None and kind not in KINDS:
        raise CheckpointError(f"kind must be one of {', '.join(map(repr, KINDS))}, got {kind!r}")
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} is not a folder")
    config_path = path / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"checkpoint {path} has no config.json")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {config_path}: {exc}") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_path} is not a JSON object")
    if claims_reranker(config) or kind == RERANKER_KIND:
        check_reranker_config(config, config_path)
        if kind not in (None, RERANKER_KIND):
            raise CheckpointError(
                f"{config_path}: architectures {config.get('architectures')} is a reranker (one-label sequence "
                f"classifier); kind {kind!r} would drop its classification head (use kind {RERANKER_KIND!r})"
            )
        kind = RERANKER_KIND
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
    st = None if kind == RERANKER_KIND else read_sentence_transformers(path)
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
    st = st or {}

    tokenizer_json: Path | None = path / TOKENIZER_FILE
    if tokenizer_json is not None and tokenizer_json.is_file():
        from tokenizers import Tokenizer

        try:
            Tokenizer.from_file(str(tokenizer_json))
        except Exception as exc:
            raise CheckpointError(f"cannot read tokenizer {tokenizer_json}: {exc}") from None
    elif (path / "sentencepiece.bpe.model").is_file():
        tokenizer_json = None
    else:
        raise CheckpointError(f"checkpoint {path} has no tokenizer (tokenizer.json or sentencepiece.bpe.model)")
    if kind == RERANKER_KIND:
        default_normalize = False
    else:
        default_normalize = bool(st.get("normalize", True))
    return Checkpoint(
        path=path,
        source=source or str(path),
        revision=revision,
        config=config,
        weights=weights,
        tokenizer_json=tokenizer_json,
        kind=kind,
        pooling=pooling or st.get("pooling", "cls"),
        normalize=default_normalize if normalize is None else normalize,
        st_max_length=st.get("max_length"),
    )


def load_torch_model(ckpt: Checkpoint, *, sep_id: int | None = None):
    """The module to export: ``M3Graph``, ``DenseGraph`` or ``RerankerGraph`` (``sep_id``: the
    tokenizer's separator, from which a BERT reranker's token types are derived). torch is
    imported here, lazily, so ``--help`` and the refusals stay fast."""
    import torch
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    from .wrapper import DenseGraph, M3Graph

    # Eager attention: the plainest graph, and the one every exporter path handles.
    hf_logging.set_verbosity_error()  # "weights of the pooler not used" is expected: M3 has no pooler
    if ckpt.kind == RERANKER_KIND:
        return load_reranker(ckpt, sep_id=sep_id)
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


def load_reranker(ckpt: Checkpoint, *, sep_id: int | None = None):  # -> RerankerGraph
    """transformers' ``AutoModelForSequenceClassification`` (the class FlagReranker loads), in
    its ``RerankerGraph``; the loaded head must have the one label the config promised."""
    from transformers import AutoModelForSequenceClassification

    from .wrapper import RerankerGraph

    model = AutoModelForSequenceClassification.from_pretrained(ckpt.path, attn_implementation="eager").eval()
    if model.config.num_labels != 1:  # checked from config.json already; a guard against a config/class mismatch
        raise CheckpointError(f"{ckpt.path / 'config.json'}: loaded a classifier with {model.config.num_labels} labels")
    return RerankerGraph(model, sep_id=sep_id).eval()
