package com.fedscale.android;

import java.io.File;
import java.io.IOException;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.Collections;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.Random;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.atomic.AtomicInteger;
import org.json.JSONArray;
import org.json.JSONException;
import org.json.JSONObject;

/**
 * The SDK's entry point: one phone in one federated job, following docs/protocol.md's device loop.
 *
 * <pre>
 * Client client = new Client(config, trainData, testData, deviceState, backends, credentials, cacheDir, listener);
 * client.run();      // background thread
 * ...
 * client.stop();     // ends the loop cleanly (waits are cut short, a task in progress is abandoned)
 * </pre>
 *
 * <p>The loop: enroll once (credentials persisted in the {@link CredentialStore}); then repeatedly read the
 * {@link DeviceState}, judge it with the local {@link SchedulingPolicy}, check in with the true state and
 * the backends in preference order (the daemon decides eligibility; the device never trains while its
 * local policy forbids it), and act on the answer:
 *
 * <ul>
 *   <li>{@code wait}: sleep a uniformly random time in {@code retry_after}'s window;</li>
 *   <li>{@code train}: weights of {@code model_version} (ETag cache), the artifact of
 *       {@code task.artifact.backend} and {@code task.frozen} (SHA-256 cache), {@code local_steps} (or
 *       {@code epochs} passes) through {@link LocalTrainer} (FedProx's proximal term when the config's
 *       {@code proxy_mu} is above 0), checking {@link SchedulingPolicy#shouldAbort}
 *       before every step (an aborted task uploads nothing), then the upload with {@code samples},
 *       {@code loss} and {@code duration};</li>
 *   <li>{@code test}: evaluate every local test sample, post the counts;</li>
 *   <li>{@code done}: stop ({@link Listener#onJobOver}); {@code reason: unsupported_backend} is also an
 *       {@link Listener#onError error}.</li>
 * </ul>
 *
 * Network errors and 5xx answers are retried by {@link ProtocolClient} (backoff, jitter, Retry-After) and
 * then paused on with a growing backoff: a daemon restart is survived. A 401 forgets the stored token and
 * enrolls again with the enrollment token; a refused enrollment token is fatal. Every loop is bounded by
 * {@code client.max_iterations} and {@code client.run_seconds}.
 */
public final class Client {
    /** Callbacks from the client's thread; every method has an empty default. */
    public interface Listener {
        /** Enrolled ({@code reused}: credentials came from the store, no enrollment request was made). */
        default void onEnrolled(String deviceId, boolean reused) {}

        /** A train or test task begins (weights and artifact downloaded, backend loaded). */
        default void onTaskStarted(String kind, JSONObject task) {}

        /** A task's upload or result was answered; {@link TaskReport} holds what was sent. */
        default void onTaskFinished(TaskReport report) {}

        /** A task was abandoned without telling the daemon ({@code reason}: policy, stop, dropped by the daemon). */
        default void onTaskAborted(JSONObject task, String reason) {}

        /** The client sleeps {@code seconds} before the next check-in ({@code reason}: the daemon's or local). */
        default void onWait(String reason, double seconds) {}

        /** Something failed; {@code fatal}: the loop ends. */
        default void onError(Exception error, boolean fatal) {}

        /** The daemon said the job is over for this device ({@code state}: finished, stopped, failed, or a reason). */
        default void onJobOver(String state) {}

        /** The loop ended (job over, stop(), fatal error, or its iteration/time bounds). */
        default void onStopped() {}
    }

    /** Counters of one run. */
    public static final class Stats {
        public final AtomicInteger checkins = new AtomicInteger();
        public final AtomicInteger waits = new AtomicInteger();
        public final AtomicInteger trained = new AtomicInteger();
        public final AtomicInteger tested = new AtomicInteger();
        public final AtomicInteger aborted = new AtomicInteger();
        public final AtomicInteger declined = new AtomicInteger();
        public final AtomicInteger errors = new AtomicInteger();
        public final AtomicInteger enrollments = new AtomicInteger();
    }

    private static final List<String> DROP_TASK_CODES = Arrays.asList("wrong_round", "task_expired", "unknown_task",
            "wrong_task_kind", "invalid_tensor", "invalid_metadata", "payload_too_large");

    private final ClientConfig config;
    private final Dataset trainData;
    private final Dataset testData;
    private final DeviceState deviceState;
    private final Map<String, Backend> backends;
    private final List<String> announced;
    private final CredentialStore credentialStore;
    private final File cacheDir;
    private final Listener listener;
    private final SchedulingPolicy policy;
    private final ProtocolClient protocol;
    private final Random rng;
    private final Stats stats = new Stats();
    private final Object computeLock = new Object();
    private final CountDownLatch stopped = new CountDownLatch(1);

    private volatile boolean stopping;
    private volatile Thread thread;
    private volatile String endReason;
    private long deadlineNanos = Long.MAX_VALUE;
    private ModelSpec spec;
    private String loadedKey;
    private int tasksDone;

    /**
     * @param backends engines by name ({@code "java"} → {@link PlainJavaBackend}, {@code "tflite"}, {@code "mnn"}
     *     adapters); only those also in {@code config.backends} are announced, in that order
     * @param cacheDir where artifacts and frozen tensors are kept by hash (app-private)
     * @param listener may be null
     */
    public Client(ClientConfig config, Dataset train, Dataset test, DeviceState state, Map<String, Backend> backends,
                  CredentialStore credentials, File cacheDir, Listener listener) {
        this.config = config;
        this.trainData = train;
        this.testData = test;
        this.deviceState = state;
        this.backends = new LinkedHashMap<>(backends);
        List<String> a = new ArrayList<>();
        for (String name : config.backends) {
            if (this.backends.containsKey(name) && !a.contains(name)) {
                a.add(name);
            }
        }
        this.announced = Collections.unmodifiableList(a);
        this.credentialStore = credentials;
        this.cacheDir = cacheDir;
        this.listener = listener != null ? listener : new Listener() {};
        this.policy = config.schedulingPolicy();
        this.rng = new Random(config.seed);
        this.protocol = newProtocol();
    }

    /**
     * A client with the plain-Java backend only, credentials in {@code filesDir/credentials.json} and the
     * cache in {@code filesDir/cache}.
     */
    public Client(ClientConfig config, Dataset train, Dataset test, DeviceState state, File filesDir, Listener listener) {
        this(config, train, test, state, Collections.singletonMap(PlainJavaBackend.NAME, new PlainJavaBackend()),
                new FileCredentialStore(new File(filesDir, "credentials.json")), new File(filesDir, "cache"), listener);
    }

    private ProtocolClient newProtocol() {
        ProtocolClient p = new ProtocolClient(config, cacheDir);
        p.setSleeper(this::sleep);
        return p;
    }

    /** The protocol client (for apps and tests: e.g. to download a model version). */
    public ProtocolClient protocol() {
        return protocol;
    }

    /** Point the client at another URL (a daemon that came back on another port). */
    public void setServer(String url) {
        protocol.setServer(url);
    }

    public Stats stats() {
        return stats;
    }

    /** Backends announced at check-in, most preferred first. */
    public List<String> announcedBackends() {
        return announced;
    }

    /** Why the loop ended (null while running). */
    public String endReason() {
        return endReason;
    }

    // ------------------------------------------------------------------ lifecycle

    /** Start the loop on a background (daemon) thread; returns at once. */
    public synchronized void run() {
        if (thread != null) {
            throw new IllegalStateException("already started");
        }
        Thread t = new Thread(this::runBlocking, "fedscale-client-" + config.job);
        t.setDaemon(true);
        thread = t;
        t.start();
    }

    /** Ask the loop to end: waits end at once, a request in flight is cut, a task in progress is abandoned. */
    public void stop() {
        stopping = true;
        stopped.countDown();
        protocol.abort();
    }

    /** Wait up to {@code millis} for the background thread to end; true when it has. */
    public boolean join(long millis) throws InterruptedException {
        Thread t = thread;
        if (t == null) {
            return true;
        }
        t.join(millis);
        return !t.isAlive();
    }

    /** Whether the background loop is running. */
    public boolean isRunning() {
        Thread t = thread;
        return t != null && t.isAlive();
    }

    /** Run the device loop on the calling thread until done, {@link #stop()}, a fatal error or its bounds. */
    public void runBlocking() {
        if (config.runSeconds > 0) {
            deadlineNanos = System.nanoTime() + (long) (config.runSeconds * 1e9);
        }
        int failures = 0;
        boolean retriedJobNotActive = false;
        try {
            if (announced.isEmpty()) {
                fatal(new IllegalStateException("none of the configured backends " + config.backends
                        + " is available (have " + backends.keySet() + ")"));
                return;
            }
            for (int it = 0; it < config.maxIterations && !stopping; it++) {
                if (System.nanoTime() >= deadlineNanos) {
                    endReason = "deadline";
                    break;
                }
                try {
                    iteration();
                    failures = 0;
                    retriedJobNotActive = false;
                } catch (JobOver over) {
                    endReason = "job over: " + over.state;
                    listener.onJobOver(over.state);
                    break;
                } catch (Fatal f) {
                    fatal(f.error);
                    break;
                } catch (InterruptedException e) {
                    break;
                } catch (ProtocolException e) {
                    stats.errors.incrementAndGet();
                    String code = e.code();
                    if ("job_not_active".equals(code) && !retriedJobNotActive && protocol.credentials() != null) {
                        retriedJobNotActive = true; // the next check-in says how it ended ("done")
                        listener.onError(e, false);
                        continue;
                    }
                    if ("job_not_active".equals(code) || "job_not_found".equals(code)) {
                        listener.onError(e, false);
                        endReason = "job over: " + code;
                        listener.onJobOver(code);
                        break;
                    }
                    if ("device_revoked".equals(code)) {
                        forgetCredentials();
                        fatal(e);
                        break;
                    }
                    if ("unauthorized".equals(code)) {
                        forgetCredentials(); // enroll again with the enrollment token at the next iteration
                    }
                    listener.onError(e, false);
                    if (DROP_TASK_CODES.contains(code)) {
                        continue;
                    }
                    failures++;
                    sleep(protocol.backoffDelay(Math.min(failures, 10)));
                } catch (Exception e) { // network gone through every retry, malformed answers, backend errors
                    stats.errors.incrementAndGet();
                    listener.onError(e, false);
                    failures++;
                    sleep(protocol.backoffDelay(Math.min(failures, 10)));
                }
            }
        } catch (InterruptedException e) {
            // stop() or the deadline during a pause
        } finally {
            if (endReason == null) {
                endReason = stopping ? "stopped" : "bounds";
            }
            stopped.countDown();
            listener.onStopped();
        }
    }

    private void fatal(Exception e) {
        stats.errors.incrementAndGet();
        endReason = "fatal: " + e.getMessage();
        listener.onError(e, true);
    }

    // ------------------------------------------------------------------ one round trip

    private static final class JobOver extends Exception {
        private static final long serialVersionUID = 1L;
        final String state;

        JobOver(String state) {
            super(state);
            this.state = state;
        }
    }

    private static final class Fatal extends Exception {
        private static final long serialVersionUID = 1L;
        final Exception error;

        Fatal(Exception error) {
            super(error);
            this.error = error;
        }
    }

    private void iteration() throws Exception {
        ensureEnrolled();
        if (spec == null) {
            loadModelInfo();
        }
        SchedulingPolicy.Decision decision = policy.decide(deviceState);
        stats.checkins.incrementAndGet();
        JSONObject answer = protocol.checkin(stateJson());
        String action = answer.optString("action", "");
        switch (action) {
            case "done": {
                String reason = answer.optString("reason", "");
                if ("unsupported_backend".equals(reason)) {
                    listener.onError(new ProtocolException(200, "unsupported_backend", "the job serves "
                            + answer.optJSONArray("backends") + "; this device announced " + announced), true);
                    throw new JobOver("unsupported_backend");
                }
                throw new JobOver(answer.optString("state", "finished"));
            }
            case "wait": {
                stats.waits.incrementAndGet();
                double delay = retryWindow(answer.optJSONObject("retry_after"));
                String reason = answer.optString("reason", "wait");
                if (!decision.allowed) {
                    reason = reason + " (local policy: " + decision.reason + ")";
                }
                listener.onWait(reason, delay);
                sleep(delay);
                return;
            }
            case "train":
            case "test": {
                JSONObject task = answer.getJSONObject("task");
                if (!decision.allowed) {
                    // The daemon's policy is looser than the phone's: leave the task (its deadline covers it).
                    stats.declined.incrementAndGet();
                    listener.onTaskAborted(task, "local policy: " + decision.reason);
                    double delay = Math.min(config.policyWaitSeconds,
                            Math.max(1.0, retryWindow(answer.optJSONObject("retry_after"))));
                    listener.onWait("local policy: " + decision.reason, delay);
                    sleep(delay);
                    return;
                }
                if ("train".equals(action)) {
                    doTrain(task);
                } else {
                    doTest(task);
                }
                return;
            }
            default:
                throw new ProtocolException(200, "unknown_action", "unknown check-in answer " + answer);
        }
    }

    private void ensureEnrolled() throws Exception {
        if (protocol.credentials() != null) {
            return;
        }
        CredentialStore.Credentials stored = credentialStore.load(config.server, config.job);
        if (stored != null) {
            protocol.setCredentials(stored);
            listener.onEnrolled(stored.deviceId, true);
            return;
        }
        CredentialStore.Credentials fresh;
        try {
            fresh = protocol.enroll(config.enrollmentToken, deviceInfo());
        } catch (ProtocolException e) {
            if ("unauthorized".equals(e.code())) {
                throw new Fatal(new ProtocolException(e.status(), e.code(), "the enrollment token was refused: "
                        + e.serverMessage(), e.details()));
            }
            throw e;
        }
        stats.enrollments.incrementAndGet();
        credentialStore.save(config.server, config.job, fresh);
        listener.onEnrolled(fresh.deviceId, false);
    }

    private void forgetCredentials() {
        protocol.setCredentials(null);
        try {
            credentialStore.clear(config.server, config.job);
        } catch (IOException e) {
            listener.onError(e, false);
        }
    }

    private JSONObject deviceInfo() throws JSONException {
        JSONObject info = new JSONObject(config.deviceInfo.toString());
        if (!info.has("sdk")) {
            info.put("sdk", "fedscale-android-java");
        }
        return info;
    }

    private void loadModelInfo() throws Exception {
        JSONObject info = protocol.modelInfo();
        ModelSpec s = ModelSpec.fromJson(info);
        checkData(s);
        spec = s;
    }

    private void checkData(ModelSpec s) throws Fatal {
        if (trainData.sampleSize() != s.sampleSize() || (testData != null && testData.size() > 0
                && testData.sampleSize() != s.sampleSize())) {
            throw new Fatal(new IllegalStateException("the job's model " + s.model + " takes inputs of "
                    + Arrays.toString(s.inputShape) + " (" + s.sampleSize() + " floats); the local data has "
                    + trainData.sampleSize()));
        }
        if (config.inputShape != null && !Arrays.equals(config.inputShape, s.inputShape)) {
            throw new Fatal(new IllegalStateException("training_conf says height/width/channel "
                    + Arrays.toString(config.inputShape) + ", the job's input_shape is " + Arrays.toString(s.inputShape)));
        }
        if (config.numClasses > 0 && config.numClasses != s.numClasses) {
            throw new Fatal(new IllegalStateException("training_conf says num_classes " + config.numClasses
                    + ", the job has " + s.numClasses));
        }
    }

    /** The check-in body: the true device state, local sample count and announced backends. */
    JSONObject stateJson() throws JSONException {
        JSONObject s = new JSONObject();
        s.put("battery", Math.max(0, Math.min(100, deviceState.batteryPercent())));
        s.put("charging", deviceState.isCharging());
        s.put("idle", deviceState.isIdle());
        s.put("unmetered", deviceState.isUnmetered());
        s.put("free_storage_mb", Math.max(0L, deviceState.freeStorageMb()));
        s.put("num_samples", trainData.size());
        s.put("backends", new JSONArray(announced));
        return s;
    }

    private double retryWindow(JSONObject window) {
        double lo = 1.0;
        double hi = 5.0; // a malformed window must not make the fleet hammer the daemon
        if (window != null && window.has("min") && window.has("max")) {
            lo = Math.max(0.0, window.optDouble("min", 1.0));
            hi = Math.max(lo, window.optDouble("max", 5.0));
        }
        synchronized (rng) {
            return lo + (hi - lo) * rng.nextDouble();
        }
    }

    // ------------------------------------------------------------------ tasks

    /** The task's engine, loaded for the job's model (loading again only when the artifact changes). */
    private Backend engine(ProtocolClient p, JSONObject artifactRef, int trainBatch, int testBatch) throws Exception {
        String name = artifactRef.optString("backend", "");
        Backend backend = backends.get(name);
        if (backend == null) {
            throw new ProtocolException(200, "unsupported_backend", "the task names backend " + name
                    + ", this device has " + backends.keySet());
        }
        String key = name + "@" + artifactRef.optString("sha256", "") + "/" + spec.model;
        if (!key.equals(loadedKey)) {
            ProtocolClient.Artifact artifact = p.artifact(artifactRef);
            backend.load(spec, artifact.manifest, artifact.files);
            loadedKey = key;
        }
        if (backend instanceof PlainJavaBackend) {
            ((PlainJavaBackend) backend).setBatchSizes(trainBatch, testBatch);
        }
        return backend;
    }

    private Map<String, Tensor> trainable(ProtocolClient p, int version) throws Exception {
        Map<String, Tensor> all = p.downloadModel(version);
        Map<String, Tensor> ordered = new LinkedHashMap<>();
        for (ModelSpec.TensorInfo t : spec.tensors) {
            Tensor w = all.get(t.name);
            if (w == null || !Arrays.equals(w.shape(), t.shape)) {
                throw new ProtocolException(200, "invalid_tensor", "model " + version + " lacks or misshapes tensor "
                        + t.name);
            }
            ordered.put(t.name, w);
        }
        return ordered;
    }

    private JSONObject artifactRef(JSONObject task) throws JSONException {
        JSONObject ref = task.optJSONObject("artifact");
        return ref != null ? ref : new JSONObject().put("backend", announced.get(0));
    }

    /** Give a task up, best effort: a daemon that is away (or older, without the route) lets it expire. */
    private void abandonQuietly(String taskId) {
        if (stopping) {
            return; // shutting down: no new requests
        }
        try {
            protocol.abandon(taskId);
        } catch (ProtocolException | IOException e) {
            // the task's deadline covers it
        } catch (InterruptedException e) {
            Thread.currentThread().interrupt();
        }
    }

    private void doTrain(JSONObject task) throws Exception {
        String taskId = task.getString("task_id");
        int version = task.getInt("model_version");
        JSONObject cfg = task.optJSONObject("config");
        if (cfg == null) {
            cfg = new JSONObject();
        }
        float lr = (float) cfg.optDouble("learning_rate", 0.05);
        int localSteps = cfg.optInt("local_steps", 20);
        int epochs = cfg.optInt("epochs", 0);
        int batch = cfg.optInt("batch_size", 32);
        float wd = (float) cfg.optDouble("weight_decay", 0.0);
        float proxyMu = taskProxyMu(cfg); // FedProx; 0 (plain SGD) for older daemons
        Map<String, Tensor> weights = trainable(protocol, version);
        Map<String, Tensor> frozen = protocol.frozen(task.optJSONObject("frozen"));
        LocalTrainer.Outcome out;
        Backend backend;
        long started;
        synchronized (computeLock) {
            backend = engine(protocol, artifactRef(task), batch, config.testBsz);
            int b = backend.trainBatchSize() > 0 ? backend.trainBatchSize() : batch;
            if (b != batch) {
                throw new ProtocolException(200, "artifact_mismatch", "task batch size " + batch
                        + " differs from the artifact's " + b);
            }
            listener.onTaskStarted("train", task);
            started = System.nanoTime();
            Random taskRng = new Random(config.seed * 1_000_003L + tasksDone++);
            // wGlobal null: the downloaded weights themselves anchor the proximal term (no copy).
            out = LocalTrainer.train(backend, b, frozen, weights, trainData, lr, wd, proxyMu, null, localSteps,
                    epochs, taskRng, () -> stopping || policy.shouldAbort(deviceState));
        }
        if (out.aborted) {
            stats.aborted.incrementAndGet();
            listener.onTaskAborted(task, stopping ? "stopped" : "local policy: " + policy.decide(deviceState).reason);
            abandonQuietly(taskId); // the round need not wait for this device until its deadline
            return;
        }
        double duration = (System.nanoTime() - started) / 1e9;
        List<Tensor> upload = new ArrayList<>();
        for (ModelSpec.TensorInfo t : spec.tensors) {
            upload.add(out.weights.get(t.name));
        }
        if (!finite(upload) || Double.isNaN(out.meanLoss) || Double.isInfinite(out.meanLoss)) {
            stats.aborted.incrementAndGet();
            listener.onTaskAborted(task, "training diverged (non-finite weights or loss): nothing uploaded");
            abandonQuietly(taskId);
            return;
        }
        stats.trained.incrementAndGet();
        JSONObject answer = protocol.uploadUpdate(taskId, upload, out.samplesUsed, out.meanLoss, duration);
        listener.onTaskFinished(new TaskReport("train", taskId, task.optInt("round"), version, backend.name(),
                Collections.unmodifiableList(upload), out.samplesUsed, out.meanLoss, null, duration, answer));
    }

    /**
     * FedProx's {@code mu} of a train task's config: {@code proxy_mu}, 0 when absent or null (daemons that
     * predate it). A negative, non-finite or non-numeric value is refused: a negative mu would push the
     * weights away from the global model instead of pulling them toward it.
     */
    static float taskProxyMu(JSONObject cfg) {
        if (cfg == null || !cfg.has("proxy_mu") || cfg.isNull("proxy_mu")) {
            return 0f;
        }
        double mu = cfg.optDouble("proxy_mu", Double.NaN);
        if (Double.isNaN(mu) || Double.isInfinite(mu) || mu < 0.0) {
            throw new IllegalArgumentException("proxy_mu must be a finite number >= 0, got " + cfg.opt("proxy_mu"));
        }
        return (float) mu;
    }

    private void doTest(JSONObject task) throws Exception {
        String taskId = task.getString("task_id");
        int version = task.getInt("model_version");
        if (testData == null || testData.size() == 0) {
            // samples must be >= 1: a device without test data cannot answer (the daemon times it out).
            listener.onTaskAborted(task, "no local test data");
            stats.aborted.incrementAndGet();
            sleep(1.0);
            return;
        }
        JSONObject cfg = task.optJSONObject("config");
        int bsz = cfg == null ? config.testBsz : cfg.optInt("test_bsz", config.testBsz);
        Map<String, Tensor> weights = new LinkedHashMap<>(protocol.frozen(task.optJSONObject("frozen")));
        weights.putAll(trainable(protocol, version));
        TestCounts counts;
        Backend backend;
        long started;
        synchronized (computeLock) {
            backend = engine(protocol, artifactRef(task), config.batchSize, bsz);
            int b = backend.testBatchSize() > 0 ? backend.testBatchSize() : bsz;
            listener.onTaskStarted("test", task);
            started = System.nanoTime();
            counts = LocalTrainer.evaluate(backend, b, weights, testData);
        }
        double duration = (System.nanoTime() - started) / 1e9;
        stats.tested.incrementAndGet();
        JSONObject answer = protocol.postResult(taskId, counts, duration);
        listener.onTaskFinished(new TaskReport("test", taskId, task.optInt("round"), version, backend.name(), null,
                counts.samples, counts.samples == 0 ? 0.0 : counts.lossSum / counts.samples, counts, duration, answer));
    }

    private static boolean finite(List<Tensor> tensors) {
        for (Tensor t : tensors) {
            for (float v : t.data()) {
                if (Float.isNaN(v) || Float.isInfinite(v)) {
                    return false;
                }
            }
        }
        return true;
    }

    // ------------------------------------------------------------------ fine-tuning

    /** {@link #fineTune(float, int, int, int, float)} with conf.json's training_conf (epoch, batch_size, lr, wd). */
    public FineTuneResult fineTune() throws Exception {
        return fineTune((float) config.learningRate, 0, Math.max(1, config.epochs), config.batchSize,
                (float) config.weightDecay);
    }

    /**
     * Personalise: train the job's latest global model on the local training data without uploading
     * anything, and report the local test accuracy before and after. Runs on the calling thread; safe to
     * call while {@link #run()} is active (tasks and fine-tuning take turns on the backends).
     */
    public FineTuneResult fineTune(float lr, int localSteps, int epochs, int batchSize, float wd) throws Exception {
        ProtocolClient p = newProtocol();
        if (protocol.credentials() != null) {
            p.setCredentials(protocol.credentials());
        } else {
            CredentialStore.Credentials stored = credentialStore.load(config.server, config.job);
            if (stored != null) {
                p.setCredentials(stored);
            } else {
                CredentialStore.Credentials fresh = p.enroll(config.enrollmentToken, deviceInfo());
                credentialStore.save(config.server, config.job, fresh);
                listener.onEnrolled(fresh.deviceId, false);
            }
        }
        p.setServer(protocol.server());
        JSONObject info = p.modelInfo();
        int version = info.getInt("latest_version");
        JSONObject served = info.optJSONObject("backends");
        JSONObject ref = null;
        for (String name : announced) {
            if (served != null && served.optJSONObject(name) != null) {
                ref = served.getJSONObject(name);
                break;
            }
        }
        if (ref == null) {
            throw new ProtocolException(200, "unsupported_backend", "the job serves "
                    + (served == null ? "[]" : served.names()) + "; this device runs " + announced);
        }
        synchronized (computeLock) {
            ModelSpec s = ModelSpec.fromJson(info);
            checkData(s);
            spec = s;
            Map<String, Tensor> weights = trainable(p, version);
            Map<String, Tensor> frozen = p.frozen(info.optJSONObject("frozen"));
            Backend backend = engine(p, ref, batchSize, config.testBsz);
            int b = backend.trainBatchSize() > 0 ? backend.trainBatchSize() : batchSize;
            int tb = backend.testBatchSize() > 0 ? backend.testBatchSize() : config.testBsz;
            Map<String, Tensor> all = new LinkedHashMap<>(frozen);
            all.putAll(weights);
            TestCounts before = LocalTrainer.evaluate(backend, tb, all, testData);
            LocalTrainer.Outcome out = LocalTrainer.train(backend, b, frozen, weights, trainData, lr, wd, localSteps,
                    epochs, new Random(config.seed), null);
            all.putAll(out.weights);
            TestCounts after = LocalTrainer.evaluate(backend, tb, all, testData);
            return new FineTuneResult(version, before.accuracy(), after.accuracy(), out.samplesUsed, out.meanLoss,
                    backend.name(), out.weights);
        }
    }

    // ------------------------------------------------------------------ waiting

    /** Sleep, waking early (InterruptedException) on {@link #stop()} or at the run's deadline. */
    private void sleep(double seconds) throws InterruptedException {
        if (stopping) {
            throw new InterruptedException("stopped");
        }
        long remaining = deadlineNanos == Long.MAX_VALUE ? Long.MAX_VALUE : deadlineNanos - System.nanoTime();
        if (remaining <= 0) {
            throw new InterruptedException("deadline");
        }
        long nanos = Math.min((long) (Math.max(0.0, seconds) * 1e9), remaining);
        if (stopped.await(nanos, TimeUnit.NANOSECONDS) || stopping) {
            throw new InterruptedException("stopped");
        }
        if (deadlineNanos != Long.MAX_VALUE && System.nanoTime() >= deadlineNanos) {
            throw new InterruptedException("deadline");
        }
    }
}
