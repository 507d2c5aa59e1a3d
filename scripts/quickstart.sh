#!/usr/bin/env bash
# Install, export the committed tiny checkpoint (fp32, fp16, int8, each validated
# against PyTorch), then encode and score with the torch-free runtime.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
out=out/tiny-m3
force=()
if [ -f "$out/manifest.json" ]; then
  force=(--force)  # replace only a package this script wrote before
fi
.venv/bin/m3-export models/tiny-m3 "$out" --variants fp32,fp16,int8 "${force[@]}"
echo
.venv/bin/m3 info "$out"
echo
echo '$ m3 encode out/tiny-m3 --sparse --tokens "What is BGE M3?" "BGE M3 是一个多语言的嵌入模型"'
.venv/bin/m3 encode "$out" --sparse --tokens "What is BGE M3?" "BGE M3 是一个多语言的嵌入模型"
echo
.venv/bin/python - "$out" <<'PY'
import sys

from m3_runtime import M3Model

model = M3Model(sys.argv[1])  # int8 on a CPU-only machine, fp16 where CUDA/TensorRT exist
print(model)
queries = ["What is BGE M3?", "Defination of BM25"]
passages = [
    "BGE M3 is an embedding model supporting dense retrieval, lexical matching and multi-vector interaction.",
    "BM25 is a bag-of-words retrieval function that ranks a set of documents based on the query terms appearing in each document",
]
q = model.encode(queries, return_dense=True, return_sparse=True, return_colbert_vecs=True)
p = model.encode(passages, return_dense=True, return_sparse=True, return_colbert_vecs=True)
print("dense q @ p.T:\n", q["dense_vecs"] @ p["dense_vecs"].T)
print("lexical:\n", model.compute_lexical_matching_score(q["lexical_weights"], p["lexical_weights"]))
print("colbert:", [round(model.colbert_score(q["colbert_vecs"][i], p["colbert_vecs"][i]), 4) for i in range(2)])
scores = model.compute_score([(a, b) for a in queries for b in passages], weights_for_different_modes=[0.4, 0.2, 0.4])
for key, values in scores.items():
    print(f"{key:>22}: {[round(v, 4) for v in values]}")
PY
