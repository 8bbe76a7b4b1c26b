package com.fedscale.android;

import java.io.ByteArrayOutputStream;
import java.io.File;
import java.io.IOException;
import java.io.InputStream;
import java.io.OutputStream;
import java.net.HttpRetryException;
import java.net.HttpURLConnection;
import java.net.URL;
import java.nio.charset.StandardCharsets;
import java.nio.file.AtomicMoveNotSupportedException;
import java.nio.file.Files;
import java.nio.file.StandardCopyOption;
import java.security.MessageDigest;
import java.security.NoSuchAlgorithmException;
import java.util.Collections;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Locale;
import java.util.Map;
import java.util.Random;
import java.util.TreeMap;
import java.util.concurrent.atomic.AtomicInteger;
import org.json.JSONArray;
import org.json.JSONException;
import org.json.JSONObject;

/**
 * The device side of protocol v1 (docs/protocol.md) over {@link HttpURLConnection}: one method per route.
 *
 * <ul>
 *   <li><b>Errors.</b> A 4xx answer (and a 5xx once retries ran out is a {@link ServerUnavailableException})
 *       raises {@link ProtocolException} with the status and the body's {@code error.code}.</li>
 *   <li><b>Retries.</b> Connection errors, timeouts, 5xx and 429 are retried up to {@code maxAttempts}
 *       times with exponential backoff ({@code base·2^attempt}, capped, times a uniform jitter factor in
 *       [0.5, 1]); an answer with a {@code Retry-After} header waits exactly that long. Every request the
 *       protocol has is idempotent (uploads and results by task id), so a retry after a lost answer is
 *       harmless.</li>
 *   <li><b>Caches.</b> Model versions by ETag in memory ({@code If-None-Match}, 304); artifact manifests,
 *       artifact files and frozen tensors by SHA-256 in {@code cacheDir/blobs/} (each checked against its
 *       hash before use; a file is never downloaded twice).</li>
 *   <li><b>Check-in.</b> The daemon holds a check-in up to the job's {@code checkin_wait} (≤ 60 s); its read
 *       timeout is {@code checkinTimeoutMs} (75 s by default).</li>
 * </ul>
 *
 * <p>One thread uses an instance at a time; {@link #abort()} may be called from another thread to cut a
 * request short (it disconnects the connection in flight).
 */
public final class ProtocolClient {
    /** Sleeps between retries; the {@link Client}'s wakes early (InterruptedException) when stopped. */
    public interface Sleeper {
        void sleep(double seconds) throws InterruptedException;
    }

    /** One HTTP answer. */
    public static final class Response {
        public final int status;
        public final byte[] body;
        private final Map<String, String> headers;

        Response(int status, Map<String, String> headers, byte[] body) {
            this.status = status;
            this.headers = headers;
            this.body = body;
        }

        /** A header's value (case-insensitive name), or null. */
        public String header(String name) {
            return headers.get(name.toLowerCase(Locale.ROOT));
        }

        /** The body as a JSON object. */
        public JSONObject json() throws ProtocolException {
            try {
                return new JSONObject(new String(body, StandardCharsets.UTF_8));
            } catch (JSONException e) {
                throw new ProtocolException(status, "bad_answer", "answer is not a JSON object: " + e.getMessage());
            }
        }
    }

    /** A task's artifact: its manifest and files (hash-checked), or none for an artifact-free backend. */
    public static final class Artifact {
        public final String backend;
        /** The manifest's SHA-256 (null for an artifact-free backend). */
        public final String sha256;
        /** Null for an artifact-free backend ({@code java}, {@code jax}). */
        public final JSONObject manifest;
        /** File name to bytes; null for an artifact-free backend. */
        public final Map<String, byte[]> files;

        Artifact(String backend, String sha256, JSONObject manifest, Map<String, byte[]> files) {
            this.backend = backend;
            this.sha256 = sha256;
            this.manifest = manifest;
            this.files = files;
        }
    }

    /** Bodies larger than this are streamed (fixed length) instead of buffered. */
    static final int STREAM_THRESHOLD = 64 * 1024;

    private volatile String server;
    private final String job;
    private final File cacheDir;
    private final Random rng;
    private volatile CredentialStore.Credentials credentials;
    private volatile Sleeper sleeper = seconds -> Thread.sleep((long) (seconds * 1000));
    private volatile HttpURLConnection inFlight;
    private volatile boolean aborted;

    private int maxAttempts = 12;
    private double backoffBaseSeconds = 1.0;
    private double backoffCapSeconds = 60.0;
    private int connectTimeoutMs = 15_000;
    private int requestTimeoutMs = 120_000;
    private int checkinTimeoutMs = 75_000;

    private final Map<Integer, Object[]> models = new LinkedHashMap<>(); // version -> {etag, tensors}
    private final int modelCacheEntries = 2;

    /** Counters, for tests and app diagnostics. */
    public final AtomicInteger retries = new AtomicInteger();
    public final AtomicInteger downloads = new AtomicInteger();
    public final AtomicInteger cacheHits = new AtomicInteger();

    /** A client of {@code job} on the daemon at {@code server}; {@code cacheDir} may be null (no disk cache). */
    public ProtocolClient(String server, String job, File cacheDir, long seed) {
        setServer(server);
        this.job = job;
        this.cacheDir = cacheDir;
        this.rng = new Random(seed);
    }

    /** A client with the server, job, retry and timeout settings of a {@link ClientConfig}. */
    public ProtocolClient(ClientConfig config, File cacheDir) {
        this(config.server, config.job, cacheDir, config.seed);
        setRetry(config.maxAttempts, config.backoffBaseSeconds, config.backoffCapSeconds);
        setTimeouts(config.connectTimeoutSeconds, config.requestTimeoutSeconds, config.checkinTimeoutSeconds);
    }

    // ------------------------------------------------------------------ settings

    public void setServer(String url) {
        this.server = url.endsWith("/") ? url.substring(0, url.length() - 1) : url;
    }

    public String server() {
        return server;
    }

    public String job() {
        return job;
    }

    public void setCredentials(CredentialStore.Credentials c) {
        this.credentials = c;
    }

    public CredentialStore.Credentials credentials() {
        return credentials;
    }

    public void setSleeper(Sleeper s) {
        this.sleeper = s;
    }

    public void setRetry(int attempts, double baseSeconds, double capSeconds) {
        this.maxAttempts = Math.max(1, attempts);
        this.backoffBaseSeconds = baseSeconds;
        this.backoffCapSeconds = capSeconds;
    }

    public void setTimeouts(double connectSeconds, double requestSeconds, double checkinSeconds) {
        this.connectTimeoutMs = (int) (connectSeconds * 1000);
        this.requestTimeoutMs = (int) (requestSeconds * 1000);
        this.checkinTimeoutMs = (int) (checkinSeconds * 1000);
    }

    /** Cut the request in flight short and make every later request fail at once (a stopping client). */
    public void abort() {
        aborted = true;
        HttpURLConnection c = inFlight;
        if (c != null) {
            c.disconnect();
        }
    }

    /** The exponential backoff delay before retry number {@code attempt} (0-based), with jitter. */
    public double backoffDelay(int attempt) {
        double d = Math.min(backoffCapSeconds, backoffBaseSeconds * Math.pow(2.0, Math.min(attempt, 30)));
        synchronized (rng) {
            return d * (0.5 + 0.5 * rng.nextDouble());
        }
    }

    // ------------------------------------------------------------------ routes

    /** {@code POST /enroll}: register with the job's enrollment token; keeps and returns the credentials. */
    public CredentialStore.Credentials enroll(String enrollmentToken, JSONObject deviceInfo)
            throws ProtocolException, IOException, InterruptedException {
        JSONObject body = new JSONObject();
        try {
            body.put("enrollment_token", enrollmentToken);
            body.put("device_info", deviceInfo == null ? new JSONObject() : deviceInfo);
        } catch (JSONException e) {
            throw new IllegalArgumentException(e);
        }
        JSONObject answer = request("POST", jobPath("/enroll"), json(body), "application/json", null, false,
                requestTimeoutMs, 200, 201).json();
        try {
            CredentialStore.Credentials c = new CredentialStore.Credentials(answer.getString("device_id"),
                    answer.getString("token"));
            this.credentials = c;
            return c;
        } catch (JSONException | IllegalArgumentException e) {
            throw new ProtocolException(201, "bad_answer", "enroll answer lacks device_id/token: " + answer);
        }
    }

    /** {@code POST /checkin} with the device state body; the daemon may hold it up to its checkin_wait. */
    public JSONObject checkin(JSONObject state) throws ProtocolException, IOException, InterruptedException {
        return request("POST", jobPath("/checkin"), json(state), "application/json", null, true,
                checkinTimeoutMs, 200).json();
    }

    /** {@code GET /model}: the job's model description. */
    public JSONObject modelInfo() throws ProtocolException, IOException, InterruptedException {
        return request("GET", jobPath("/model"), null, null, null, true, requestTimeoutMs, 200).json();
    }

    /**
     * {@code GET /models/{version}}: the weights by name (file order), from the in-memory cache when the
     * daemon answers 304 to {@code If-None-Match}.
     */
    public Map<String, Tensor> downloadModel(int version) throws ProtocolException, IOException, InterruptedException {
        Object[] cached;
        synchronized (models) {
            cached = models.get(version);
        }
        Map<String, String> headers = cached == null ? null : Collections.singletonMap("If-None-Match", (String) cached[0]);
        Response r = request("GET", jobPath("/models/" + version), null, null, headers, true, requestTimeoutMs, 200, 304);
        if (r.status == 304 && cached != null) {
            cacheHits.incrementAndGet();
            @SuppressWarnings("unchecked")
            Map<String, Tensor> tensors = (Map<String, Tensor>) cached[1];
            return tensors;
        }
        if (r.status == 304) {
            throw new ProtocolException(304, "bad_answer", "304 for a model version not in the cache");
        }
        downloads.incrementAndGet();
        Map<String, Tensor> tensors;
        try {
            tensors = Collections.unmodifiableMap(Safetensors.decode(r.body).byName());
        } catch (Safetensors.FormatException e) {
            throw new ProtocolException(200, "bad_answer", "model " + version + ": " + e.getMessage());
        }
        String etag = r.header("ETag");
        if (etag != null) {
            synchronized (models) {
                models.put(version, new Object[] {etag, tensors});
                while (models.size() > modelCacheEntries) {
                    Integer oldest = models.keySet().iterator().next();
                    models.remove(oldest);
                }
            }
        }
        return tensors;
    }

    /**
     * The artifact a task names ({@code task.artifact}: {@code {"backend", "manifest", "sha256"}}): the
     * manifest and every file it lists, each checked against its SHA-256 and kept by hash in the cache
     * directory. An artifact-free backend ({@code java}, {@code jax}: no {@code manifest}) gives an
     * {@link Artifact} with null manifest and files.
     */
    public Artifact artifact(JSONObject ref) throws ProtocolException, IOException, InterruptedException {
        String backend = ref.optString("backend", "");
        if (backend.isEmpty()) {
            throw new ProtocolException(0, "bad_answer", "artifact reference without a backend: " + ref);
        }
        String manifestPath = ref.optString("manifest", "");
        if (manifestPath.isEmpty()) {
            return new Artifact(backend, null, null, null);
        }
        String sha = ref.optString("sha256", "");
        byte[] manifestBytes = blob(sha, manifestPath, "manifest of " + backend);
        JSONObject manifest;
        try {
            manifest = new JSONObject(new String(manifestBytes, StandardCharsets.UTF_8));
        } catch (JSONException e) {
            throw new ProtocolException(0, "bad_artifact", "manifest of " + backend + " is not JSON: " + e.getMessage());
        }
        Map<String, byte[]> files = new TreeMap<>();
        JSONArray list = manifest.optJSONArray("files");
        if (list == null) {
            throw new ProtocolException(0, "bad_artifact", "manifest of " + backend + " lists no files");
        }
        for (int i = 0; i < list.length(); i++) {
            JSONObject f = list.optJSONObject(i);
            String name = f == null ? "" : f.optString("name", "");
            String fileSha = f == null ? "" : f.optString("sha256", "");
            if (name.isEmpty() || fileSha.isEmpty() || name.contains("/") || name.contains("..")) {
                throw new ProtocolException(0, "bad_artifact", "manifest of " + backend + " has a bad file entry " + f);
            }
            files.put(name, blob(fileSha, manifestPath + "/" + name, backend + " file " + name));
        }
        return new Artifact(backend, sha, manifest, files);
    }

    /** The frozen tensors a task names ({@code task.frozen}: {@code {"url", "sha256"}}), hash-checked and cached. */
    public Map<String, Tensor> frozen(JSONObject ref) throws ProtocolException, IOException, InterruptedException {
        if (ref == null) {
            return Collections.emptyMap();
        }
        String url = ref.optString("url", "");
        if (url.isEmpty()) {
            throw new ProtocolException(0, "bad_answer", "frozen reference without a url: " + ref);
        }
        byte[] bytes = blob(ref.optString("sha256", ""), url, "frozen tensors");
        try {
            return Safetensors.decode(bytes).byName();
        } catch (Safetensors.FormatException e) {
            throw new ProtocolException(0, "bad_artifact", "frozen tensors: " + e.getMessage());
        }
    }

    /**
     * {@code PUT /tasks/{id}/update}: the trained weights (in the model's order) with the metadata
     * {@code samples}, {@code loss} and {@code duration} as strings.
     */
    public JSONObject uploadUpdate(String taskId, List<Tensor> weights, long samples, double loss, double duration)
            throws ProtocolException, IOException, InterruptedException {
        Map<String, String> meta = new LinkedHashMap<>();
        meta.put("samples", Long.toString(samples));
        meta.put("loss", Double.toString(loss));
        meta.put("duration", Double.toString(Math.max(0.0, duration)));
        byte[] body = Safetensors.encode(weights, meta);
        return request("PUT", jobPath("/tasks/" + taskId + "/update"), body, "application/octet-stream", null, true,
                requestTimeoutMs, 200).json();
    }

    /** {@code POST /tasks/{id}/result}: a test task's counts and sums. */
    public JSONObject postResult(String taskId, TestCounts counts, double duration)
            throws ProtocolException, IOException, InterruptedException {
        JSONObject body = new JSONObject();
        try {
            body.put("samples", counts.samples).put("correct_top1", counts.correctTop1)
                    .put("correct_top5", counts.correctTop5).put("loss_sum", counts.lossSum)
                    .put("duration", Math.max(0.0, duration));
        } catch (JSONException e) {
            throw new ProtocolException(0, "bad_result", "test result not representable: " + e.getMessage());
        }
        return request("POST", jobPath("/tasks/" + taskId + "/result"), json(body), "application/json", null, true,
                requestTimeoutMs, 200).json();
    }

    /**
     * {@code POST /tasks/{id}/abandon}: give a task up (this device cannot finish it), so that the round stops
     * waiting for it. Idempotent: {@code {"task_id", "abandoned": true, "duplicate"}}, or {@code "abandoned":
     * false} when its result was already delivered.
     */
    public JSONObject abandon(String taskId) throws ProtocolException, IOException, InterruptedException {
        return request("POST", jobPath("/tasks/" + taskId + "/abandon"), new byte[0], "application/json", null, true,
                requestTimeoutMs, 200).json();
    }

    // ------------------------------------------------------------------ HTTP

    private String jobPath(String rest) {
        return "/v1/jobs/" + job + rest;
    }

    private static byte[] json(JSONObject o) {
        return o.toString().getBytes(StandardCharsets.UTF_8);
    }

    /**
     * One request with retries; returns the answer when its status is one of {@code ok}. See the class
     * comment for what is retried.
     */
    public Response request(String method, String path, byte[] body, String contentType, Map<String, String> headers,
                            boolean auth, int timeoutMs, int... ok)
            throws ProtocolException, IOException, InterruptedException {
        int attempt = 0;
        while (true) {
            checkAborted();
            double wait = -1;
            String reason;
            IOException cause = null;
            try {
                Response r = once(method, path, body, contentType, headers, auth, timeoutMs);
                for (int s : ok) {
                    if (r.status == s) {
                        return r;
                    }
                }
                if (r.status >= 500 || r.status == 429) {
                    reason = "HTTP " + r.status;
                    String ra = r.header("Retry-After");
                    if (ra != null) {
                        try {
                            wait = Math.max(0.0, Double.parseDouble(ra.trim()));
                        } catch (NumberFormatException e) {
                            wait = -1;
                        }
                    }
                } else {
                    throw ProtocolException.fromResponse(r.status, r.body);
                }
            } catch (IOException e) {
                checkAborted();
                reason = e.getClass().getSimpleName() + ": " + e.getMessage();
                cause = e;
            }
            attempt++;
            retries.incrementAndGet();
            if (attempt >= maxAttempts) {
                throw new ServerUnavailableException(method + " " + path + ": gave up after " + attempt
                        + " attempts (" + reason + ")", cause);
            }
            sleeper.sleep(wait >= 0 ? wait : backoffDelay(attempt - 1));
        }
    }

    private void checkAborted() throws InterruptedException {
        if (aborted || Thread.currentThread().isInterrupted()) {
            throw new InterruptedException("protocol client stopped");
        }
    }

    private Response once(String method, String path, byte[] body, String contentType, Map<String, String> headers,
                          boolean auth, int timeoutMs) throws IOException, ProtocolException {
        CredentialStore.Credentials c = credentials;
        if (auth && c == null) {
            throw new ProtocolException(401, "unauthorized", "device is not enrolled");
        }
        HttpURLConnection conn = (HttpURLConnection) new URL(server + path).openConnection();
        inFlight = conn;
        try {
            conn.setRequestMethod(method);
            conn.setConnectTimeout(connectTimeoutMs);
            conn.setReadTimeout(timeoutMs);
            conn.setUseCaches(false);
            conn.setInstanceFollowRedirects(false);
            conn.setRequestProperty("Accept", "application/json, application/octet-stream");
            if (auth) {
                conn.setRequestProperty("Authorization", "Bearer " + c.token);
            }
            if (headers != null) {
                for (Map.Entry<String, String> h : headers.entrySet()) {
                    conn.setRequestProperty(h.getKey(), h.getValue());
                }
            }
            if (body != null) {
                conn.setDoOutput(true);
                conn.setRequestProperty("Content-Type", contentType);
                if (body.length > STREAM_THRESHOLD) {
                    // Large bodies (uploads) are streamed, not buffered twice.
                    conn.setFixedLengthStreamingMode(body.length);
                }
                try (OutputStream out = conn.getOutputStream()) {
                    out.write(body);
                }
            }
            int status;
            try {
                status = conn.getResponseCode();
            } catch (HttpRetryException e) {
                // HttpURLConnection throws this for a 401 to a streamed body, dropping the error body.
                Map<String, String> none = Collections.emptyMap();
                String code = e.responseCode() == 401 ? "unauthorized" : "http_" + e.responseCode();
                byte[] synthetic = ("{\"error\": {\"code\": \"" + code + "\", \"message\": \"" + e.getReason()
                        + "\"}}").getBytes(StandardCharsets.UTF_8);
                return new Response(e.responseCode(), none, synthetic);
            }
            InputStream in = status >= 400 ? conn.getErrorStream() : conn.getInputStream();
            byte[] data = readAll(in);
            Map<String, String> h = new TreeMap<>();
            for (Map.Entry<String, List<String>> e : conn.getHeaderFields().entrySet()) {
                if (e.getKey() != null && !e.getValue().isEmpty()) {
                    h.put(e.getKey().toLowerCase(Locale.ROOT), e.getValue().get(0));
                }
            }
            return new Response(status, h, data);
        } catch (IOException e) {
            conn.disconnect();
            throw e;
        } finally {
            inFlight = null;
        }
    }

    private static byte[] readAll(InputStream in) throws IOException {
        if (in == null) {
            return new byte[0];
        }
        try (InputStream s = in) {
            ByteArrayOutputStream out = new ByteArrayOutputStream();
            byte[] buf = new byte[65536];
            for (int r; (r = s.read(buf)) > 0; ) {
                out.write(buf, 0, r);
            }
            return out.toByteArray();
        }
    }

    // ------------------------------------------------------------------ content-addressed cache

    /** Bytes with SHA-256 {@code sha}: from the cache directory, else downloaded from {@code path}, checked, kept. */
    private byte[] blob(String sha, String path, String what) throws ProtocolException, IOException, InterruptedException {
        if (sha.isEmpty() || !sha.matches("[0-9a-f]{64}")) {
            throw new ProtocolException(0, "bad_answer", what + ": no valid sha256 (" + sha + ")");
        }
        File file = cacheDir == null ? null : new File(new File(cacheDir, "blobs"), sha);
        if (file != null && file.isFile()) {
            byte[] data = Files.readAllBytes(file.toPath());
            if (sha256(data).equals(sha)) {
                cacheHits.incrementAndGet();
                return data;
            }
            Files.deleteIfExists(file.toPath()); // corrupt: download again
        }
        byte[] data = request("GET", path, null, null, null, true, requestTimeoutMs, 200).body;
        downloads.incrementAndGet();
        String got = sha256(data);
        if (!got.equals(sha)) {
            throw new ProtocolException(0, "hash_mismatch", what + ": SHA-256 " + got + " differs from the expected "
                    + sha + "; not used");
        }
        if (file != null) {
            File dir = file.getParentFile();
            if (!dir.isDirectory() && !dir.mkdirs()) {
                throw new IOException("cannot create cache directory " + dir);
            }
            File tmp = File.createTempFile(sha, ".part", dir);
            Files.write(tmp.toPath(), data);
            try {
                Files.move(tmp.toPath(), file.toPath(), StandardCopyOption.REPLACE_EXISTING,
                        StandardCopyOption.ATOMIC_MOVE);
            } catch (AtomicMoveNotSupportedException e) {
                Files.move(tmp.toPath(), file.toPath(), StandardCopyOption.REPLACE_EXISTING);
            }
        }
        return data;
    }

    /** Lower-case hex SHA-256 of {@code data}. */
    public static String sha256(byte[] data) {
        try {
            byte[] d = MessageDigest.getInstance("SHA-256").digest(data);
            StringBuilder b = new StringBuilder(64);
            for (byte x : d) {
                b.append(String.format("%02x", x & 0xff));
            }
            return b.toString();
        } catch (NoSuchAlgorithmException e) {
            throw new IllegalStateException(e);
        }
    }
}
