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
# The Android SDK's JVM build and tests (tests/test_android_sdk.py) use Debian's JUnit 4 and Android's
# org.json (libandroid-json-java); installed when missing and we may (root, apt). Without them those tests
# skip with a message.
if [ ! -f /usr/share/java/junit4.jar ] || [ ! -f /usr/share/java/com.android.json.jar ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq >/dev/null && apt-get install -y -qq junit4 libandroid-json-java >/dev/null
  else
    echo "setup: junit4 and libandroid-json-java are missing (apt-get install junit4 libandroid-json-java);" \
      "the Android SDK's JVM tests will be skipped" >&2
  fi
fi
