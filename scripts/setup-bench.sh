#!/usr/bin/env bash
# Install what the benchmarks (python -m bench) need beyond scripts/setup.sh: the `bench` extra
# (Flower, for its aggregate baselines) and wrk (a C client that cross-checks the check-in benchmark's own
# open-loop generator). Both are optional: without them the Flower baselines are skipped with a note and
# the check-in benchmark runs its own generator alone.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  bash scripts/setup.sh
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[dev,device,bench]'
if ! command -v wrk >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""
    if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq wrk >/dev/null
  else
    echo "setup-bench: wrk not found and no apt-get; the check-in benchmark will use its own load generator" >&2
  fi
fi
