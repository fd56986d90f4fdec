#!/usr/bin/env bash
# Build the documentation site into site/ (mkdocs.yml at the repository root), failing on any warning.
# Installs the `docs` extra into .venv first (scripts/setup.sh makes .venv if needed). Nothing is fetched while
# building: the theme's web fonts are off and mkdocstrings reads the docstrings from the source tree.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[docs]"
start=$(date +%s)
.venv/bin/python -m mkdocs build --strict --clean --site-dir site "$@"
echo "[docs] built site/index.html in $(( $(date +%s) - start )) s"
