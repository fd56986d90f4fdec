#!/usr/bin/env bash
# Build the documentation site into site/ (mkdocs.yml at the repository root), failing on any warning.
# Makes .venv first if there is none (scripts/setup.sh) and installs the `docs` extra into it when mkdocs,
# the theme or mkdocstrings is missing. Nothing is fetched while building: the theme's web fonts are off and
# mkdocstrings reads the docstrings from the source tree (static analysis; foundation is not imported).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || bash scripts/setup.sh
.venv/bin/python -c "import mkdocs, material, mkdocstrings_handlers.python" 2>/dev/null \
  || .venv/bin/python -m pip install -q --disable-pip-version-check -e ".[docs]"
start=$(date +%s)
NO_MKDOCS_2_WARNING=1 .venv/bin/python -m mkdocs build --strict --clean --site-dir site "$@"
echo "[docs] built site/index.html in $(( $(date +%s) - start )) s"
