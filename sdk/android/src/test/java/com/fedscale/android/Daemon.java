package com.fedscale.android;

import java.io.File;
import java.io.IOException;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.List;
import java.util.concurrent.TimeUnit;
import org.json.JSONObject;

/**
 * A real fedscaled daemon on loopback for live tests: {@code python -m fedscaled.daemon.cli start}, ready
 * when {@code DATA_DIR/run.json} names its pid and port; jobs through {@code python -m fedscaled.ctl.cli}.
 */
final class Daemon implements AutoCloseable {
    final File dir;
    final File dataDir;
    final File socket;
    private Process proc;
    int port;

    Daemon(File dir) {
        this.dir = dir;
        this.dataDir = new File(dir, "data");
        this.socket = new File(dir, "control.sock");
    }

    /** Start on a free port. */
    Daemon start() throws Exception {
        return start(0);
    }

    /** Start listening on {@code 127.0.0.1:listenPort} (0: any free port); waits for run.json. */
    Daemon start(int listenPort) throws Exception {
        File runJson = new File(dataDir, "run.json");
        Files.deleteIfExists(runJson.toPath());
        ProcessBuilder pb = new ProcessBuilder(TestEnv.python(), "-m", "fedscaled.daemon.cli", "start", "--data-dir",
                dataDir.getPath(), "--listen", "127.0.0.1:" + listenPort, "--control-socket", socket.getPath());
        pb.directory(TestEnv.repo());
        pb.redirectErrorStream(true);
        pb.redirectOutput(ProcessBuilder.Redirect.appendTo(new File(dir, "daemon.log")));
        proc = pb.start();
        Process started = proc;
        Runtime.getRuntime().addShutdownHook(new Thread(started::destroyForcibly)); // never leave a daemon behind
        long deadline = System.nanoTime() + TimeUnit.SECONDS.toNanos(60);
        while (System.nanoTime() < deadline) {
            if (!proc.isAlive()) {
                throw new IllegalStateException("daemon exited with " + proc.exitValue() + ": " + log());
            }
            if (runJson.exists()) {
                try {
                    JSONObject info = new JSONObject(new String(Files.readAllBytes(runJson.toPath()),
                            StandardCharsets.UTF_8));
                    if (info.optLong("pid") == proc.pid()) {
                        port = info.getInt("port");
                        return this;
                    }
                } catch (org.json.JSONException e) {
                    // being written
                }
            }
            Thread.sleep(50);
        }
        kill();
        throw new IllegalStateException("daemon not ready after 60 s: " + log());
    }

    String url() {
        return "http://127.0.0.1:" + port;
    }

    /** SIGKILL (a crash) and reap. */
    void kill() throws InterruptedException {
        if (proc != null && proc.isAlive()) {
            proc.destroyForcibly();
            proc.waitFor(10, TimeUnit.SECONDS);
        }
    }

    String log() {
        try {
            return new String(Files.readAllBytes(new File(dir, "daemon.log").toPath()), StandardCharsets.UTF_8);
        } catch (IOException e) {
            return "(no log)";
        }
    }

    /** Run fedscalectl; returns stdout; throws with stderr on a non-zero exit. */
    String ctl(String... args) throws Exception {
        List<String> cmd = new ArrayList<>(Arrays.asList(TestEnv.python(), "-m", "fedscaled.ctl.cli", "--socket",
                socket.getPath()));
        cmd.addAll(Arrays.asList(args));
        ProcessBuilder pb = new ProcessBuilder(cmd).directory(TestEnv.repo());
        File out = new File(dir, "ctl.out");
        File err = new File(dir, "ctl.err");
        pb.redirectOutput(out).redirectError(err);
        Process p = pb.start();
        if (!p.waitFor(60, TimeUnit.SECONDS)) {
            p.destroyForcibly();
            throw new IllegalStateException("fedscalectl " + Arrays.toString(args) + " timed out");
        }
        String stdout = new String(Files.readAllBytes(out.toPath()), StandardCharsets.UTF_8);
        if (p.exitValue() != 0) {
            throw new IllegalStateException("fedscalectl " + Arrays.toString(args) + " exited " + p.exitValue() + ": "
                    + new String(Files.readAllBytes(err.toPath()), StandardCharsets.UTF_8));
        }
        return stdout;
    }

    /** Submit a job from YAML text; returns its enrollment token. */
    String submit(String name, String yaml) throws Exception {
        File f = new File(dir, name + ".yml");
        Files.write(f.toPath(), yaml.getBytes(StandardCharsets.UTF_8));
        ctl("submit", f.getPath());
        return status(name).getString("enrollment_token");
    }

    JSONObject status(String job) throws Exception {
        return new JSONObject(ctl("status", job, "--json"));
    }

    /** A small job file: FedScale's format, devices need not be charging; {@code extra} lines override. */
    static String job(String name, String... extra) {
        StringBuilder b = new StringBuilder("job_conf:\n");
        b.append("  - job_name: ").append(name).append('\n');
        List<String> keys = new ArrayList<>();
        for (String e : extra) {
            keys.add(e.substring(0, e.indexOf(':')).trim());
            b.append("  - ").append(e).append('\n');
        }
        String[] defaults = {"model: linear", "input_shape: 2 2 1", "num_classes: 3", "rounds: 1",
            "num_participants: 1", "overcommitment: 1.0", "min_participants: 1", "eval_interval: 1",
            "learning_rate: 0.1", "local_steps: 3", "batch_size: 4", "test_bsz: 4", "filter_less: 1",
            "round_deadline: 30", "selection_window: 0.2", "checkin_wait: 2", "retry_min: 0.1", "retry_max: 0.3",
            "require_charging: false", "require_unmetered: false", "min_battery: 0"};
        for (String d : defaults) {
            if (!keys.contains(d.substring(0, d.indexOf(':')))) {
                b.append("  - ").append(d).append('\n');
            }
        }
        return b.toString();
    }

    @Override
    public void close() throws Exception {
        if (proc != null && proc.isAlive()) {
            proc.destroy();
            if (!proc.waitFor(15, TimeUnit.SECONDS)) {
                kill();
            }
        }
    }
}
