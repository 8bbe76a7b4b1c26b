package com.fedscale.android;

import java.util.Map;
import org.json.JSONObject;

/**
 * An engine that runs one model's train and test steps (docs/mobile.md, "Programs").
 *
 * <p>The {@link Client} owns the data plan (shuffled passes, padding a short batch with mask-0 rows) and
 * calls a backend one fixed-size batch at a time, exactly as the daemon's reference runtime does, so that
 * every backend of a job does the same work. Implementations: {@link PlainJavaBackend} (the dense zoo
 * models, no native library), and in {@code com.fedscale.android.adapters} {@code TFLiteBackend} and
 * {@code MNNBackend}, which run the artifact the daemon serves. Not thread-safe: one task at a time.
 */
public interface Backend extends AutoCloseable {
    /** The name announced at check-in: {@code "tflite"}, {@code "mnn"} or {@code "java"}. */
    String name();

    /**
     * Prepare for a job's model. {@code manifest} and {@code files} (file name to bytes, every file the
     * manifest lists, hashes already checked) are the artifact for this backend; both are null for a
     * backend that needs no artifact ({@code "java"}).
     */
    void load(ModelSpec model, JSONObject manifest, Map<String, byte[]> files) throws Exception;

    /** The fixed batch size of the train step (the job's {@code batch_size}). */
    int trainBatchSize();

    /** The fixed batch size of the test step (the job's {@code test_bsz}). */
    int testBatchSize();

    /**
     * One SGD step: {@code w <- w - lr * (grad + wd * w)} on the masked mean cross-entropy.
     *
     * @param weights frozen and trainable tensors by name
     * @param x {@code trainBatchSize * sampleSize} floats, row-major, NHWC for images
     * @param y {@code trainBatchSize} class indices
     * @param mask {@code trainBatchSize} values, 1 for a real row and 0 for padding
     */
    StepResult trainStep(Map<String, Tensor> weights, float[] x, int[] y, float[] mask, float lr, float wd)
            throws Exception;

    /** Test sums over the rows of one batch ({@code testBatchSize} rows) whose mask is 1. */
    TestCounts testBatch(Map<String, Tensor> weights, float[] x, int[] y, float[] mask) throws Exception;

    @Override
    void close();
}
