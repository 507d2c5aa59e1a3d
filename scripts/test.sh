#!/usr/bin/env bash
# Install everything into .venv, then lint, type-check the runtime and run the tests.
# CI (.ci/run) runs exactly this. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh --dev
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy runtime/src exporter/src
.venv/bin/python -m pytest "$@"
