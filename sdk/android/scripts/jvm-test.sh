#!/usr/bin/env bash
# Build the Android SDK's plain-Java core and run its JUnit 4 tests on the JVM (no Android, no Gradle).
#
#   bash sdk/android/scripts/jvm-test.sh [TestClass ...]
#
# Compiles src/main/java (without adapters/, which needs Android libraries) and src/test/java with javac
# against Debian's jars (/usr/share/java: com.android.json, junit4, hamcrest), writes the Python-side
# fixtures (digits shards, JAX step fixtures) with $FEDSCALED_PYTHON (default REPO/.venv/bin/python), and
# runs org.junit.runner.JUnitCore on every test class (or the ones named). Live tests start the real
# daemon with that interpreter. Exit status: non-zero on any failure.
set -euo pipefail

SDK="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REPO="$(cd "$SDK/../.." && pwd)"
PY="${FEDSCALED_PYTHON:-$REPO/.venv/bin/python}"
JARS="${JAVA_JARS:-/usr/share/java}"
BUILD="$SDK/build/jvm"
FIXTURES="$BUILD/fixtures"
CP="$JARS/com.android.json.jar:$JARS/junit4.jar:$JARS/hamcrest-core.jar"

for jar in com.android.json.jar junit4.jar hamcrest-core.jar; do
    [ -f "$JARS/$jar" ] || { echo "jvm-test: missing $JARS/$jar" >&2; exit 2; }
done
[ -x "$PY" ] || { echo "jvm-test: no Python interpreter at $PY (set FEDSCALED_PYTHON)" >&2; exit 2; }

rm -rf "$BUILD/classes" "$BUILD/test-classes" "$SDK/build/tmp"
mkdir -p "$BUILD/classes" "$BUILD/test-classes" "$FIXTURES"

echo "== compiling"
find "$SDK/src/main/java" -name '*.java' -not -path '*/adapters/*' > "$BUILD/main-sources.txt"
javac -encoding UTF-8 -Xlint:all -Werror -d "$BUILD/classes" -cp "$CP" @"$BUILD/main-sources.txt"
if grep -l 'import android\.' $(cat "$BUILD/main-sources.txt"); then
    echo "jvm-test: android.* imports in the plain-Java core" >&2
    exit 1
fi
find "$SDK/src/test/java" -name '*.java' > "$BUILD/test-sources.txt"
javac -encoding UTF-8 -d "$BUILD/test-classes" -cp "$BUILD/classes:$CP" @"$BUILD/test-sources.txt"

echo "== fixtures ($PY)"
(cd "$REPO" && "$PY" "$SDK/scripts/export_step_fixture.py" "$FIXTURES")
(cd "$REPO" && "$PY" "$SDK/scripts/export_digits.py" "$FIXTURES/digits" --devices 20 --alpha 0.5 --seed 0)

if [ "$#" -gt 0 ]; then
    CLASSES=("$@")
else
    mapfile -t CLASSES < <(cd "$BUILD/test-classes" && find . -name '*Test.class' -not -name '*$*' \
        | sed -e 's|^\./||' -e 's|\.class$||' -e 's|/|.|g' | sort)
fi

echo "== JUnit: ${CLASSES[*]}"
cd "$REPO"
exec java -Xmx1g -Dfedscaled.python="$PY" -Dfedscaled.repo="$REPO" -Dfedscaled.fixtures="$FIXTURES" \
    -cp "$BUILD/test-classes:$BUILD/classes:$CP" org.junit.runner.JUnitCore "${CLASSES[@]}"
