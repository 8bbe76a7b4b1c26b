package com.fedscale.android;

import java.io.File;
import java.io.IOException;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.Collections;
import java.util.HashSet;
import java.util.Iterator;
import java.util.List;
import java.util.Locale;
import java.util.Set;
import org.json.JSONArray;
import org.json.JSONException;
import org.json.JSONObject;

/**
 * The SDK's configuration: FedScale's Android {@code conf.json} (shared/fedscale/android-conf.json)
 * extended with what a fedscaled device needs.
 *
 * <pre>
 * {
 *   "server": "http://127.0.0.1:29500",     // the daemon; else FedScale's "aggregator": {"ip", "port"}
 *   "job": "digits-mlp",                     // required
 *   "enrollment_token": "…",                 // required (fedscalectl status JOB --json)
 *   "backends": ["tflite", "mnn", "java"],   // preference order (default)
 *   "policy": {"require_charging": true, "require_idle": false, "require_unmetered": true,
 *              "min_battery": 20, "max_thermal": "moderate", "min_free_storage_mb": 100},
 *   "client": {"max_iterations": 100000, "run_seconds": 0, "max_attempts": 12, "backoff_base_s": 1,
 *              "backoff_cap_s": 60, "checkin_timeout_s": 75, "request_timeout_s": 120,
 *              "connect_timeout_s": 15, "policy_wait_s": 60, "seed": 0},
 *   "training_conf": {"epoch", "batch_size", "learning_rate", "weight_decay", "momentum", "fine_tune",
 *                     "num_classes", "channel", "width", "height", "num_workers", "loss_decay"},
 *   "testing_conf": {"test_bsz", "num_classes", "channel", "width", "height", "num_workers"},
 *   "username", "executor_info", "model_conf", "training_data", "testing_data": FedScale's, accepted
 * }
 * </pre>
 *
 * <p>In a federated task the daemon's task {@code config} decides the learning rate, steps and batch
 * sizes; {@code training_conf} gives the defaults of {@link Client#fineTune} and, when the shape keys are
 * present, a check that the job's model fits the app's data. {@code momentum} is accepted but not applied
 * (docs/mobile.md). Unknown keys and missing required keys are an {@link IllegalArgumentException} that
 * names the key.
 */
public final class ClientConfig {
    /** The default backend preference: artifacts first, then the plain-Java trainer. */
    public static final List<String> DEFAULT_BACKENDS = Collections.unmodifiableList(Arrays.asList("tflite", "mnn", "java"));

    private static final Set<String> TOP_KEYS = set("server", "job", "enrollment_token", "backends", "policy", "client",
            "device_info", "training_conf", "testing_conf", "username", "aggregator", "executor_info", "model_conf",
            "training_data", "testing_data");
    private static final Set<String> TRAINING_KEYS = set("epoch", "batch_size", "learning_rate", "weight_decay",
            "momentum", "fine_tune", "num_classes", "channel", "width", "height", "num_workers", "loss_decay");
    private static final Set<String> TESTING_KEYS = set("test_bsz", "num_classes", "channel", "width", "height",
            "num_workers");
    private static final Set<String> POLICY_KEYS = set("require_charging", "require_idle", "require_unmetered",
            "min_battery", "max_thermal", "min_free_storage_mb");
    private static final Set<String> CLIENT_KEYS = set("max_iterations", "run_seconds", "max_attempts",
            "backoff_base_s", "backoff_cap_s", "checkin_timeout_s", "request_timeout_s", "connect_timeout_s",
            "policy_wait_s", "seed");

    /** The daemon's base URL, without a trailing slash. */
    public final String server;
    public final String job;
    public final String enrollmentToken;
    /** Backend names, most preferred first. */
    public final List<String> backends;
    public final SchedulingPolicy.Overrides policy;
    /** Free-form strings sent at enrollment (model, OS version). */
    public final JSONObject deviceInfo;

    // training_conf
    public final int epochs;
    public final int batchSize;
    public final double learningRate;
    public final double weightDecay;
    public final double momentum;
    public final boolean fineTune;
    /** 0 when not given. */
    public final int numClasses;
    /** {@code [height, width, channel]}, or null when not given. */
    public final int[] inputShape;
    // testing_conf
    public final int testBsz;

    // client
    public final int maxIterations;
    /** Longest a {@link Client#run()} lasts, seconds; 0: unbounded. */
    public final double runSeconds;
    public final int maxAttempts;
    public final double backoffBaseSeconds;
    public final double backoffCapSeconds;
    /** Read timeout of a check-in: longer than the job's long-poll ({@code checkin_wait}, ≤ 60 s) plus margin. */
    public final double checkinTimeoutSeconds;
    public final double requestTimeoutSeconds;
    public final double connectTimeoutSeconds;
    /** Longest wait before the next check-in while the local policy forbids training. */
    public final double policyWaitSeconds;
    public final long seed;

    private ClientConfig(JSONObject root) throws JSONException {
        requireKnown("conf.json", root, TOP_KEYS);
        String url = optString(root, "server");
        if (url == null) {
            JSONObject agg = root.optJSONObject("aggregator");
            if (agg == null || !agg.has("ip")) {
                throw new IllegalArgumentException("conf.json needs \"server\" (the daemon's URL) or aggregator.ip");
            }
            url = "http://" + agg.getString("ip") + ":" + intIn(agg, "aggregator", "port", 29500, 1, 65535);
        }
        if (!url.startsWith("http://") && !url.startsWith("https://")) {
            throw new IllegalArgumentException("server must be an http:// or https:// URL, got " + url);
        }
        this.server = url.endsWith("/") ? url.substring(0, url.length() - 1) : url;
        this.job = requiredString(root, "job");
        this.enrollmentToken = requiredString(root, "enrollment_token");
        List<String> b = new ArrayList<>();
        if (root.has("backends")) {
            JSONArray arr = root.optJSONArray("backends");
            if (arr == null || arr.length() == 0) {
                throw new IllegalArgumentException("backends must be a non-empty list of names");
            }
            for (int i = 0; i < arr.length(); i++) {
                Object v = arr.get(i);
                if (!(v instanceof String) || ((String) v).isEmpty()) {
                    throw new IllegalArgumentException("backends must be a list of names, got " + arr);
                }
                b.add((String) v);
            }
        } else {
            b.addAll(DEFAULT_BACKENDS);
        }
        this.backends = Collections.unmodifiableList(b);
        this.deviceInfo = root.has("device_info") ? object(root, "device_info") : new JSONObject();

        JSONObject p = root.has("policy") ? object(root, "policy") : new JSONObject();
        requireKnown("policy", p, POLICY_KEYS);
        this.policy = new SchedulingPolicy.Overrides(optBool(p, "policy", "require_charging"),
                optBool(p, "policy", "require_idle"), optBool(p, "policy", "require_unmetered"),
                p.has("min_battery") ? intIn(p, "policy", "min_battery", 0, 0, 100) : null,
                p.has("max_thermal") ? thermal(p.get("max_thermal")) : null,
                p.has("min_free_storage_mb") ? (long) intIn(p, "policy", "min_free_storage_mb", 0, 0,
                        Integer.MAX_VALUE) : null);

        JSONObject t = root.has("training_conf") ? object(root, "training_conf") : new JSONObject();
        requireKnown("training_conf", t, TRAINING_KEYS);
        this.epochs = intIn(t, "training_conf", "epoch", 1, 0, 1_000_000);
        this.batchSize = intIn(t, "training_conf", "batch_size", 32, 1, 1_000_000);
        this.learningRate = number(t, "training_conf", "learning_rate", 0.01, 0.0, false);
        this.weightDecay = number(t, "training_conf", "weight_decay", 0.0, 0.0, true);
        this.momentum = number(t, "training_conf", "momentum", 0.0, 0.0, true);
        this.fineTune = Boolean.TRUE.equals(optBool(t, "training_conf", "fine_tune"));
        this.numClasses = t.has("num_classes") ? intIn(t, "training_conf", "num_classes", 0, 2, 100_000) : 0;
        if (t.has("channel") || t.has("width") || t.has("height")) {
            this.inputShape = new int[] {intIn(t, "training_conf", "height", 0, 1, 4096),
                    intIn(t, "training_conf", "width", 0, 1, 4096), intIn(t, "training_conf", "channel", 0, 1, 4096)};
        } else {
            this.inputShape = null;
        }
        JSONObject te = root.has("testing_conf") ? object(root, "testing_conf") : new JSONObject();
        requireKnown("testing_conf", te, TESTING_KEYS);
        this.testBsz = intIn(te, "testing_conf", "test_bsz", 32, 1, 1_000_000);

        JSONObject c = root.has("client") ? object(root, "client") : new JSONObject();
        requireKnown("client", c, CLIENT_KEYS);
        this.maxIterations = intIn(c, "client", "max_iterations", 100_000, 1, Integer.MAX_VALUE);
        this.runSeconds = number(c, "client", "run_seconds", 0.0, 0.0, true);
        this.maxAttempts = intIn(c, "client", "max_attempts", 12, 1, 1000);
        this.backoffBaseSeconds = number(c, "client", "backoff_base_s", 1.0, 0.0, true);
        this.backoffCapSeconds = number(c, "client", "backoff_cap_s", 60.0, 0.0, true);
        this.checkinTimeoutSeconds = number(c, "client", "checkin_timeout_s", 75.0, 0.0, false);
        this.requestTimeoutSeconds = number(c, "client", "request_timeout_s", 120.0, 0.0, false);
        this.connectTimeoutSeconds = number(c, "client", "connect_timeout_s", 15.0, 0.0, false);
        this.policyWaitSeconds = number(c, "client", "policy_wait_s", 60.0, 0.0, true);
        this.seed = c.has("seed") ? c.getLong("seed") : 0L;
    }

    /** Parse a conf.json text. */
    public static ClientConfig parse(String json) {
        try {
            return fromJson(new JSONObject(json));
        } catch (JSONException e) {
            throw new IllegalArgumentException("conf.json is not a JSON object: " + e.getMessage(), e);
        }
    }

    /** Read a conf.json file. */
    public static ClientConfig load(File file) throws IOException {
        return parse(new String(Files.readAllBytes(file.toPath()), StandardCharsets.UTF_8));
    }

    /** From a parsed conf.json object. */
    public static ClientConfig fromJson(JSONObject root) {
        try {
            return new ClientConfig(root);
        } catch (JSONException e) {
            throw new IllegalArgumentException("conf.json: " + e.getMessage(), e);
        }
    }

    /** The local scheduling policy: the job defaults with this config's overrides. */
    public SchedulingPolicy schedulingPolicy() {
        return SchedulingPolicy.withOverrides(policy);
    }

    // ------------------------------------------------------------------ parsing helpers

    private static Set<String> set(String... keys) {
        return new HashSet<>(Arrays.asList(keys));
    }

    private static void requireKnown(String where, JSONObject o, Set<String> known) {
        Iterator<String> it = o.keys();
        while (it.hasNext()) {
            String k = it.next();
            if (!known.contains(k)) {
                List<String> sorted = new ArrayList<>(known);
                Collections.sort(sorted);
                throw new IllegalArgumentException("unknown key \"" + k + "\" in " + where + "; known keys: " + sorted);
            }
        }
    }

    private static JSONObject object(JSONObject o, String key) {
        JSONObject v = o.optJSONObject(key);
        if (v == null) {
            throw new IllegalArgumentException("\"" + key + "\" must be an object");
        }
        return v;
    }

    private static String optString(JSONObject o, String key) {
        if (!o.has(key)) {
            return null;
        }
        Object v = o.opt(key);
        if (!(v instanceof String) || ((String) v).isEmpty()) {
            throw new IllegalArgumentException("\"" + key + "\" must be a non-empty string, got " + v);
        }
        return (String) v;
    }

    private static String requiredString(JSONObject o, String key) {
        String v = optString(o, key);
        if (v == null) {
            throw new IllegalArgumentException("conf.json lacks the required key \"" + key + "\"");
        }
        return v;
    }

    private static Boolean optBool(JSONObject o, String where, String key) {
        if (!o.has(key)) {
            return null;
        }
        Object v = o.opt(key);
        if (!(v instanceof Boolean)) {
            throw new IllegalArgumentException(where + "." + key + " must be true or false, got " + v);
        }
        return (Boolean) v;
    }

    private static int intIn(JSONObject o, String where, String key, int dflt, long lo, long hi) {
        if (!o.has(key)) {
            if (dflt < lo || dflt > hi) {
                throw new IllegalArgumentException(where + " lacks the required key \"" + key + "\"");
            }
            return dflt;
        }
        Object v = o.opt(key);
        if (!(v instanceof Number) || ((Number) v).doubleValue() != Math.rint(((Number) v).doubleValue())) {
            throw new IllegalArgumentException(where + "." + key + " must be an integer, got " + v);
        }
        long n = ((Number) v).longValue();
        if (n < lo || n > hi) {
            throw new IllegalArgumentException(where + "." + key + " must be in [" + lo + ", " + hi + "], got " + n);
        }
        return (int) n;
    }

    private static double number(JSONObject o, String where, String key, double dflt, double lo, boolean loInclusive) {
        if (!o.has(key)) {
            return dflt;
        }
        Object v = o.opt(key);
        if (!(v instanceof Number)) {
            throw new IllegalArgumentException(where + "." + key + " must be a number, got " + v);
        }
        double d = ((Number) v).doubleValue();
        if (Double.isNaN(d) || Double.isInfinite(d) || d < lo || (!loInclusive && d == lo)) {
            throw new IllegalArgumentException(where + "." + key + " must be " + (loInclusive ? ">= " : "> ") + lo
                    + ", got " + v);
        }
        return d;
    }

    private static DeviceState.Thermal thermal(Object v) {
        if (v instanceof String) {
            try {
                return DeviceState.Thermal.valueOf(((String) v).toUpperCase(Locale.ROOT));
            } catch (IllegalArgumentException e) {
                // fall through
            }
        }
        throw new IllegalArgumentException("policy.max_thermal must be one of "
                + Arrays.toString(DeviceState.Thermal.values()).toLowerCase(Locale.ROOT) + ", got " + v);
    }
}
