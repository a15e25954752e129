#!/usr/bin/env bash
# Install (scripts/setup.sh) and run the test suite on CPU. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu} TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest -m "not gpu" -q -p no:cacheprovider --durations=15 "$@"
