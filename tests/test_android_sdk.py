"""The Android SDK's plain-Java core: its JUnit suite on the JVM against the real daemon (jvm-test.sh).

The suite covers the safetensors codec (both ways with Python), conf.json parsing, the scheduling policy, the
plain-Java trainer against the JAX step, and live clients: enrollment, aggregation, test tasks, retry windows,
re-enrollment, a stopped job, a daemon killed mid-task, and 20 phones training digits to 85 %.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "sdk" / "android" / "scripts" / "jvm-test.sh"
JARS = Path("/usr/share/java")
MIN_TESTS = 30


def _missing() -> str | None:
    if shutil.which("javac") is None or shutil.which("java") is None:
        return "no JDK (javac/java) on PATH"
    for jar in ("junit4.jar", "hamcrest-core.jar", "com.android.json.jar"):
        if not (JARS / jar).exists():
            return f"{JARS / jar} is missing (Debian packages junit4, libhamcrest-java, libandroid-json-java)"
    return None


@pytest.mark.skipif(_missing() is not None, reason=_missing() or "")
@pytest.mark.timeout(900)
def test_android_sdk_jvm_suite() -> None:
    env = {**os.environ, "FEDSCALED_PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(SCRIPT)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
                          check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-8000:]
    match = re.search(r"^OK \((\d+) tests?\)", output, re.MULTILINE)
    assert match is not None, output[-8000:]
    assert int(match.group(1)) >= MIN_TESTS, output[-8000:]
