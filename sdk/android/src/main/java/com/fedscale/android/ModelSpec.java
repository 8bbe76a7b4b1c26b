package com.fedscale.android;

import java.util.Collections;
import java.util.List;

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
}
