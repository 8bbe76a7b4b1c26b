package com.fedscale.android;

import java.util.Map;

/** What one training step returns: the new trainable weights (by plain tensor name) and the batch loss. */
public final class StepResult {
    private final Map<String, Tensor> weights;
    private final float loss;

    public StepResult(Map<String, Tensor> weights, float loss) {
        this.weights = weights;
        this.loss = loss;
    }

    /** New trainable weights, keyed by their plain names ({@code dense_0/kernel}, not {@code new:...}). */
    public Map<String, Tensor> weights() {
        return weights;
    }

    /** Mean softmax cross-entropy over the batch's rows whose mask is 1. */
    public float loss() {
        return loss;
    }
}
