#!/usr/bin/env bash
# Install (if needed), check the import contracts, then run the whole test suite on CPU, one torch thread per process.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The SGLang side venv (.venv-sglang): the conformance tests run SGLang's own loaders on our exports.
bash scripts/setup-sglang.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
# The import rules of docs/design.md (pyproject.toml [tool.importlinter]); a broken contract stops here.
.venv/bin/lint-imports
exec .venv/bin/python -m pytest -q "$@"
