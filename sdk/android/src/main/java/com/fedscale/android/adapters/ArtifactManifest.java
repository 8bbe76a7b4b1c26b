package com.fedscale.android.adapters;

import com.fedscale.android.ModelSpec;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.Collections;
import java.util.LinkedHashSet;
import java.util.List;
import java.util.Set;
import org.json.JSONArray;
import org.json.JSONException;
import org.json.JSONObject;

/**
 * The parts of an artifact manifest ({@code fedscaled-artifact/1}, docs/mobile.md) the adapters use, read
 * and checked against the job's {@link ModelSpec}: a manifest that disagrees with the model fails here, at
 * load, with a message naming the difference, not later inside a native engine.
 */
final class ArtifactManifest {
    static final String TRAIN = "train";
    static final String TEST = "test";
    static final String NEW_PREFIX = "new:";
    static final String LOSS = "loss";
    static final String LOSS_SUM = "loss_sum";
    static final String CORRECT_TOP1 = "correct_top1";
    static final String CORRECT_TOP5 = "correct_top5";

    /** One named input or output of a program. */
    static final class Io {
        final String name;
        final int[] shape;
        final String dtype;

        Io(String name, int[] shape, String dtype) {
            this.name = name;
            this.shape = shape;
            this.dtype = dtype;
        }

        int size() {
            return elements(shape);
        }

        boolean isInt32() {
            return "int32".equals(dtype);
        }
    }

    /** One program (train, test, infer): its file, signature (tflite only), batch size, inputs and outputs in order. */
    static final class Program {
        final String name;
        final String file;
        final String signature;
        final int batchSize;
        final List<Io> inputs;
        final List<Io> outputs;

        Program(String name, String file, String signature, int batchSize, List<Io> inputs, List<Io> outputs) {
            this.name = name;
            this.file = file;
            this.signature = signature;
            this.batchSize = batchSize;
            this.inputs = Collections.unmodifiableList(inputs);
            this.outputs = Collections.unmodifiableList(outputs);
        }

        Set<String> inputNames() {
            Set<String> names = new LinkedHashSet<>();
            for (Io io : inputs) {
                names.add(io.name);
            }
            return names;
        }

        Set<String> outputNames() {
            Set<String> names = new LinkedHashSet<>();
            for (Io io : outputs) {
                names.add(io.name);
            }
            return names;
        }
    }

    final String backend;
    final Program train;
    final Program test;
    /** Trainable tensor names, in the model's order. */
    final List<String> trainable;
    /** Frozen tensor names (fine-tuning models), in the model's order; empty otherwise. */
    final List<String> frozen;

    private ArtifactManifest(String backend, Program train, Program test, List<String> trainable, List<String> frozen) {
        this.backend = backend;
        this.train = train;
        this.test = test;
        this.trainable = Collections.unmodifiableList(trainable);
        this.frozen = Collections.unmodifiableList(frozen);
    }

    /**
     * Parse {@code manifest} and check it against {@code model}: the backend name, the tensor names and
     * shapes, the x shape ({@code (batch, *input_shape)}), and each program's input and output names.
     */
    static ArtifactManifest parse(JSONObject manifest, ModelSpec model, String expectedBackend) {
        if (manifest == null) {
            throw new IllegalArgumentException(expectedBackend + ": no artifact manifest (the task named no artifact)");
        }
        try {
            String backend = manifest.getString("backend");
            if (!expectedBackend.equals(backend)) {
                throw new IllegalArgumentException("manifest is for backend '" + backend + "', not '" + expectedBackend + "'");
            }
            List<String> trainable = checkTensors("tensors", manifest.getJSONArray("tensors"), model.tensors);
            JSONArray frozenJson = manifest.has("frozen_tensors") && !manifest.isNull("frozen_tensors")
                    ? manifest.getJSONArray("frozen_tensors") : new JSONArray();
            List<String> frozen = checkTensors("frozen_tensors", frozenJson, model.frozenTensors);
            JSONObject programs = manifest.getJSONObject("programs");
            Program train = program(programs, TRAIN);
            Program test = program(programs, TEST);

            Set<String> weights = new LinkedHashSet<>(frozen);
            weights.addAll(trainable);
            Set<String> trainIn = new LinkedHashSet<>(weights);
            trainIn.addAll(Arrays.asList("x", "y", "mask", "lr", "wd"));
            Set<String> trainOut = new LinkedHashSet<>();
            for (String t : trainable) {
                trainOut.add(NEW_PREFIX + t);
            }
            trainOut.add(LOSS);
            Set<String> testIn = new LinkedHashSet<>(weights);
            testIn.addAll(Arrays.asList("x", "y", "mask"));
            Set<String> testOut = new LinkedHashSet<>(Arrays.asList(LOSS_SUM, CORRECT_TOP1, CORRECT_TOP5));
            sameNames("program train inputs", trainIn, train.inputNames());
            sameNames("program train outputs", trainOut, train.outputNames());
            sameNames("program test inputs", testIn, test.inputNames());
            sameNames("program test outputs", testOut, test.outputNames());
            for (Program p : new Program[] {train, test}) {
                checkBatchInputs(p, model);
            }
            for (Io io : train.outputs) {
                int[] want = io.name.equals(LOSS) ? new int[0]
                        : shapeOf(io.name.substring(NEW_PREFIX.length()), model.tensors);
                if (!Arrays.equals(want, io.shape) || io.isInt32()) {
                    throw new IllegalArgumentException("program train: output " + io.name + " is " + io.dtype
                            + Arrays.toString(io.shape) + ", expected float32" + Arrays.toString(want));
                }
            }
            for (Io io : test.outputs) {
                if (io.size() != 1 || io.isInt32()) {
                    throw new IllegalArgumentException("program test: output " + io.name + " is " + io.dtype
                            + Arrays.toString(io.shape) + ", expected a float32 scalar");
                }
            }
            return new ArtifactManifest(backend, train, test, trainable, frozen);
        } catch (JSONException e) {
            throw new IllegalArgumentException(expectedBackend + " manifest is malformed: " + e.getMessage(), e);
        }
    }

    private static Program program(JSONObject programs, String name) throws JSONException {
        if (!programs.has(name)) {
            throw new IllegalArgumentException("manifest has no '" + name + "' program");
        }
        JSONObject p = programs.getJSONObject(name);
        String signature = p.has("signature") && !p.isNull("signature") ? p.getString("signature") : null;
        int batch = p.getInt("batch_size");
        if (batch < 1) {
            throw new IllegalArgumentException("program " + name + ": batch_size " + batch);
        }
        return new Program(name, p.getString("file"), signature, batch, ios(p.getJSONArray("inputs")),
                ios(p.getJSONArray("outputs")));
    }

    private static List<Io> ios(JSONArray array) throws JSONException {
        List<Io> result = new ArrayList<>();
        for (int i = 0; i < array.length(); i++) {
            JSONObject o = array.getJSONObject(i);
            String dtype = o.has("dtype") && !o.isNull("dtype") ? o.getString("dtype") : "float32";
            if (!"float32".equals(dtype) && !"int32".equals(dtype)) {
                throw new IllegalArgumentException(o.getString("name") + ": unsupported dtype " + dtype);
            }
            result.add(new Io(o.getString("name"), shape(o.getJSONArray("shape")), dtype));
        }
        return result;
    }

    private static int[] shape(JSONArray array) throws JSONException {
        int[] shape = new int[array.length()];
        for (int i = 0; i < shape.length; i++) {
            shape[i] = array.getInt(i);
        }
        return shape;
    }

    private static List<String> checkTensors(String key, JSONArray json, List<ModelSpec.TensorInfo> expected)
            throws JSONException {
        List<String> names = new ArrayList<>();
        if (json.length() != expected.size()) {
            throw new IllegalArgumentException("manifest " + key + " lists " + json.length() + " tensors, the model has "
                    + expected.size());
        }
        for (int i = 0; i < json.length(); i++) {
            JSONObject t = json.getJSONObject(i);
            String name = t.getString("name");
            int[] shape = shape(t.getJSONArray("shape"));
            ModelSpec.TensorInfo want = expected.get(i);
            if (!want.name.equals(name) || !Arrays.equals(want.shape, shape)) {
                throw new IllegalArgumentException("manifest " + key + "[" + i + "] is " + name + Arrays.toString(shape)
                        + ", the model's is " + want.name + Arrays.toString(want.shape));
            }
            names.add(name);
        }
        return names;
    }

    private static void checkBatchInputs(Program p, ModelSpec model) {
        for (Io io : p.inputs) {
            int[] want;
            switch (io.name) {
                case "x":
                    want = new int[model.inputShape.length + 1];
                    want[0] = p.batchSize;
                    System.arraycopy(model.inputShape, 0, want, 1, model.inputShape.length);
                    break;
                case "y":
                case "mask":
                    want = new int[] {p.batchSize};
                    break;
                case "lr":
                case "wd":
                    want = new int[0];
                    break;
                default:
                    continue;
            }
            if (!Arrays.equals(want, io.shape)) {
                throw new IllegalArgumentException("program " + p.name + ": input " + io.name + " has shape "
                        + Arrays.toString(io.shape) + ", expected " + Arrays.toString(want));
            }
            boolean wantInt = io.name.equals("y");
            if (io.isInt32() != wantInt) {
                throw new IllegalArgumentException("program " + p.name + ": input " + io.name + " has dtype " + io.dtype);
            }
        }
    }

    private static int[] shapeOf(String name, List<ModelSpec.TensorInfo> tensors) {
        for (ModelSpec.TensorInfo t : tensors) {
            if (t.name.equals(name)) {
                return t.shape;
            }
        }
        throw new IllegalArgumentException("no tensor " + name);
    }

    /** Throws naming what is missing and what is unexpected when two name sets differ. */
    static void sameNames(String what, Set<String> expected, Set<String> actual) {
        if (expected.equals(actual)) {
            return;
        }
        Set<String> missing = new LinkedHashSet<>(expected);
        missing.removeAll(actual);
        Set<String> extra = new LinkedHashSet<>(actual);
        extra.removeAll(expected);
        throw new IllegalArgumentException(what + ": missing " + missing + ", unexpected " + extra);
    }

    static int elements(int[] shape) {
        int n = 1;
        for (int d : shape) {
            n *= d;
        }
        return n;
    }
}
