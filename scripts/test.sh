#!/usr/bin/env bash
# Run the test suite (sets up .venv first if needed). Extra arguments go to pytest.
# Tests run in TEST_WORKERS processes (pytest-xdist, default 2: this project's CI machine has 2 cores); a module's
# tests stay in one worker, so module-scoped fixtures are built once. TEST_WORKERS=0 runs everything in-process.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export DS_ACCELERATOR=cpu OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# Bytecode caches on: with PYTHONDONTWRITEBYTECODE set (some shells and CI images set it), every subprocess a test
# starts recompiles torch_geometric, torch._dynamo and sympy from source (~4 s more per process start).
unset PYTHONDONTWRITEBYTECODE
workers=${TEST_WORKERS:-2}
parallel=()
[ "$workers" != 0 ] && parallel=(-n "$workers" --dist loadscope)
exec .venv/bin/python -m pytest -q -rs --durations=25 "${parallel[@]}" "$@"
