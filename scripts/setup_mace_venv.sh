#!/usr/bin/env bash
# Create a separate venv with mace-torch for scripts/bench_model.py (side-by-side baseline).
#
# Usage: bash scripts/setup_mace_venv.sh [VENV_DIR]        (default /work/mace-venv)
#
# mace-torch pins e3nn==0.4.4, which conflicts with our e3nn, so it lives in its own venv and the benchmark
# runs it as a subprocess (scripts/_mace_worker.py). Order matters: torch is installed FIRST, pinned, so that
# resolving mace-torch's `torch>=1.12` never pulls an unpinned (multi-GB CUDA) torch from the index.
# Environment: PYTHON (interpreter for the venv, default python3), TORCH_SPEC (default torch==2.13.0; a local
# CPU wheel is used when pip's find-links has one), MACE_SPEC (default mace-torch==0.3.16),
# E3NN_SPEC (default e3nn==0.4.4, mace-torch's own pin).
set -euo pipefail

VENV_DIR="${1:-/work/mace-venv}"
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
MACE_SPEC="${MACE_SPEC:-mace-torch==0.3.16}"
E3NN_SPEC="${E3NN_SPEC:-e3nn==0.4.4}"
CPU_INDEX="https://download.pytorch.org/whl/cpu"

if [ ! -x "$VENV_DIR/bin/python" ]; then
    "$PYTHON" -m venv "$VENV_DIR"
fi
PIP=("$VENV_DIR/bin/python" -m pip)
"${PIP[@]}" install --quiet --upgrade pip

# 1) torch, pinned: a local +cpu wheel from find-links if present, else the CPU-only index (never CUDA).
if ! "$VENV_DIR/bin/python" -c "import torch" 2>/dev/null; then
    if ! "${PIP[@]}" install --no-index "$TORCH_SPEC" 2>/dev/null; then
        "${PIP[@]}" install "$TORCH_SPEC" --index-url "$CPU_INDEX" --extra-index-url https://pypi.org/simple
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
