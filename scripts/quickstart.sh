#!/usr/bin/env bash
# Install (scripts/setup.sh) and run the offline quickstart: demo data, a tiny base, 4 experts,
# a router and the evaluation table, on CPU. Extra arguments are config overrides (key.path=value).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu} TOKENIZERS_PARALLELISM=false
exec .venv/bin/loramix run configs/quickstart.yaml --output out/quickstart "$@"
