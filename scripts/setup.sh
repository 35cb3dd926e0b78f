#!/usr/bin/env bash
# Create (or update) .venv at the project root with mlipd and what its tests and examples need.
# torch is installed first and pinned here, so that no later package pulls a multi-GB CUDA
# build on a CPU machine; GPU users: install the torch build you want first, then re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==${MLIPD_TORCH_VERSION:-2.13.0}" 2>&1 | grep -v '^WARNING: Location' || true
python -m pip install -q -e ".[test]" 2>&1 | grep -v '^WARNING: Location' || true
python -c "import torch, mlipd, chgnet, ipi; print('mlipd', mlipd.__version__, 'torch', torch.__version__)"
