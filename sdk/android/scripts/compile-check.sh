#!/usr/bin/env bash
# Compile ALL of the Android SDK's sources (the plain-Java core and the Android adapters in
# com.fedscale.android.adapters) with javac, against signature-only stubs of the Android platform, LiteRT
# and MNN's JNI wrapper (sdk/android/compile-only/, never shipped) and org.json (Android's own, packaged by
# Debian as /usr/share/java/com.android.json.jar).
#
# What it proves: every class, method, field and constant the sources use exists with the declared
# parameter and return types in the stubs, and the stubs were written from the real APIs (compile-only/README.md):
# a misspelt method or a wrong argument type fails here. Nonzero exit on any compile error.
# What it does not prove: that anything runs on a device, or that a java.* API the core uses exists on
# Android at minSdk 26; the latter is scanned for a few well-known cases below (warnings; STRICT_API=1 fails).
#
# Usage: bash sdk/android/scripts/compile-check.sh        (from anywhere)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SRC="$ROOT/src/main/java"
STUBS="$ROOT/compile-only/java"
JSON_JAR="${JSON_JAR:-/usr/share/java/com.android.json.jar}"
OUT="$ROOT/build/compile-check"

command -v javac >/dev/null || { echo "compile-check: javac not found" >&2; exit 2; }
[ -f "$JSON_JAR" ] || { echo "compile-check: $JSON_JAR missing (Debian package libandroid-json-java)" >&2; exit 2; }

rm -rf "$OUT"
mkdir -p "$OUT/stubs" "$OUT/classes"

# 1. The stubs alone, into their own folder: on the classpath of step 2, never in its output.
find "$STUBS" -name '*.java' | sort > "$OUT/stubs.txt"
javac --release 17 -nowarn -d "$OUT/stubs" -cp "$JSON_JAR" @"$OUT/stubs.txt"

# 2. Every source under src/main/java, core and adapters together. No -sourcepath: a class the sources
#    use must come from src/main/java itself or from the classpath (stubs, org.json); nothing is compiled
#    implicitly into the output.
find "$SRC" -name '*.java' | sort > "$OUT/sources.txt"
n=$(wc -l < "$OUT/sources.txt")
echo "compile-check: javac $n source files against $(wc -l < "$OUT/stubs.txt") stub files + $(basename "$JSON_JAR")"
javac --release 17 -encoding UTF-8 -Xlint:all,-serial,-processing -implicit:none \
    -cp "$OUT/stubs:$JSON_JAR" -d "$OUT/classes" @"$OUT/sources.txt"

# 3. Nothing from the stubs or from a JDK module other than java.base leaked into the output.
if find "$OUT/classes" -name '*.class' | grep -v '/com/fedscale/android/' >/dev/null; then
    echo "compile-check: classes outside com.fedscale.android in the output:" >&2
    find "$OUT/classes" -name '*.class' | grep -v '/com/fedscale/android/' >&2
    exit 1
fi
if command -v jdeps >/dev/null; then
    mods=$(jdeps --multi-release 17 -cp "$OUT/stubs:$JSON_JAR" --list-deps "$OUT/classes" 2>/dev/null \
        | sed 's/^ *//' | grep -v '^java\.base' | grep -v '^not found' || true)
    if [ -n "$mods" ]; then
        echo "compile-check: the sources use JDK modules Android does not have: $mods" >&2
        exit 1
    fi
fi

# 4. java.* APIs newer than Android API 26 (minSdk) without desugaring: a heuristic scan of the bytecode.
#    (java.nio.file, java.time and Base64 are in 26; the Java 9+ collection factories and String and
#    InputStream helpers below came to Android much later.)
warn=0
if command -v javap >/dev/null; then
    find "$OUT/classes" -name '*.class' | sort > "$OUT/classes.txt"
    xargs javap -c -p < "$OUT/classes.txt" > "$OUT/javap.txt"  # javap takes no @argfiles
    pattern='java/util/(List|Set|Map)\.(of|copyOf|entry|ofEntries):|java/lang/String\.(repeat|isBlank|strip|stripLeading|stripTrailing|lines):|java/io/InputStream\.(readAllBytes|readNBytes|transferTo):'
    if grep -Eo "($pattern)[A-Za-z_.$/]*" "$OUT/javap.txt" | sort -u > "$OUT/api-newer-than-26.txt" \
            && [ -s "$OUT/api-newer-than-26.txt" ]; then
        warn=1
        echo "compile-check: WARNING: APIs missing on Android API 26 (the minSdk) without core library desugaring:" >&2
        sed 's/^/  /' "$OUT/api-newer-than-26.txt" >&2
    fi
fi
if [ "$warn" = 1 ] && [ "${STRICT_API:-0}" = 1 ]; then
    exit 1
fi
echo "compile-check: OK ($(wc -l < "$OUT/classes.txt" 2>/dev/null || echo '?') classes in $OUT/classes)"
