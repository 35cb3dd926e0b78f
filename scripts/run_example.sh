#!/usr/bin/env bash
# Set up .venv (scripts/setup.sh) and run the main example: i-PI path-integral MD of
# crystalline Si with forces from mlipd (pretrained CHGNet). Extra arguments go to the example.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh main
. .venv/bin/activate
exec python examples/run_pimd.py "$@"
