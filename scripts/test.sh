#!/usr/bin/env bash
# The test suite (what the README and CI run): unit, property, live-daemon and end-to-end tests.
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python -m pytest "$@"
