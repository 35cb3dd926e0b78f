#!/usr/bin/env bash
# Create (or update) .venv at the project root with mlipd and one of its extras:
#   bash scripts/setup.sh            # test: everything the tests need (every model, i-PI, ...)
#   bash scripts/setup.sh examples   # what the examples need (CHGNet, i-PI, matplotlib)
# torch is installed first and pinned here, so that no later package pulls a multi-GB CUDA
# build on a CPU machine; GPU users: install the torch build you want first, then re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=${1:-test}
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
# pip's failures propagate (pipefail); only its notes about unreadable local indexes are dropped
pip_install() { python -m pip install -q "$@" 2>&1 | { grep -v '^WARNING: Location' || true; }; }
pip_install --upgrade pip
python -c "import torch" 2>/dev/null || pip_install "torch==${MLIPD_TORCH_VERSION:-2.13.0}"
pip_install -e ".[$EXTRAS]"
if [ "$EXTRAS" = test ]; then
  # eSEN (fairchem-core) pins e3nn>=0.5 while mace-torch pins e3nn==0.4.4. eSEN only uses
  # e3nn's ToS2Grid/FromS2Grid/Irreps, which 0.4.4 has, so fairchem-core goes in without its
  # pins, with just the packages its import needs (torchtnt needs pkg_resources: setuptools<81).
  if ! python -c "import fairchem.core" 2>/dev/null; then
    pip_install --no-deps "fairchem-core==2.24.0" "torchtnt==0.2.4"
    pip_install hydra-core pyre-extensions "wandb==0.31.0" backoff websockets submitit "setuptools<81"
  fi
  python -c "import torch, mlipd, chgnet, mace, matgl, fairchem.core, ipi
print('mlipd', mlipd.__version__, 'torch', torch.__version__)"
else
  python -c "import torch, mlipd, chgnet, ipi, matplotlib
print('mlipd', mlipd.__version__, 'torch', torch.__version__)"
fi
