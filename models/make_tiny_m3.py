"""Build the tiny BGE-M3-layout checkpoint committed at models/tiny-m3/.

It has the real model's layout and pipeline at a toy size, so every code path of
the exporter and the runtime runs on it in seconds:

- tokenizer: a SentencePiece unigram model trained on models/source/multilingual.txt
  with the ``nmt_nfkc`` normaliser, wrapped by transformers' XLM-R tokenizer, so
  ``sentencepiece.bpe.model`` and ``tokenizer.json`` (precompiled charsmap, Metaspace,
  ``<s> A </s>`` template, ``<s>``=0 ``<pad>``=1 ``</s>``=2 ``<unk>``=3, ``<mask>`` last)
  have XLM-R's pipeline;
- backbone: ``XLMRobertaModel`` with 2 layers, hidden 64, 4 heads and
  ``max_position_embeddings`` 8194, so 8192-token inputs run;
- heads: ``colbert_linear.pt`` (Linear(64, 64)) and ``sparse_linear.pt`` (Linear(64, 1)).

Weights are drawn with a larger spread than transformers' default (std 0.02), which
gives a cosine of ~0.9999 between the dense vectors of any two texts and would make
parity tests blind. The script prints the cosine spread it reached.

Run: python models/make_tiny_m3.py [--out models/tiny-m3]
Needs: torch, transformers (<5 or >=5), sentencepiece, protobuf.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import sentencepiece as spm
import torch
from transformers import XLMRobertaConfig, XLMRobertaModel, XLMRobertaTokenizerFast

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "source" / "multilingual.txt"
HIDDEN = 64
SEED = 20261128


def train_tokenizer(workdir: Path) -> XLMRobertaTokenizerFast:
    prefix = workdir / "spm"
    spm.SentencePieceTrainer.train(
        input=str(CORPUS),
        model_prefix=str(prefix),
        model_type="unigram",
        vocab_size=1500,
        hard_vocab_limit=False,
        character_coverage=1.0,
        normalization_rule_name="nmt_nfkc",
        # XLM-R's own SentencePiece model: <unk>=0 <s>=1 </s>=2, no pad piece. The
        # transformers wrapper shifts ids by one and puts <pad> at 1, like fairseq.
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    # The fast tokenizer is converted from the slow one by transformers' XLM-R converter.
    return XLMRobertaTokenizerFast(vocab_file=str(prefix) + ".model", model_max_length=8192)


def init_discriminative(model: torch.nn.Module, generator: torch.Generator) -> None:
    for name, param in model.named_parameters():
        with torch.no_grad():
            if name.endswith("LayerNorm.weight"):
                param.copy_(1.0 + 0.2 * torch.randn(param.shape, generator=generator))
            elif name.endswith("bias"):
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
            elif "position_embeddings" in name:
                param.copy_(0.3 * torch.randn(param.shape, generator=generator))
            elif "embeddings" in name:
                param.copy_(torch.randn(param.shape, generator=generator))
            else:  # Linear weights [out, in]: unit-variance outputs; sharper attention
                gain = 3.0 if (".query." in name or ".key." in name) else 1.0
                param.copy_(gain * torch.randn(param.shape, generator=generator) / param.shape[-1] ** 0.5)


def build(out: Path) -> None:
    torch.manual_seed(SEED)
    generator = torch.Generator().manual_seed(SEED)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = train_tokenizer(Path(tmp))
        config = XLMRobertaConfig(
            vocab_size=len(tokenizer),
            hidden_size=HIDDEN,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            hidden_act="gelu",
            max_position_embeddings=8194,
            type_vocab_size=1,
            layer_norm_eps=1e-5,
            pad_token_id=1,
            bos_token_id=0,
            eos_token_id=2,
            architectures=["XLMRobertaModel"],
        )
        model = XLMRobertaModel(config, add_pooling_layer=True).eval()
        init_discriminative(model, generator)
        colbert = torch.nn.Linear(HIDDEN, HIDDEN)
        sparse = torch.nn.Linear(HIDDEN, 1)
        init_discriminative(colbert, generator)
        init_discriminative(sparse, generator)
        with torch.no_grad():
            sparse.bias.fill_(0.0)  # about half the tokens get a positive weight

        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
        torch.save(colbert.state_dict(), out / "colbert_linear.pt")
        torch.save(sparse.state_dict(), out / "sparse_linear.pt")
        report(model, tokenizer)


def report(model: XLMRobertaModel, tokenizer: XLMRobertaTokenizerFast) -> None:
    texts = [
        "The quick brown fox jumps over the lazy dog.",
        "北京是中华人民共和国的首都。",
        "Быстрая коричневая лиса прыгает через ленивую собаку.",
        "SELECT id FROM documents;",
        "😀 🚀 🔥",
        "",
    ]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        h = model(**batch).last_hidden_state[:, 0]
    h = torch.nn.functional.normalize(h, dim=-1)
    cos = h @ h.T
    off = cos[~torch.eye(len(texts), dtype=torch.bool)]
    print(f"vocab {len(tokenizer)}; dense cosine between different texts: min {off.min():.3f} max {off.max():.3f}")
    print("ids of 'Hello world':", tokenizer("Hello world")["input_ids"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE / "tiny-m3")
    build(parser.parse_args().out)


if __name__ == "__main__":
    main()
