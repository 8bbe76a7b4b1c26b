package com.fedscale.android;

import static org.junit.Assert.assertEquals;
import static org.junit.Assert.assertTrue;

import java.io.File;
import java.util.Collections;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.TimeUnit;
import org.json.JSONObject;
import org.junit.Test;

/** The daemon is SIGKILLed while a device trains and restarted on the same data dir and port. */
public class RestartTest {
    @Test
    public void taskSurvivesADaemonCrashMidTask() throws Exception {
        File dir = TestEnv.tempDir("restart");
        Daemon daemon = new Daemon(dir).start();
        try {
            int port = daemon.port;
            String token = daemon.submit("crash", Daemon.job("crash", "local_steps: 40", "eval_interval: 100",
                    "round_deadline: 90"));
            CountDownLatch training = new CountDownLatch(1);
            Recorder rec = new Recorder() {
                @Override
                public void onTaskStarted(String kind, JSONObject task) {
                    super.onTaskStarted(kind, task);
                    if ("train".equals(kind)) {
                        training.countDown();
                    }
                }
            };
            ClientConfig cfg = LiveDaemonTest.config(daemon.url(), "crash", token, "\"max_iterations\": 500,"
                    + " \"run_seconds\": 120, \"max_attempts\": 40, \"backoff_base_s\": 0.2, \"backoff_cap_s\": 1.0");
            Client c = new Client(cfg, LiveDaemonTest.data(8, 4), LiveDaemonTest.data(4, 5), new ScriptedState(),
                    Collections.singletonMap("java", new LiveDaemonTest.SlowBackend(60)),
                    new FileCredentialStore(new File(dir, "creds.json")), new File(dir, "cache"), rec);
            c.run();
            assertTrue(rec.events.toString(), training.await(60, TimeUnit.SECONDS));
            daemon.kill(); // kill -9 mid-task
            // Come back only once the device has found the daemon gone (its upload failing and retried).
            long wait = System.nanoTime() + TimeUnit.SECONDS.toNanos(30);
            while (c.protocol().retries.get() == 0 && System.nanoTime() < wait) {
                Thread.sleep(50);
            }
            daemon.start(port); // same data dir, same port
            assertEquals(port, daemon.port);
            assertTrue(rec.events.toString(), rec.over.await(90, TimeUnit.SECONDS));
            assertEquals("finished", rec.jobOver);
            assertEquals(1, rec.reports("train").size());
            assertTrue(rec.reports("train").get(0).accepted());
            assertTrue("the upload was retried", c.protocol().retries.get() > 0);
            assertTrue("trained once, uploaded once: " + rec.events, c.stats().trained.get() == 1);
            JSONObject status = daemon.status("crash");
            assertEquals("finished", status.getString("state"));
            assertEquals(1, status.getInt("model_version"));
            assertTrue(c.join(5000));
        } finally {
            daemon.close();
            TestEnv.deleteTree(dir);
        }
    }
}
