package com.fedscale.android;

import static org.junit.Assert.assertArrayEquals;
import static org.junit.Assert.assertEquals;
import static org.junit.Assert.assertFalse;
import static org.junit.Assert.assertNotEquals;
import static org.junit.Assert.assertNotNull;
import static org.junit.Assert.assertTrue;

import java.io.File;
import java.util.Collections;
import java.util.List;
import java.util.Map;
import java.util.Random;
import java.util.concurrent.TimeUnit;
import org.json.JSONArray;
import org.json.JSONObject;
import org.junit.AfterClass;
import org.junit.BeforeClass;
import org.junit.Test;

/** The client against a real daemon on loopback (one daemon for the class, one job per test). */
public class LiveDaemonTest {
    private static File dir;
    private static Daemon daemon;

    @BeforeClass
    public static void startDaemon() throws Exception {
        dir = TestEnv.tempDir("live");
        daemon = new Daemon(dir).start();
    }

    @AfterClass
    public static void stopDaemon() throws Exception {
        if (daemon != null) {
            daemon.close();
        }
        TestEnv.deleteTree(dir);
    }

    /** A round that never starts: five participants needed, one device. */
    private static final String[] NEVER_STARTS = {"num_participants: 5", "min_participants: 5"};

    static ClientConfig config(String url, String job, String token, String client) throws Exception {
        return ClientConfig.parse("{\"server\": \"" + url + "\", \"job\": \"" + job + "\", \"enrollment_token\": \""
                + token + "\", \"backends\": [\"tflite\", \"mnn\", \"java\"], \"client\": {" + client + "}}");
    }

    private static String fast(int maxIterations) {
        return "\"max_iterations\": " + maxIterations + ", \"run_seconds\": 60, \"max_attempts\": 4,"
                + " \"backoff_base_s\": 0.1, \"backoff_cap_s\": 0.5, \"policy_wait_s\": 0.3";
    }

    /** {@code n} samples of a 4-feature, 3-class problem, seeded. */
    static InMemoryDataset data(int n, long seed) {
        Random r = new Random(seed);
        float[] x = new float[n * 4];
        int[] y = new int[n];
        for (int i = 0; i < n; i++) {
            y[i] = r.nextInt(3);
            for (int j = 0; j < 4; j++) {
                x[i * 4 + j] = (float) (0.3 * y[i] + 0.2 * r.nextGaussian()) + j * 0.1f;
            }
        }
        return new InMemoryDataset(x, y, 4);
    }

    private static Client client(ClientConfig cfg, Dataset train, DeviceState state, CredentialStore store,
                                 Client.Listener listener, Backend backend) {
        return new Client(cfg, train, data(6, 99), state, Collections.singletonMap("java", backend), store,
                new File(dir, "cache"), listener);
    }

    private static FileCredentialStore store(String name) {
        return new FileCredentialStore(new File(dir, name + "-credentials.json"));
    }

    @Test
    public void enrollsOnceAndReusesStoredCredentials() throws Exception {
        String token = daemon.submit("enroll", Daemon.job("enroll", NEVER_STARTS));
        FileCredentialStore creds = store("enroll");
        Recorder first = new Recorder();
        Client a = client(config(daemon.url(), "enroll", token, fast(1)), data(5, 1), new ScriptedState(), creds, first,
                new PlainJavaBackend());
        a.runBlocking();
        assertEquals(first.events.toString(), 1, a.stats().enrollments.get());
        assertEquals(1, a.stats().checkins.get());
        assertTrue(first.errors.toString(), first.errors.isEmpty());
        CredentialStore.Credentials saved = creds.load(daemon.url(), "enroll");
        assertNotNull(saved);
        assertTrue(first.enrolled.get(0).startsWith(saved.deviceId));
        if (creds.file().toPath().getFileSystem().supportedFileAttributeViews().contains("posix")) {
            assertEquals("rw-------", java.nio.file.attribute.PosixFilePermissions.toString(
                    java.nio.file.Files.getPosixFilePermissions(creds.file().toPath())));
        }
        // A new client (an app restart) reuses the stored enrollment: no second enroll request.
        Recorder second = new Recorder();
        Client b = client(config(daemon.url(), "enroll", token, fast(1)), data(5, 1), new ScriptedState(), creds,
                second, new PlainJavaBackend());
        b.runBlocking();
        assertEquals(0, b.stats().enrollments.get());
        assertEquals(List.of(saved.deviceId + " reused"), second.enrolled);
        assertEquals(1, b.stats().checkins.get());
        assertTrue(second.errors.toString(), second.errors.isEmpty());
    }

    @Test
    public void aTaskGivenUpIsNotWaitedForAndItsUploadIsRefused() throws Exception {
        String token = daemon.submit("giveup", Daemon.job("giveup", "eval_interval: 1000", "test_participants: 1",
                "round_deadline: 600", "max_round_retries: 3"));
        ProtocolClient p = new ProtocolClient(daemon.url(), "giveup", TestEnv.tempDir("giveup"), 1);
        p.enroll(token, null);
        JSONObject state = new JSONObject().put("battery", 90).put("charging", true).put("idle", true)
                .put("unmetered", true).put("free_storage_mb", 500).put("num_samples", 5)
                .put("backends", new JSONArray().put("java"));
        JSONObject test = p.checkin(state);
        assertEquals(test.toString(), "test", test.getString("action"));
        p.postResult(test.getJSONObject("task").getString("task_id"), new TestCounts(4, 1, 4, 4.0), 0.1);
        JSONObject train = p.checkin(state);
        assertEquals(train.toString(), "train", train.getString("action"));
        String taskId = train.getJSONObject("task").getString("task_id");
        JSONObject first = p.abandon(taskId);
        assertTrue(first.toString(), first.getBoolean("abandoned"));
        assertFalse(first.getBoolean("duplicate"));
        assertTrue(p.abandon(taskId).getBoolean("duplicate"));
        List<Tensor> weights = List.of(new Tensor("dense_0/bias", new int[] {3}, new float[3]),
                new Tensor("dense_0/kernel", new int[] {4, 3}, new float[12]));
        try {
            p.uploadUpdate(taskId, weights, 4, 0.5, 0.1);
            throw new AssertionError("an upload for a task given up was accepted");
        } catch (ProtocolException e) {
            assertEquals(410, e.status());
            assertEquals("task_expired", e.code());
        }
        // The round (its one device gave up) is retried at once, not after its 600 s deadline.
        long began = System.nanoTime();
        JSONObject again = p.checkin(state);
        assertEquals(again.toString(), "train", again.getString("action"));
        assertNotEquals(taskId, again.getJSONObject("task").getString("task_id"));
        assertTrue((System.nanoTime() - began) / 1e9 < 30);
    }

    @Test
    public void retryWindowsAreHonoured() throws Exception {
        String token = daemon.submit("windows", Daemon.job("windows", "num_participants: 5", "min_participants: 5",
                "checkin_wait: 0", "retry_min: 0.4", "retry_max: 0.6"));
        Recorder rec = new Recorder();
        Client c = client(config(daemon.url(), "windows", token, fast(5)), data(5, 1), new ScriptedState(),
                store("windows"), rec, new PlainJavaBackend());
        c.runBlocking();
        assertEquals(5, rec.waits.size());
        for (int i = 0; i < rec.waits.size(); i++) {
            double s = rec.waits.get(i)[1];
            assertTrue("wait " + s + " outside [0.4, 0.6]", s >= 0.4 && s <= 0.6);
            if (i > 0) {
                double gap = (rec.waits.get(i)[0] - rec.waits.get(i - 1)[0]) / 1e9;
                assertTrue("next check-in after " + gap + " s, window said " + rec.waits.get(i - 1)[1],
                        gap >= rec.waits.get(i - 1)[1] - 0.01);
            }
        }
    }

    @Test
    public void aggregateIsTheSampleWeightedMeanAndTestsArePosted() throws Exception {
        String token = daemon.submit("agg", Daemon.job("agg", "num_participants: 2", "min_participants: 2",
                "test_participants: 2", "weighting: samples", "aggregator: fedavg"));
        Recorder ra = new Recorder();
        Recorder rb = new Recorder();
        String knobs = fast(200);
        Client a = client(config(daemon.url(), "agg", token, knobs + ", \"seed\": 1"), data(5, 1), new ScriptedState(),
                store("agg-a"), ra, new PlainJavaBackend());
        Client b = client(config(daemon.url(), "agg", token, knobs + ", \"seed\": 2"), data(9, 2), new ScriptedState(),
                store("agg-b"), rb, new PlainJavaBackend());
        a.run();
        b.run();
        assertTrue("client a: " + ra.events, ra.over.await(60, TimeUnit.SECONDS));
        assertTrue("client b: " + rb.events, rb.over.await(60, TimeUnit.SECONDS));
        assertEquals("finished", ra.jobOver);
        TaskReport ta = ra.reports("train").get(0);
        TaskReport tb = rb.reports("train").get(0);
        assertEquals(5, ta.samples); // min(n, steps * B) = min(5, 12)
        assertEquals(9, tb.samples);
        assertTrue(ta.accepted() && tb.accepted());
        assertEquals(0, ta.modelVersion);
        // Both devices tested model 0 (the initial evaluation) and model 1 (the last round's).
        for (Recorder r : new Recorder[] {ra, rb}) {
            List<TaskReport> tests = r.reports("test");
            assertEquals(r.events.toString(), 2, tests.size());
            assertEquals(0, tests.get(0).modelVersion);
            assertEquals(1, tests.get(1).modelVersion);
            assertEquals(6, tests.get(1).counts.samples);
            assertTrue(tests.get(1).accepted());
        }
        JSONObject status = daemon.status("agg");
        assertNotNull(status.optJSONObject("initial_test"));
        JSONArray metrics = status.getJSONArray("metrics");
        assertEquals(1, metrics.length());
        assertFalse(metrics.getJSONObject(0).isNull("test_accuracy"));
        // The daemon's model 1 is the sample-weighted mean of what the two devices uploaded.
        Map<String, Tensor> v1 = a.protocol().downloadModel(1);
        double max = 0;
        for (int t = 0; t < ta.weights.size(); t++) {
            Tensor wa = ta.weights.get(t);
            Tensor wb = tb.weights.get(t);
            Tensor got = v1.get(wa.name());
            assertArrayEquals(wa.shape(), got.shape());
            for (int i = 0; i < wa.size(); i++) {
                double expected = (5.0 * wa.data()[i] + 9.0 * wb.data()[i]) / 14.0;
                max = Math.max(max, Math.abs(expected - got.data()[i]));
            }
        }
        System.out.printf("aggregate vs sample-weighted mean of uploads: max diff %.3g%n", max);
        assertTrue("max diff " + max, max <= 1e-5);
        // Version 1 again: served from the ETag cache (304).
        int hits = a.protocol().cacheHits.get();
        a.protocol().downloadModel(1);
        assertEquals(hits + 1, a.protocol().cacheHits.get());
        // Fine-tuning on the finished job's latest model: local only, before/after accuracy.
        FineTuneResult ft = a.fineTune(0.1f, 10, 0, 4, 0f);
        assertEquals(1, ft.modelVersion);
        assertEquals("java", ft.backend);
        assertTrue(ft.accuracyBefore >= 0 && ft.accuracyAfter >= 0 && ft.accuracyAfter <= 1);
        assertEquals(1, daemon.status("agg").getInt("model_version")); // nothing uploaded
        assertTrue(a.join(5000) && b.join(5000));
    }

    @Test
    public void wrongTokenReenrollsWithTheEnrollmentToken() throws Exception {
        String token = daemon.submit("reenroll", Daemon.job("reenroll", NEVER_STARTS));
        FileCredentialStore creds = store("reenroll");
        creds.save(daemon.url(), "reenroll", new CredentialStore.Credentials("d-bogus", "not-a-token"));
        Recorder rec = new Recorder();
        Client c = client(config(daemon.url(), "reenroll", token, fast(3)), data(5, 1), new ScriptedState(), creds, rec,
                new PlainJavaBackend());
        c.runBlocking();
        assertTrue(rec.events.toString(), rec.errors.size() >= 1);
        assertEquals(401, ((ProtocolException) rec.errors.get(0)).status());
        assertEquals("unauthorized", ((ProtocolException) rec.errors.get(0)).code());
        assertEquals(List.of("d-bogus reused", rec.enrolled.get(1)), rec.enrolled);
        assertTrue(rec.enrolled.get(1).endsWith(" new"));
        CredentialStore.Credentials now = creds.load(daemon.url(), "reenroll");
        assertNotEquals("not-a-token", now.token);
        assertTrue(rec.fatal.isEmpty());
        assertTrue("checked in after re-enrolling: " + rec.events, rec.waits.size() >= 1);
    }

    @Test
    public void wrongEnrollmentTokenIsFatal() throws Exception {
        daemon.submit("badtoken", Daemon.job("badtoken", NEVER_STARTS));
        Recorder rec = new Recorder();
        Client c = client(config(daemon.url(), "badtoken", "wrong-token", fast(50)), data(5, 1), new ScriptedState(),
                store("badtoken"), rec, new PlainJavaBackend());
        c.run();
        assertTrue(rec.ended.await(30, TimeUnit.SECONDS));
        assertEquals(rec.events.toString(), 1, rec.fatal.size());
        assertEquals("unauthorized", ((ProtocolException) rec.fatal.get(0)).code());
        assertTrue(c.endReason().startsWith("fatal"));
        assertEquals(0, c.stats().checkins.get());
    }

    @Test
    public void stoppedJobEndsTheClient() throws Exception {
        String token = daemon.submit("stopme", Daemon.job("stopme", NEVER_STARTS));
        Recorder rec = new Recorder();
        Client c = client(config(daemon.url(), "stopme", token, fast(1000)), data(5, 1), new ScriptedState(),
                store("stopme"), rec, new PlainJavaBackend());
        c.run();
        assertTrue(rec.firstWait.await(30, TimeUnit.SECONDS));
        daemon.ctl("stop", "stopme");
        assertTrue(rec.events.toString(), rec.over.await(30, TimeUnit.SECONDS));
        assertEquals("stopped", rec.jobOver);
        assertTrue(c.join(5000));
    }

    @Test
    public void stopEndsALongPollAtOnce() throws Exception {
        String token = daemon.submit("longpoll", Daemon.job("longpoll", "num_participants: 5", "min_participants: 5",
                "checkin_wait: 30"));
        Recorder rec = new Recorder();
        Client c = client(config(daemon.url(), "longpoll", token, fast(1000)), data(5, 1), new ScriptedState(),
                store("longpoll"), rec, new PlainJavaBackend());
        c.run();
        Thread.sleep(1500); // enrolled and inside the 30 s check-in
        long t0 = System.nanoTime();
        c.stop();
        assertTrue(c.join(3000));
        assertTrue((System.nanoTime() - t0) / 1e9 < 3.0);
        assertEquals("stopped", c.endReason());
    }

    /** A java backend that takes its time per step, so that a test can act mid-task. */
    static final class SlowBackend implements Backend {
        final PlainJavaBackend inner = new PlainJavaBackend();
        final long stepMillis;

        SlowBackend(long stepMillis) {
            this.stepMillis = stepMillis;
        }

        @Override
        public String name() {
            return "java";
        }

        @Override
        public void load(ModelSpec model, JSONObject manifest, Map<String, byte[]> files) {
            inner.load(model, manifest, files);
        }

        @Override
        public int trainBatchSize() {
            return 0;
        }

        @Override
        public int testBatchSize() {
            return 0;
        }

        @Override
        public StepResult trainStep(Map<String, Tensor> w, float[] x, int[] y, float[] mask, float lr, float wd)
                throws Exception {
            Thread.sleep(stepMillis);
            return inner.trainStep(w, x, y, mask, lr, wd);
        }

        @Override
        public TestCounts testBatch(Map<String, Tensor> w, float[] x, int[] y, float[] mask) {
            return inner.testBatch(w, x, y, mask);
        }

        @Override
        public void close() {}
    }

    @Test
    public void localPolicyGatesTrainingAndAbortsMidTask() throws Exception {
        // The daemon accepts any device (require_charging false); the phone's own policy wants the charger.
        String token = daemon.submit("policy", Daemon.job("policy", "local_steps: 20", "eval_interval: 100",
                "rounds: 1", "round_deadline: 60"));
        ScriptedState state = new ScriptedState();
        state.charging = false;
        java.util.concurrent.atomic.AtomicBoolean unplugged = new java.util.concurrent.atomic.AtomicBoolean();
        Recorder rec = new Recorder() {
            @Override
            public void onTaskStarted(String kind, JSONObject task) {
                super.onTaskStarted(kind, task);
                if ("train".equals(kind) && unplugged.compareAndSet(false, true)) {
                    new Thread(() -> {
                        try {
                            Thread.sleep(300);
                        } catch (InterruptedException e) {
                            return;
                        }
                        state.charging = false; // unplugged mid-task
                    }).start();
                }
            }
        };
        Client c = client(config(daemon.url(), "policy", token, fast(500)), data(8, 3), state, store("policy"), rec,
                new SlowBackend(50));
        c.run();
        long deadline = System.nanoTime() + TimeUnit.SECONDS.toNanos(20);
        while (c.stats().declined.get() == 0 && System.nanoTime() < deadline) {
            Thread.sleep(50);
        }
        assertTrue("declined a task while not charging: " + rec.events, c.stats().declined.get() > 0);
        assertEquals(0, c.stats().trained.get());
        assertTrue(c.stats().checkins.get() > 0); // it still told the daemon its state
        state.charging = true; // plugged in: it trains, is unplugged mid-task (aborts), then plugged in again
        deadline = System.nanoTime() + TimeUnit.SECONDS.toNanos(20);
        while (c.stats().aborted.get() == 0 && System.nanoTime() < deadline) {
            Thread.sleep(20);
        }
        assertTrue("aborted mid-task: " + rec.events, c.stats().aborted.get() > 0);
        assertEquals(0, rec.reports("train").size()); // nothing uploaded
        Thread.sleep(500);
        state.charging = true;
        assertTrue(rec.events.toString(), rec.over.await(60, TimeUnit.SECONDS));
        assertEquals("finished", rec.jobOver);
        assertEquals(1, rec.reports("train").size());
        assertTrue(c.join(5000));
    }
}
