package com.fedscale.android.adapters;

import com.fedscale.android.Backend;
import com.fedscale.android.ModelSpec;
import com.fedscale.android.StepResult;
import com.fedscale.android.Tensor;
import com.fedscale.android.TestCounts;
import com.taobao.android.mnn.MNNNetInstance;
import java.io.File;
import java.io.FileOutputStream;
import java.io.IOException;
import java.util.Arrays;
import java.util.LinkedHashMap;
import java.util.Map;
import org.json.JSONArray;
import org.json.JSONObject;

/**
 * Runs the job's {@code train.mnn} and {@code test.mnn} with MNN's Android JNI wrapper
 * ({@code com.taobao.android.mnn.MNNNetInstance} from MNN's Android demo, built with {@code -DMNN_JNI=ON}):
 * one interpreter and one CPU session per program, inputs and outputs by name (docs/mobile.md).
 *
 * <p>MNN loads a model from a path, so each program file is written once to {@code cacheDir}, named by
 * its SHA-256. The wrapper's {@code setInputFloatData} writes straight into the tensor's host memory
 * without a bounds check, so every input's element count is checked against the session's tensor at
 * load and every array's length before each write. The session is a CPU session (the only kind whose
 * input tensors have host memory). Not thread-safe: one step at a time.
 */
public final class MNNBackend implements Backend {
    private final File cacheDir;
    private final int numThreads;
    private ArtifactManifest manifest;
    private Graph train;
    private Graph test;

    /** One program: its interpreter, CPU session and input/output tensors by name. */
    private static final class Graph {
        final ArtifactManifest.Program program;
        final MNNNetInstance net;
        final MNNNetInstance.Session session;
        final Map<String, MNNNetInstance.Session.Tensor> inputs = new LinkedHashMap<>();
        final Map<String, MNNNetInstance.Session.Tensor> outputs = new LinkedHashMap<>();

        Graph(ArtifactManifest.Program program, MNNNetInstance net, MNNNetInstance.Session session) {
            this.program = program;
            this.net = net;
            this.session = session;
        }

        void release() {
            // Releasing the net frees its sessions too.
            net.release();
        }
    }

    /**
     * @param cacheDir where the .mnn files are written (e.g. {@code new File(context.getCacheDir(), "fedscale-mnn")});
     *                 created if missing
     */
    public MNNBackend(File cacheDir) {
        this(cacheDir, 1);
    }

    public MNNBackend(File cacheDir, int numThreads) {
        if (cacheDir == null) {
            throw new IllegalArgumentException("cacheDir is null");
        }
        if (numThreads < 1) {
            throw new IllegalArgumentException("numThreads must be >= 1");
        }
        this.cacheDir = cacheDir;
        this.numThreads = numThreads;
    }

    @Override
    public String name() {
        return "mnn";
    }

    @Override
    public void load(ModelSpec model, JSONObject manifestJson, Map<String, byte[]> files) throws IOException {
        close();
        ArtifactManifest m = ArtifactManifest.parse(manifestJson, model, name());
        if (files == null) {
            throw new IllegalArgumentException("mnn: no artifact files given");
        }
        Map<String, String> hashes = fileHashes(manifestJson);
        try {
            train = open(m.train, files, hashes);
            test = open(m.test, files, hashes);
        } catch (IOException | RuntimeException e) {
            close();
            throw e;
        }
        manifest = m;
    }

    private static Map<String, String> fileHashes(JSONObject manifestJson) {
        Map<String, String> hashes = new LinkedHashMap<>();
        JSONArray list = manifestJson.optJSONArray("files");
        if (list != null) {
            for (int i = 0; i < list.length(); i++) {
                JSONObject f = list.optJSONObject(i);
                if (f != null) {
                    hashes.put(f.optString("name"), f.optString("sha256"));
                }
            }
        }
        return hashes;
    }

    private File write(String file, byte[] bytes, String sha256) throws IOException {
        if (!cacheDir.isDirectory() && !cacheDir.mkdirs() && !cacheDir.isDirectory()) {
            throw new IOException("mnn: cannot create " + cacheDir);
        }
        String safe = file.replaceAll("[^A-Za-z0-9._-]", "_");
        String tag = sha256 != null && sha256.matches("[0-9a-f]{64}") ? sha256.substring(0, 16) + "-" : "";
        File target = new File(cacheDir, tag + safe);
        if (target.isFile() && target.length() == bytes.length && !tag.isEmpty()) {
            return target; // same hash, already written (files are immutable)
        }
        File tmp = new File(cacheDir, target.getName() + ".tmp");
        try (FileOutputStream out = new FileOutputStream(tmp)) {
            out.write(bytes);
            out.getFD().sync();
        }
        if (!tmp.renameTo(target)) {
            tmp.delete();
            throw new IOException("mnn: cannot rename " + tmp + " to " + target);
        }
        return target;
    }

    private Graph open(ArtifactManifest.Program p, Map<String, byte[]> files, Map<String, String> hashes)
            throws IOException {
        byte[] bytes = files.get(p.file);
        if (bytes == null || bytes.length == 0) {
            throw new IllegalArgumentException("mnn: artifact file " + p.file + " is missing or empty");
        }
        File path = write(p.file, bytes, hashes.get(p.file));
        MNNNetInstance net = MNNNetInstance.createFromFile(path.getAbsolutePath());
        if (net == null) {
            throw new IllegalArgumentException("mnn: MNN cannot load " + p.file + " (" + path + ")");
        }
        MNNNetInstance.Session session;
        try {
            MNNNetInstance.Config config = new MNNNetInstance.Config();
            config.numThread = numThreads; // forwardType stays CPU: inputs are written to host memory
            // Keep every named output alive (not reused as scratch) so that it can be read after run().
            config.saveTensors = p.outputNames().toArray(new String[0]);
            session = net.createSession(config);
            if (session == null) {
                throw new IllegalArgumentException("mnn: cannot create a session for " + p.file);
            }
        } catch (RuntimeException e) {
            net.release();
            throw e;
        }
        Graph g = new Graph(p, net, session);
        try {
            bind(g);
        } catch (RuntimeException e) {
            g.release();
            throw e;
        }
        return g;
    }

    /** Look up every input and output by name and check sizes; reshape inputs whose size differs (dynamic dims). */
    private static void bind(Graph g) {
        ArtifactManifest.Program p = g.program;
        boolean reshaped = false;
        for (ArtifactManifest.Io io : p.inputs) {
            MNNNetInstance.Session.Tensor t = g.session.getInput(io.name);
            if (t == null) {
                throw new IllegalArgumentException(p.file + " has no input named '" + io.name + "'");
            }
            if (ArtifactManifest.elements(t.getDimensions()) != io.size()) {
                t.reshape(io.shape);
                reshaped = true;
            }
            g.inputs.put(io.name, t);
        }
        if (reshaped) {
            g.session.reshape();
        }
        for (ArtifactManifest.Io io : p.inputs) {
            int[] dims = g.inputs.get(io.name).getDimensions();
            if (ArtifactManifest.elements(dims) != io.size()
                    || (dims.length == io.shape.length && !Arrays.equals(dims, io.shape))) {
                throw new IllegalArgumentException(p.file + " input " + io.name + " has shape " + Arrays.toString(dims)
                        + ", the manifest says " + Arrays.toString(io.shape));
            }
        }
        // Outputs are fetched after any reshape: a reshape re-plans the session's tensors.
        for (ArtifactManifest.Io io : p.outputs) {
            MNNNetInstance.Session.Tensor t = g.session.getOutput(io.name);
            if (t == null) {
                throw new IllegalArgumentException(p.file + " has no output named '" + io.name + "'");
            }
            g.outputs.put(io.name, t);
        }
    }

    private ArtifactManifest loaded() {
        if (manifest == null) {
            throw new IllegalStateException("mnn: load() first");
        }
        return manifest;
    }

    @Override
    public int trainBatchSize() {
        return loaded().train.batchSize;
    }

    @Override
    public int testBatchSize() {
        return loaded().test.batchSize;
    }

    private static Map<String, float[]> run(Graph g, Map<String, Tensor> weights, float[] x, int[] y, float[] mask,
                                            float lr, float wd) {
        // Check every input before writing any: the JNI writes without a bounds check.
        Map<String, Object> values = new LinkedHashMap<>();
        for (ArtifactManifest.Io io : g.program.inputs) {
            values.put(io.name, io.isInt32() ? Inputs.ints(io, y) : Inputs.floats(io, weights, x, mask, lr, wd));
        }
        for (ArtifactManifest.Io io : g.program.inputs) {
            MNNNetInstance.Session.Tensor t = g.inputs.get(io.name);
            Object v = values.get(io.name);
            if (v instanceof int[]) {
                t.setInputIntData((int[]) v);
            } else {
                t.setInputFloatData((float[]) v);
            }
        }
        g.session.run();
        Map<String, float[]> out = new LinkedHashMap<>();
        for (ArtifactManifest.Io io : g.program.outputs) {
            float[] data = g.outputs.get(io.name).getFloatData();
            if (data == null || data.length != io.size()) {
                throw new IllegalStateException(g.program.file + " output " + io.name + ": "
                        + (data == null ? "no data" : data.length + " values") + ", expected " + io.size());
            }
            // The wrapper reuses one array per tensor across runs: copy.
            out.put(io.name, data.clone());
        }
        return out;
    }

    @Override
    public StepResult trainStep(Map<String, Tensor> weights, float[] x, int[] y, float[] mask, float lr, float wd) {
        ArtifactManifest m = loaded();
        Map<String, float[]> out = run(train, weights, x, y, mask, lr, wd);
        Map<String, Tensor> next = new LinkedHashMap<>();
        for (ArtifactManifest.Io io : m.train.outputs) {
            if (io.name.startsWith(ArtifactManifest.NEW_PREFIX)) {
                String name = io.name.substring(ArtifactManifest.NEW_PREFIX.length());
                next.put(name, new Tensor(name, io.shape, out.get(io.name)));
            }
        }
        return new StepResult(next, out.get(ArtifactManifest.LOSS)[0]);
    }

    @Override
    public TestCounts testBatch(Map<String, Tensor> weights, float[] x, int[] y, float[] mask) {
        loaded();
        Map<String, float[]> out = run(test, weights, x, y, mask, 0f, 0f);
        return new TestCounts(Inputs.realRows(mask), Math.round(out.get(ArtifactManifest.CORRECT_TOP1)[0]),
                Math.round(out.get(ArtifactManifest.CORRECT_TOP5)[0]), out.get(ArtifactManifest.LOSS_SUM)[0]);
    }

    @Override
    public void close() {
        if (train != null) {
            train.release();
        }
        if (test != null) {
            test.release();
        }
        train = null;
        test = null;
        manifest = null;
    }
}
