#!/usr/bin/env bash
# Create .venv with the pinned daemon, device-runtime and development dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip==25.3
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[dev,device]'
