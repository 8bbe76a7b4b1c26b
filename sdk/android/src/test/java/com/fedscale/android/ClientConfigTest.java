package com.fedscale.android;

import static org.junit.Assert.assertArrayEquals;
import static org.junit.Assert.assertEquals;
import static org.junit.Assert.assertFalse;
import static org.junit.Assert.assertNull;
import static org.junit.Assert.assertTrue;
import static org.junit.Assert.fail;

import java.io.File;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import org.json.JSONObject;
import org.junit.Test;

public class ClientConfigTest {
    private static void assertInvalid(String json, String fragment) {
        try {
            ClientConfig.parse(json);
            fail("accepted: " + json);
        } catch (IllegalArgumentException e) {
            assertTrue(e.getMessage() + " should mention " + fragment, e.getMessage().contains(fragment));
        }
    }

    @Test
    public void readsFedScalesConfJsonExtended() throws Exception {
        File shared = new File(TestEnv.repo().getParentFile(), "shared/fedscale/android-conf.json");
        JSONObject root = new JSONObject(new String(Files.readAllBytes(shared.toPath()), StandardCharsets.UTF_8));
        root.put("job", "android-tflite").put("enrollment_token", "tok");
        ClientConfig c = ClientConfig.fromJson(root);
        assertEquals("http://192.168.102.9:29500", c.server); // from aggregator.ip/port
        assertEquals("android-tflite", c.job);
        assertEquals(ClientConfig.DEFAULT_BACKENDS, c.backends);
        assertEquals(10, c.epochs);
        assertEquals(32, c.batchSize);
        assertEquals(0.01, c.learningRate, 0);
        assertEquals(0.00004, c.weightDecay, 0);
        assertEquals(0.9, c.momentum, 0);
        assertFalse(c.fineTune);
        assertEquals(10, c.numClasses);
        assertArrayEquals(new int[] {32, 32, 3}, c.inputShape);
        assertEquals(16, c.testBsz);
        assertEquals(75.0, c.checkinTimeoutSeconds, 0); // > the longest long-poll (60 s)
        SchedulingPolicy p = c.schedulingPolicy();
        assertTrue(p.requireCharging);
        assertEquals(20, p.minBattery);
    }

    @Test
    public void serverPolicyBackendsAndClientKnobs() {
        ClientConfig c = ClientConfig.parse("{\"server\": \"http://127.0.0.1:29500/\", \"job\": \"j\","
                + " \"enrollment_token\": \"t\", \"backends\": [\"java\"], \"policy\": {\"require_charging\": false,"
                + " \"min_battery\": 50, \"max_thermal\": \"severe\", \"min_free_storage_mb\": 10},"
                + " \"client\": {\"max_iterations\": 5, \"run_seconds\": 3.5, \"seed\": 9}}");
        assertEquals("http://127.0.0.1:29500", c.server);
        assertEquals(1, c.backends.size());
        assertEquals(Boolean.FALSE, c.policy.requireCharging);
        assertNull(c.policy.requireUnmetered);
        SchedulingPolicy p = c.schedulingPolicy();
        assertFalse(p.requireCharging);
        assertTrue(p.requireUnmetered); // job default kept
        assertEquals(50, p.minBattery);
        assertEquals(DeviceState.Thermal.SEVERE, p.maxThermal);
        assertEquals(10, p.minFreeStorageMb);
        assertEquals(5, c.maxIterations);
        assertEquals(3.5, c.runSeconds, 0);
        assertEquals(9, c.seed);
        assertNull(c.inputShape);
    }

    @Test
    public void refusesUnknownAndMissingKeys() {
        String base = "\"server\": \"http://h:1\", \"job\": \"j\", \"enrollment_token\": \"t\"";
        assertInvalid("{\"job\": \"j\", \"enrollment_token\": \"t\"}", "server");
        assertInvalid("{\"server\": \"http://h:1\", \"enrollment_token\": \"t\"}", "\"job\"");
        assertInvalid("{\"server\": \"http://h:1\", \"job\": \"j\"}", "\"enrollment_token\"");
        assertInvalid("{" + base + ", \"jobs\": 1}", "unknown key \"jobs\"");
        assertInvalid("{" + base + ", \"policy\": {\"require_wifi\": true}}", "unknown key \"require_wifi\" in policy");
        assertInvalid("{" + base + ", \"policy\": {\"min_battery\": 101}}", "policy.min_battery");
        assertInvalid("{" + base + ", \"policy\": {\"max_thermal\": \"warm\"}}", "max_thermal");
        assertInvalid("{" + base + ", \"policy\": {\"require_idle\": \"yes\"}}", "true or false");
        assertInvalid("{" + base + ", \"training_conf\": {\"epochs\": 1}}", "unknown key \"epochs\" in training_conf");
        assertInvalid("{" + base + ", \"training_conf\": {\"batch_size\": 0}}", "training_conf.batch_size");
        assertInvalid("{" + base + ", \"training_conf\": {\"learning_rate\": -1}}", "training_conf.learning_rate");
        assertInvalid("{" + base + ", \"training_conf\": {\"channel\": 3}}", "\"height\"");
        assertInvalid("{" + base + ", \"backends\": []}", "backends");
        assertInvalid("{\"server\": \"ftp://h\", \"job\": \"j\", \"enrollment_token\": \"t\"}", "http://");
        assertInvalid("[1]", "not a JSON object");
    }
}
