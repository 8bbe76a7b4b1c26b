package com.fedscale.android;

import java.util.Map;

/** Outcome of {@link Client#fineTune}: local test accuracy before and after training the global model locally. */
public final class FineTuneResult {
    public final int modelVersion;
    public final double accuracyBefore;
    public final double accuracyAfter;
    public final long samples;
    public final double loss;
    public final String backend;
    /** The personalised weights (never uploaded). */
    public final Map<String, Tensor> weights;

    FineTuneResult(int modelVersion, double accuracyBefore, double accuracyAfter, long samples, double loss,
                   String backend, Map<String, Tensor> weights) {
        this.modelVersion = modelVersion;
        this.accuracyBefore = accuracyBefore;
        this.accuracyAfter = accuracyAfter;
        this.samples = samples;
        this.loss = loss;
        this.backend = backend;
        this.weights = weights;
    }
}
