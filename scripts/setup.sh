#!/usr/bin/env bash
# Create (or update) the project's virtual environment in .venv and install foundation with everything it needs.
# Idempotent: a second run with the same pyproject.toml and this script only checks a stamp. torch comes first (pinned to the CPU build; an unpinned torch pulls a
# multi-GB CUDA build), then deepspeed without build isolation (its build imports torch), then the package.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
STAMP="$VENV/.foundation-setup"
WANT=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)-$TORCH_SPEC
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] && "$VENV/bin/python" -c "import importlib.util as u, sys; sys.exit(not all(map(u.find_spec, ['foundation', 'deepspeed', 'torch'])))" 2>/dev/null; then
  echo "[setup] $VENV is up to date"
  exit 0
fi
rm -f "$STAMP"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip setuptools wheel
fi
# --no-compile: no .pyc for every file of every package at install time (torch alone: 64 s -> 25 s); Python
# compiles the modules it imports on first use
pip_install() { "$VENV/bin/python" -m pip install -q --no-compile --disable-pip-version-check "$@"; }
"$VENV/bin/python" -c "import torch" 2>/dev/null || { echo "[setup] installing $TORCH_SPEC"; pip_install "$TORCH_SPEC"; }
"$VENV/bin/python" -c "import deepspeed" 2>/dev/null || { echo "[setup] installing deepspeed"; DS_BUILD_OPS=0 pip_install --no-build-isolation deepspeed; }
echo "[setup] installing foundation and its dependencies"
# the constraint keeps every extra (torch-sim, sevenn, ...) on the torch installed above
pip_install -e ".[test,xtb,dft,distill,torchsim,docs]" --constraint <(echo "$TORCH_SPEC")
echo "$WANT" > "$STAMP"
echo "[setup] done: $VENV/bin/foundation --help"
