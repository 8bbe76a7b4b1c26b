#!/usr/bin/env bash
# Build the single-file binary `fedscaled` (daemon + fedscalectl + fedscaled-device) with PyInstaller.
# Builds in a throwaway venv outside the repository; the binary lands in $OUT/dist/fedscaled.
#   OUT=/tmp/fedscaled-build  where the venv, PyInstaller's work files and dist/ go
#   FEDSCALED_ONEDIR=1        build a onedir bundle (dist/fedscaled/fedscaled) that starts faster
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/fedscaled-build}
PY=${PYTHON:-python3}
VENV="$OUT/venv"
mkdir -p "$OUT"
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip==25.3
# Only the daemon's pinned dependencies and PyInstaller: what is installed here is what gets bundled.
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e '.[build]'
"$VENV/bin/pyinstaller" --clean --noconfirm --log-level WARN \
  --distpath "$OUT/dist" --workpath "$OUT/work" build.spec
if [ -f "$OUT/dist/fedscaled" ]; then
  BIN="$OUT/dist/fedscaled"
else
  BIN="$OUT/dist/fedscaled/fedscaled"
fi
"$BIN" --version
echo "built $BIN ($(du -h "$BIN" | cut -f1)); symlink it as fedscalectl and fedscaled-device if you like"
