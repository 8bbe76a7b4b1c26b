package com.fedscale.android;

import java.io.File;
import java.io.IOException;
import java.nio.file.Files;

/** Paths the test run gets from scripts/jvm-test.sh (system properties), with repository-relative defaults. */
final class TestEnv {
    private TestEnv() {}

    static File repo() {
        String p = System.getProperty("fedscaled.repo");
        return new File(p != null ? p : "../..").getAbsoluteFile();
    }

    static String python() {
        String p = System.getProperty("fedscaled.python");
        return p != null ? p : new File(repo(), ".venv/bin/python").getPath();
    }

    static File fixtures() {
        String p = System.getProperty("fedscaled.fixtures");
        return new File(p != null ? p : new File(repo(), "sdk/android/build/fixtures").getPath());
    }

    static File tempDir(String prefix) throws IOException {
        File base = new File(repo(), "sdk/android/build/tmp");
        base.mkdirs();
        return Files.createTempDirectory(base.toPath(), prefix).toFile();
    }

    static void deleteTree(File f) {
        File[] children = f.listFiles();
        if (children != null) {
            for (File c : children) {
                deleteTree(c);
            }
        }
        f.delete();
    }
}
