package com.fedscale.android;

import static org.junit.Assert.assertTrue;

import java.io.File;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.util.ArrayList;
import java.util.Collections;
import java.util.List;
import java.util.concurrent.TimeUnit;
import org.json.JSONArray;
import org.json.JSONObject;
import org.junit.Test;

/**
 * Twenty JVM phones with the plain-Java backend train configs/digits-mlp.yml (non-IID digits shards from
 * scripts/export_digits.py) to at least 85 % test accuracy within its 30 rounds. All 30 rounds run (about
 * 30 s); with the system property {@code fedscaled.e2e.full=false} the job is stopped as soon as an
 * evaluation reaches the target.
 */
public class DigitsEndToEndTest {
    static final double TARGET = 0.85;
    static final int DEVICES = 20;

    @Test
    public void twentyPhonesTrainDigits() throws Exception {
        File dir = TestEnv.tempDir("digits");
        boolean full = !"false".equals(System.getProperty("fedscaled.e2e.full"));
        try (Daemon daemon = new Daemon(dir).start()) {
            String yaml = new String(Files.readAllBytes(new File(TestEnv.repo(), "configs/digits-mlp.yml").toPath()),
                    StandardCharsets.UTF_8).replace("job_name: digits-mlp", "job_name: digits-java");
            String token = daemon.submit("digits-java", yaml);
            File data = new File(TestEnv.fixtures(), "digits");
            List<Client> clients = new ArrayList<>();
            List<Recorder> recorders = new ArrayList<>();
            long started = System.nanoTime();
            for (int i = 0; i < DEVICES; i++) {
                ClientConfig cfg = ClientConfig.parse("{\"server\": \"" + daemon.url() + "\", \"job\": \"digits-java\","
                        + " \"enrollment_token\": \"" + token + "\", \"backends\": [\"java\"], \"client\": {"
                        + "\"max_iterations\": 5000, \"run_seconds\": 240, \"backoff_base_s\": 0.2,"
                        + " \"backoff_cap_s\": 2, \"seed\": " + i + "}}");
                Recorder rec = new Recorder();
                Client c = new Client(cfg, InMemoryDataset.load(new File(data, String.format("device_%02d_train.fsd", i))),
                        InMemoryDataset.load(new File(data, String.format("device_%02d_test.fsd", i))),
                        new ScriptedState(), Collections.singletonMap("java", new PlainJavaBackend()),
                        new FileCredentialStore(new File(dir, "creds-" + i + ".json")), new File(dir, "cache-" + i), rec);
                clients.add(c);
                recorders.add(rec);
                c.run();
            }
            double best = 0;
            int bestRound = -1;
            JSONObject status = null;
            long deadline = System.nanoTime() + TimeUnit.SECONDS.toNanos(220);
            while (System.nanoTime() < deadline) {
                Thread.sleep(1000);
                status = daemon.status("digits-java");
                JSONArray metrics = status.getJSONArray("metrics");
                for (int m = 0; m < metrics.length(); m++) {
                    JSONObject e = metrics.getJSONObject(m);
                    if (!e.isNull("test_accuracy") && e.getDouble("test_accuracy") > best) {
                        best = e.getDouble("test_accuracy");
                        bestRound = e.getInt("round");
                    }
                }
                if (!"running".equals(status.getString("state")) && !"pending".equals(status.getString("state"))) {
                    break;
                }
                if (best >= TARGET && !full) {
                    daemon.ctl("stop", "digits-java");
                    break;
                }
            }
            double seconds = (System.nanoTime() - started) / 1e9;
            StringBuilder line = new StringBuilder();
            if (status != null) {
                JSONObject initial = status.optJSONObject("initial_test");
                if (initial != null) {
                    line.append(String.format("r0 %.3f", initial.getDouble("test_accuracy")));
                }
                JSONArray metrics = status.getJSONArray("metrics");
                for (int m = 0; m < metrics.length(); m++) {
                    JSONObject e = metrics.getJSONObject(m);
                    if (!e.isNull("test_accuracy")) {
                        line.append(String.format(", r%d %.3f", e.getInt("round"), e.getDouble("test_accuracy")));
                    }
                }
                line.append(String.format(" (%d rounds in %.1f s)", status.getInt("completed_rounds"), seconds));
            }
            System.out.println("digits, " + DEVICES + " java clients, test accuracy by round: " + line);
            for (Client c : clients) {
                c.stop();
            }
            for (Client c : clients) {
                c.join(5000);
            }
            int uploads = 0;
            for (Recorder r : recorders) {
                uploads += r.reports("train").size();
                assertTrue("fatal error: " + r.fatal, r.fatal.isEmpty());
            }
            System.out.println("digits: " + uploads + " uploads by " + DEVICES + " clients");
            assertTrue("best accuracy " + best + " (round " + bestRound + ") below " + TARGET + ": " + line,
                    best >= TARGET && bestRound <= 30);
        } finally {
            TestEnv.deleteTree(dir);
        }
    }
}
