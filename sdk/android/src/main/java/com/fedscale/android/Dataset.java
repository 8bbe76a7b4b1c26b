package com.fedscale.android;

/**
 * Local samples: a fixed number of rows, each {@link #sampleSize()} float features (row-major, NHWC for
 * images, matching the job's {@code input_shape}) and an int class label. Never leaves the phone.
 * {@link InMemoryDataset} is the simple implementation; an app may back this with its own storage.
 */
public interface Dataset {
    /** Number of samples. */
    int size();

    /** Floats per sample (the product of the model's input shape). */
    int sampleSize();

    /** Copy sample {@code index}'s features into {@code dst} starting at {@code offset}. */
    void copyFeatures(int index, float[] dst, int offset);

    /** The class label of sample {@code index}. */
    int label(int index);
}
