#!/usr/bin/env bash
# Build on-device artifacts (.tflite, .mnn and manifests) in their own environment, .venv-build.
#   bash scripts/build-artifacts.sh --prebuilt --out fedscaled/artifacts/prebuilt   # the package's catalog
#   bash scripts/build-artifacts.sh my-job.yml --out /var/lib/fedscaled/artifacts  # a job's own shapes
# The daemon never needs these packages: it serves the files this writes.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv-build/bin/python ]; then
  "$PY" -m venv .venv-build
fi
.venv-build/bin/python -m pip install --quiet --disable-pip-version-check -r fedscaled_build/requirements.txt
# The model zoo comes from this checkout (PYTHONPATH), not from an installed fedscaled.
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" exec .venv-build/bin/python -m fedscaled_build "$@"
