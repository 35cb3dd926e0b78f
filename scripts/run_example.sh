#!/usr/bin/env bash
# Set up .venv with mlipd[examples] (scripts/setup.sh examples: CHGNet, i-PI, matplotlib) and
# run the main example: i-PI path-integral MD of crystalline Si with forces from mlipd
# (pretrained CHGNet, float32). Extra arguments go to the example (--help lists them).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh examples
. .venv/bin/activate
exec python examples/run_pimd.py "$@"
