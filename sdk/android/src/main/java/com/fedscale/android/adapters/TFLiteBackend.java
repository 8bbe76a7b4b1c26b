package com.fedscale.android.adapters;

import com.fedscale.android.Backend;
import com.fedscale.android.ModelSpec;
import com.fedscale.android.StepResult;
import com.fedscale.android.Tensor;
import com.fedscale.android.TestCounts;
import java.nio.ByteBuffer;
import java.nio.ByteOrder;
import java.nio.FloatBuffer;
import java.nio.IntBuffer;
import java.util.Arrays;
import java.util.HashMap;
import java.util.LinkedHashMap;
import java.util.LinkedHashSet;
import java.util.Map;
import java.util.Set;
import org.json.JSONObject;
import org.tensorflow.lite.DataType;
import org.tensorflow.lite.Interpreter;

/**
 * Runs the job's {@code .tflite} artifact with LiteRT's {@link Interpreter} (dependency
 * {@code com.google.ai.edge.litert:litert}): one flatbuffer with signatures {@code train} and {@code test},
 * every input and output addressed by its signature name (docs/mobile.md, "Programs").
 *
 * <p>At load the manifest is checked against the job's model and each signature of the file against the
 * manifest (names, input shapes and dtypes); a mismatch throws {@link IllegalArgumentException} naming it.
 * Inputs are fed as {@link FloatBuffer}/{@link IntBuffer} views of the caller's arrays (LiteRT copies them
 * into the interpreter); outputs are read into fresh arrays. Not thread-safe: one step at a time.
 */
public final class TFLiteBackend implements Backend {
    private final int numThreads;
    private final Map<String, Interpreter> byFile = new HashMap<>();
    private ArtifactManifest manifest;
    private Interpreter trainInterpreter;
    private Interpreter testInterpreter;

    /** One CPU thread (the artifacts are small; more threads mostly cost heat). */
    public TFLiteBackend() {
        this(1);
    }

    public TFLiteBackend(int numThreads) {
        if (numThreads < 1) {
            throw new IllegalArgumentException("numThreads must be >= 1");
        }
        this.numThreads = numThreads;
    }

    @Override
    public String name() {
        return "tflite";
    }

    @Override
    public void load(ModelSpec model, JSONObject manifestJson, Map<String, byte[]> files) {
        close();
        ArtifactManifest m = ArtifactManifest.parse(manifestJson, model, name());
        if (files == null) {
            throw new IllegalArgumentException("tflite: no artifact files given");
        }
        try {
            for (ArtifactManifest.Program p : new ArtifactManifest.Program[] {m.train, m.test}) {
                if (p.signature == null) {
                    throw new IllegalArgumentException("tflite manifest: program " + p.name + " names no signature");
                }
                Interpreter interpreter = byFile.get(p.file);
                if (interpreter == null) {
                    interpreter = open(p.file, files.get(p.file));
                    byFile.put(p.file, interpreter);
                }
                checkSignature(interpreter, p);
            }
        } catch (RuntimeException e) {
            close();
            throw e;
        }
        manifest = m;
        trainInterpreter = byFile.get(m.train.file);
        testInterpreter = byFile.get(m.test.file);
    }

    private Interpreter open(String file, byte[] bytes) {
        if (bytes == null || bytes.length == 0) {
            throw new IllegalArgumentException("tflite: artifact file " + file + " is missing or empty");
        }
        // LiteRT takes a direct, native-order buffer and reads it for the interpreter's whole life.
        ByteBuffer model = ByteBuffer.allocateDirect(bytes.length).order(ByteOrder.nativeOrder());
        model.put(bytes);
        model.rewind();
        Interpreter.Options options = new Interpreter.Options();
        options.setNumThreads(numThreads);
        try {
            return new Interpreter(model, options);
        } catch (IllegalArgumentException e) {
            throw new IllegalArgumentException("tflite: LiteRT cannot load " + file + ": " + e.getMessage(), e);
        }
    }

    private static void checkSignature(Interpreter interpreter, ArtifactManifest.Program p) {
        String key = p.signature;
        String[] keys = interpreter.getSignatureKeys();
        if (!Arrays.asList(keys).contains(key)) {
            throw new IllegalArgumentException(p.file + " has no signature '" + key + "' (it has "
                    + Arrays.toString(keys) + ")");
        }
        ArtifactManifest.sameNames(p.file + " signature " + key + " inputs", p.inputNames(),
                new LinkedHashSet<>(Arrays.asList(interpreter.getSignatureInputs(key))));
        ArtifactManifest.sameNames(p.file + " signature " + key + " outputs", p.outputNames(),
                new LinkedHashSet<>(Arrays.asList(interpreter.getSignatureOutputs(key))));
        for (ArtifactManifest.Io io : p.inputs) {
            org.tensorflow.lite.Tensor t = interpreter.getInputTensorFromSignature(io.name, key);
            DataType want = io.isInt32() ? DataType.INT32 : DataType.FLOAT32;
            if (t.dataType() != want || !Arrays.equals(t.shape(), io.shape)) {
                throw new IllegalArgumentException(p.file + " signature " + key + " input " + io.name + " is "
                        + t.dataType() + Arrays.toString(t.shape()) + ", the manifest says " + io.dtype
                        + Arrays.toString(io.shape));
            }
        }
        for (ArtifactManifest.Io io : p.outputs) {
            // Output shapes may be unset before the first run; their sizes are checked when read.
            org.tensorflow.lite.Tensor t = interpreter.getOutputTensorFromSignature(io.name, key);
            if (t.dataType() != DataType.FLOAT32) {
                throw new IllegalArgumentException(p.file + " signature " + key + " output " + io.name + " is "
                        + t.dataType() + ", expected FLOAT32");
            }
        }
    }

    private ArtifactManifest loaded() {
        if (manifest == null) {
            throw new IllegalStateException("tflite: load() first");
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

    private static Map<String, Object> feed(ArtifactManifest.Program p, Map<String, Tensor> weights, float[] x,
                                            int[] y, float[] mask, float lr, float wd) {
        Map<String, Object> inputs = new HashMap<>();
        for (ArtifactManifest.Io io : p.inputs) {
            inputs.put(io.name, io.isInt32() ? IntBuffer.wrap(Inputs.ints(io, y))
                    : FloatBuffer.wrap(Inputs.floats(io, weights, x, mask, lr, wd)));
        }
        return inputs;
    }

    private static Map<String, float[]> run(Interpreter interpreter, ArtifactManifest.Program p,
                                            Map<String, Object> inputs) {
        Map<String, float[]> values = new LinkedHashMap<>();
        Map<String, Object> outputs = new HashMap<>();
        for (ArtifactManifest.Io io : p.outputs) {
            float[] value = new float[io.size()];
            values.put(io.name, value);
            outputs.put(io.name, FloatBuffer.wrap(value));
        }
        interpreter.runSignature(inputs, outputs, p.signature);
        return values;
    }

    @Override
    public StepResult trainStep(Map<String, Tensor> weights, float[] x, int[] y, float[] mask, float lr, float wd) {
        ArtifactManifest m = loaded();
        Map<String, float[]> out = run(trainInterpreter, m.train, feed(m.train, weights, x, y, mask, lr, wd));
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
        ArtifactManifest m = loaded();
        Map<String, float[]> out = run(testInterpreter, m.test, feed(m.test, weights, x, y, mask, 0f, 0f));
        return new TestCounts(Inputs.realRows(mask), Math.round(out.get(ArtifactManifest.CORRECT_TOP1)[0]),
                Math.round(out.get(ArtifactManifest.CORRECT_TOP5)[0]), out.get(ArtifactManifest.LOSS_SUM)[0]);
    }

    @Override
    public void close() {
        Set<Interpreter> distinct = new LinkedHashSet<>(byFile.values());
        byFile.clear();
        for (Interpreter interpreter : distinct) {
            interpreter.close();
        }
        manifest = null;
        trainInterpreter = null;
        testInterpreter = null;
    }
}
