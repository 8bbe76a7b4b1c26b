package com.fedscale.android;

import static org.junit.Assert.assertEquals;
import static org.junit.Assert.assertTrue;
import static org.junit.Assert.fail;

import com.sun.net.httpserver.HttpServer;
import java.io.File;
import java.io.OutputStream;
import java.net.InetSocketAddress;
import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.Collections;
import java.util.List;
import java.util.concurrent.atomic.AtomicInteger;
import org.json.JSONObject;
import org.junit.After;
import org.junit.Before;
import org.junit.Test;

/** Retries, Retry-After, error mapping and the hash cache against a scripted local HTTP server. */
public class ProtocolClientTest {
    private HttpServer server;
    private final AtomicInteger hits = new AtomicInteger();
    private final List<Long> hitTimes = Collections.synchronizedList(new ArrayList<>());
    private File dir;

    @Before
    public void setUp() throws Exception {
        server = HttpServer.create(new InetSocketAddress("127.0.0.1", 0), 0);
        dir = TestEnv.tempDir("proto");
    }

    @After
    public void tearDown() {
        server.stop(0);
        TestEnv.deleteTree(dir);
    }

    private void route(String path, int[] statuses, String[] retryAfter, byte[] okBody) {
        server.createContext(path, ex -> {
            int i = hits.getAndIncrement();
            hitTimes.add(System.nanoTime());
            int status = statuses[Math.min(i, statuses.length - 1)];
            byte[] body = status == 200 ? okBody
                    : ("{\"error\": {\"code\": \"c" + status + "\", \"message\": \"m\", \"details\": {\"x\": 1}}}")
                            .getBytes(StandardCharsets.UTF_8);
            if (retryAfter != null && retryAfter[Math.min(i, retryAfter.length - 1)] != null) {
                ex.getResponseHeaders().add("Retry-After", retryAfter[Math.min(i, retryAfter.length - 1)]);
            }
            ex.getRequestBody().readAllBytes();
            ex.sendResponseHeaders(status, body.length);
            try (OutputStream out = ex.getResponseBody()) {
                out.write(body);
            }
        });
        server.start();
    }

    private ProtocolClient client(int attempts) {
        ProtocolClient p = new ProtocolClient("http://127.0.0.1:" + server.getAddress().getPort(), "j", dir, 1);
        p.setRetry(attempts, 0.05, 0.2);
        p.setTimeouts(2, 5, 5);
        p.setCredentials(new CredentialStore.Credentials("d-1", "tok"));
        return p;
    }

    @Test
    public void retries5xxAndHonoursRetryAfter() throws Exception {
        route("/v1/jobs/j/model", new int[] {503, 500, 429, 200}, new String[] {"1", null, "0", null},
                "{\"ok\": true}".getBytes(StandardCharsets.UTF_8));
        JSONObject answer = client(5).modelInfo();
        assertTrue(answer.getBoolean("ok"));
        assertEquals(4, hits.get());
        double firstGap = (hitTimes.get(1) - hitTimes.get(0)) / 1e9;
        assertTrue("Retry-After: 1 honoured, waited " + firstGap, firstGap >= 0.95);
    }

    @Test
    public void givesUpAfterBoundedAttempts() throws Exception {
        route("/v1/jobs/j/model", new int[] {502}, null, new byte[0]);
        try {
            client(3).modelInfo();
            fail("no exception");
        } catch (ServerUnavailableException e) {
            assertTrue(e.getMessage(), e.getMessage().contains("gave up after 3 attempts"));
        }
        assertEquals(3, hits.get());
    }

    @Test
    public void mapsErrorBodiesWithoutRetrying() throws Exception {
        route("/v1/jobs/j/checkin", new int[] {409}, null, new byte[0]);
        try {
            client(5).checkin(new JSONObject());
            fail("no exception");
        } catch (ProtocolException e) {
            assertEquals(409, e.status());
            assertEquals("c409", e.code());
            assertEquals(1, e.details().getInt("x"));
        }
        assertEquals(1, hits.get());
    }

    @Test
    public void refusesConnectionsAfterRetries() throws Exception {
        ProtocolClient p = new ProtocolClient("http://127.0.0.1:1", "j", dir, 1);
        p.setRetry(2, 0.01, 0.01);
        try {
            p.enroll("t", null);
            fail("no exception");
        } catch (ServerUnavailableException e) {
            assertTrue(e.getMessage().contains("ConnectException"));
        }
    }

    @Test
    public void artifactFilesAreHashCheckedAndCached() throws Exception {
        byte[] file = "model bytes".getBytes(StandardCharsets.UTF_8);
        String fileSha = ProtocolClient.sha256(file);
        byte[] manifest = ("{\"backend\": \"tflite\", \"files\": [{\"name\": \"model.tflite\", \"sha256\": \""
                + fileSha + "\"}]}").getBytes(StandardCharsets.UTF_8);
        AtomicInteger fileHits = new AtomicInteger();
        server.createContext("/v1/jobs/j/artifacts/tflite", ex -> {
            boolean isFile = ex.getRequestURI().getPath().endsWith("/model.tflite");
            if (isFile) {
                fileHits.incrementAndGet();
            }
            byte[] body = isFile ? file : manifest;
            ex.sendResponseHeaders(200, body.length);
            try (OutputStream out = ex.getResponseBody()) {
                out.write(body);
            }
        });
        server.start();
        JSONObject ref = new JSONObject().put("backend", "tflite").put("manifest", "/v1/jobs/j/artifacts/tflite")
                .put("sha256", ProtocolClient.sha256(manifest));
        ProtocolClient p = client(2);
        ProtocolClient.Artifact a = p.artifact(ref);
        assertEquals("tflite", a.manifest.getString("backend"));
        assertEquals("model bytes", new String(a.files.get("model.tflite"), StandardCharsets.UTF_8));
        p.artifact(ref);
        client(2).artifact(ref); // a new client on the same cache directory
        assertEquals("each file downloaded once", 1, fileHits.get());
        try {
            p.artifact(new JSONObject(ref.toString()).put("sha256", fileSha.replace('a', 'b').replace('0', '1')
                    .replace('c', 'd')));
            fail("manifest with the wrong hash accepted");
        } catch (ProtocolException e) {
            assertEquals("hash_mismatch", e.code());
        }
    }
}
