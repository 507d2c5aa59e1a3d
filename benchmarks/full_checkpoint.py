"""Build, once, a full-size BGE-M3 checkpoint with random weights for speed work.

Same architecture and compute as BAAI/bge-m3 (XLM-R, 24 layers, hidden 1024, 16
heads, intermediate 4096, vocab 250002, 8194 positions, both heads), in the
BAAI/bge-m3 layout, with transformers' default initialisation. Real weights cannot
be downloaded here. The tokenizer is the tiny checkpoint's (same XLM-R pipeline,
1,094 pieces): it splits words into more tokens than the real 250k vocabulary, which
changes tokens per word, not the cost per token.

    python benchmarks/full_checkpoint.py [--out benchmarks/.cache/bge-m3-random]
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "models" / "tiny-m3"
DEFAULT_OUT = ROOT / "benchmarks" / ".cache" / "bge-m3-random"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "sentencepiece.bpe.model")


def build(out: Path) -> Path:
    if (out / "sparse_linear.pt").is_file():
        return out
    import torch
    from transformers import XLMRobertaConfig, XLMRobertaModel

    torch.manual_seed(0)
    config = XLMRobertaConfig(
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
        architectures=["XLMRobertaModel"],
    )
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    print(f"building {out} (568M parameters, 2.3 GB) ...", file=sys.stderr, flush=True)
    XLMRobertaModel(config, add_pooling_layer=False).eval().save_pretrained(tmp, safe_serialization=True)
    torch.save(torch.nn.Linear(1024, 1024).state_dict(), tmp / "colbert_linear.pt")
    torch.save(torch.nn.Linear(1024, 1).state_dict(), tmp / "sparse_linear.pt")
    for name in TOKENIZER_FILES:
        shutil.copy2(TINY / name, tmp / name)
    tmp.rename(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    print(build(parser.parse_args().out))


if __name__ == "__main__":
    main()
