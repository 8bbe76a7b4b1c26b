package com.fedscale.android;

/** Test sums over the real (mask 1) rows of one or more batches: what a test result reports. */
public final class TestCounts {
    public final long samples;
    public final long correctTop1;
    public final long correctTop5;
    public final double lossSum;

    public TestCounts(long samples, long correctTop1, long correctTop5, double lossSum) {
        this.samples = samples;
        this.correctTop1 = correctTop1;
        this.correctTop5 = correctTop5;
        this.lossSum = lossSum;
    }

    public TestCounts plus(TestCounts other) {
        return new TestCounts(samples + other.samples, correctTop1 + other.correctTop1,
                correctTop5 + other.correctTop5, lossSum + other.lossSum);
    }

    public double accuracy() {
        return samples == 0 ? 0.0 : (double) correctTop1 / samples;
    }
}
