#!/usr/bin/env bash
# Create .venv at the repository root and install the project with pinned versions.
# Idempotent: a second run only checks. Used by the README's two commands and by CI.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [[ ! -x .venv/bin/python ]]; then
    echo "bootstrap: creating .venv with $($PY --version)" >&2
    "$PY" -m venv .venv
fi
stamp=.venv/.installed-$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)
if [[ ! -f "$stamp" ]]; then
    echo "bootstrap: installing pinned dependencies (about 2 minutes the first time)" >&2
    .venv/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[test]' 2>&1 \
        | grep -v "^WARNING: Location" || true
    .venv/bin/python -m pip check >&2
    rm -f .venv/.installed-*; touch "$stamp"
fi
