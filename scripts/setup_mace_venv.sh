#!/usr/bin/env bash
# Create a separate venv with mace-torch for scripts/bench_model.py (side-by-side baseline).
#
# Usage: bash scripts/setup_mace_venv.sh [VENV_DIR]        (default /work/mace-venv)
#
# mace-torch pins e3nn==0.4.4, which conflicts with our e3nn, so it lives in its own venv and the benchmark
# runs it as a subprocess (scripts/_mace_worker.py). Order matters: torch is installed FIRST, pinned, so that
# resolving mace-torch's `torch>=1.12` never pulls an unpinned (multi-GB CUDA) torch from the index.
# Environment: PYTHON (interpreter for the venv, default python3), TORCH_SPEC (default torch==2.13.0; the
# torch-<version>+cpu wheel in pip's find-links folder is used when present), MACE_SPEC (default
# mace-torch==0.3.16), E3NN_SPEC (default e3nn==0.4.4, mace-torch's own pin, which imports on torch 2.13 once
# TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 lets it read its packaged constants.pt; the benchmark sets it).
set -euo pipefail

VENV_DIR="${1:-/work/mace-venv}"
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
MACE_SPEC="${MACE_SPEC:-mace-torch==0.3.16}"
E3NN_SPEC="${E3NN_SPEC:-e3nn==0.4.4}"

if [ ! -x "$VENV_DIR/bin/python" ]; then
    "$PYTHON" -m venv "$VENV_DIR"
fi
PIP=("$VENV_DIR/bin/python" -m pip)
"${PIP[@]}" install --quiet --upgrade pip

# 1) torch, pinned, CPU build: the local wheel from pip's find-links folder when there is one (a plain
#    `torch==X` from the index would resolve to the CUDA build), else TORCH_SPEC as pip is configured.
if ! "$VENV_DIR/bin/python" -c "import torch" 2>/dev/null; then
    WANT="${TORCH_SPEC#torch==}"
    LINKS="${PIP_FIND_LINKS:-$("$VENV_DIR/bin/python" -m pip config get global.find-links 2>/dev/null || true)}"
    WHEEL=""
    for dir in $LINKS; do
        for f in "${dir#file://}"/torch-"$WANT"+cpu-*.whl; do [ -f "$f" ] && WHEEL="$f"; done
    done
    if [ -n "$WHEEL" ]; then
        echo "[setup_mace_venv] torch from $WHEEL"
        "${PIP[@]}" install "$WHEEL"
    else
        echo "[setup_mace_venv] no local CPU torch wheel found; installing $TORCH_SPEC as pip is configured"
        "${PIP[@]}" install "$TORCH_SPEC"
    fi
fi
TORCH_VERSION="$("$VENV_DIR/bin/python" -c 'import torch; print(torch.__version__)')"
CONSTRAINTS="$(mktemp)"
trap 'rm -f "$CONSTRAINTS"' EXIT
echo "torch==${TORCH_VERSION}" > "$CONSTRAINTS"   # keeps every later step from touching torch

# 2) e3nn at mace-torch's pin, then mace-torch and its other requirements (torch held fixed).
"${PIP[@]}" install --constraint "$CONSTRAINTS" "$E3NN_SPEC"
"${PIP[@]}" install --constraint "$CONSTRAINTS" "$MACE_SPEC"

# 3) Check: mace imports and builds a model on this torch.
TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 "$VENV_DIR/bin/python" - <<'PY'
import torch, e3nn, mace
from mace.modules import ScaleShiftMACE
print(f"mace-torch venv ok: torch {torch.__version__}, e3nn {e3nn.__version__}, mace {mace.__version__}")
PY
echo "$VENV_DIR/bin/python"
