package com.fedscale.android;

import java.util.ArrayList;
import java.util.Collections;
import java.util.List;
import org.json.JSONArray;
import org.json.JSONException;
import org.json.JSONObject;

/** A job's model as {@code GET /v1/jobs/{job}/model} describes it (docs/protocol.md). */
public final class ModelSpec {
    /** One tensor of the model: name and shape (dtype is always float32). */
    public static final class TensorInfo {
        public final String name;
        public final int[] shape;

        public TensorInfo(String name, int[] shape) {
            this.name = name;
            this.shape = shape.clone();
        }
    }

    public final String model;
    public final int[] inputShape;
    public final int numClasses;
    public final double widthMultiplier;
    /** Trainable tensors, in the model's order: what model files and uploads hold. */
    public final List<TensorInfo> tensors;
    /** Tensors the device needs but never uploads (fine-tuning models); empty otherwise. */
    public final List<TensorInfo> frozenTensors;

    public ModelSpec(String model, int[] inputShape, int numClasses, double widthMultiplier,
                     List<TensorInfo> tensors, List<TensorInfo> frozenTensors) {
        this.model = model;
        this.inputShape = inputShape.clone();
        this.numClasses = numClasses;
        this.widthMultiplier = widthMultiplier;
        this.tensors = Collections.unmodifiableList(tensors);
        this.frozenTensors = Collections.unmodifiableList(frozenTensors);
    }

    /** Number of float values in one input sample (the product of {@link #inputShape}). */
    public int sampleSize() {
        int n = 1;
        for (int d : inputShape) {
            n *= d;
        }
        return n;
    }

    /**
     * The model description of {@code GET /v1/jobs/{job}/model} ({@code model}, {@code input_shape},
     * {@code num_classes}, {@code width_multiplier}, {@code tensors}, {@code frozen_tensors}).
     *
     * @throws IllegalArgumentException when a field is missing or malformed
     */
    public static ModelSpec fromJson(JSONObject info) {
        try {
            JSONArray shape = info.getJSONArray("input_shape");
            int[] input = new int[shape.length()];
            for (int i = 0; i < input.length; i++) {
                input[i] = shape.getInt(i);
            }
            return new ModelSpec(info.getString("model"), input, info.getInt("num_classes"),
                    info.optDouble("width_multiplier", 1.0), tensorList(info.getJSONArray("tensors")),
                    tensorList(info.optJSONArray("frozen_tensors")));
        } catch (JSONException e) {
            throw new IllegalArgumentException("malformed model description: " + e.getMessage(), e);
        }
    }

    private static List<TensorInfo> tensorList(JSONArray arr) throws JSONException {
        List<TensorInfo> out = new ArrayList<>();
        if (arr == null) {
            return out;
        }
        for (int i = 0; i < arr.length(); i++) {
            JSONObject t = arr.getJSONObject(i);
            String dtype = t.optString("dtype", "F32");
            if (!"F32".equals(dtype)) {
                throw new JSONException("tensor " + t.optString("name") + " has dtype " + dtype + ", not F32");
            }
            JSONArray s = t.getJSONArray("shape");
            int[] shape = new int[s.length()];
            for (int j = 0; j < shape.length; j++) {
                shape[j] = s.getInt(j);
            }
            out.add(new TensorInfo(t.getString("name"), shape));
        }
        return out;
    }

    /** Names of the trainable tensors, in the model's order. */
    public List<String> tensorNames() {
        List<String> names = new ArrayList<>();
        for (TensorInfo t : tensors) {
            names.add(t.name);
        }
        return names;
    }
}
