"""Build, once, a full-size bge-reranker-v2-m3 checkpoint with random weights for speed work.

Same architecture and compute as BAAI/bge-reranker-v2-m3: ``XLMRobertaForSequenceClassification``
(24 layers, hidden 1024, 16 heads, intermediate 4096, vocab 250002, 8194 positions, one
label: dense 1024->1024, tanh, out_proj 1024->1), with transformers' default
initialisation under a fixed seed, like ``full_checkpoint.py``'s BGE-M3. Real weights
cannot be downloaded here. The tokenizer is the one the full-size random BGE-M3 has
(``full_checkpoint.TOKENIZER_FILES``, copied from its folder, or from where that script
copies them if it was not built): the tiny XLM-R pipeline of 1,094 pieces, which splits
words into more tokens than the real 250k vocabulary, so a 120-250-word passage fills
the 512-token window; that changes tokens per word, not the cost per token.

Default initialisation (std 0.02) makes the [CLS] state of every pair nearly alike, so
logits spread little across pairs: read score agreement on this checkpoint next to the
spread that ``rerank.py`` prints, not as a real model's.

    python benchmarks/full_reranker.py [--out benchmarks/.cache/bge-reranker-v2-m3-random]
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from full_checkpoint import DEFAULT_OUT as M3_RANDOM  # noqa: E402
from full_checkpoint import TINY, TOKENIZER_FILES  # noqa: E402

if TYPE_CHECKING:
    from transformers import XLMRobertaConfig

DEFAULT_OUT = HERE / ".cache" / "bge-reranker-v2-m3-random"
SEED = 0
DONE = "model.safetensors"  # the folder is built as NAME.partial and renamed only once complete


def tokenizer_source() -> Path:
    """bge-m3-random's tokenizer folder if it was built, else the files full_checkpoint copies there."""
    if all((M3_RANDOM / name).is_file() for name in TOKENIZER_FILES):
        return M3_RANDOM
    missing = [name for name in TOKENIZER_FILES if not (TINY / name).is_file()]
    if missing:
        raise FileNotFoundError(f"tokenizer files missing in {M3_RANDOM} and in {TINY}: {missing}")
    return TINY


def reranker_config() -> XLMRobertaConfig:
    """bge-reranker-v2-m3's config.json values (a transformers ``XLMRobertaConfig``)."""
    from transformers import XLMRobertaConfig

    return XLMRobertaConfig(
        vocab_size=250002,
        hidden_size=1024,
        num_hidden_layers=24,
        num_attention_heads=16,
        intermediate_size=4096,
        hidden_act="gelu",
        max_position_embeddings=8194,
        type_vocab_size=1,
        layer_norm_eps=1e-5,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        num_labels=1,
        id2label={0: "LABEL_0"},
        label2id={"LABEL_0": 0},
        architectures=["XLMRobertaForSequenceClassification"],
    )


def build(out: Path) -> Path:
    if (out / DONE).is_file() and (out / "config.json").is_file():
        return out
    if out.exists():
        raise FileExistsError(f"{out} exists but holds no {DONE}; remove it to rebuild")
    import torch
    from transformers import XLMRobertaForSequenceClassification

    torch.manual_seed(SEED)
    config = reranker_config()
    source = tokenizer_source()
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    print(f"building {out} (568M parameters, 2.3 GB; tokenizer from {source}) ...", file=sys.stderr, flush=True)
    XLMRobertaForSequenceClassification(config).eval().save_pretrained(tmp, safe_serialization=True)
    for name in TOKENIZER_FILES:
        shutil.copy2(source / name, tmp / name)
    tmp.rename(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    print(build(parser.parse_args().out))


if __name__ == "__main__":
    main()
