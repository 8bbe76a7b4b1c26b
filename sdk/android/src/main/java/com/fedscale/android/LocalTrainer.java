package com.fedscale.android;

import java.util.ArrayList;
import java.util.Arrays;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.Random;

/**
 * The data plan around a {@link Backend}'s fixed-size steps, as the daemon's reference runtime runs it
 * ({@code fedscaled/device/backends.py}, {@code ArtifactBackend}; {@code fedscaled/device/train.py},
 * {@code batch_plan}):
 *
 * <ul>
 *   <li>steps: {@code local_steps}, or {@code epochs · ceil(n / B)} when {@code epochs > 0};</li>
 *   <li>batches: shuffled passes without replacement, each pass a fresh permutation cut into batches of
 *       {@code B} (the last one possibly short), passes repeated until the step count is reached;</li>
 *   <li>a short batch is padded to {@code B} rows with zeros and mask 0;</li>
 *   <li>mean loss: the mean of the steps' losses; samples used (the FedAvg weight): {@code n} when
 *       {@code epochs > 0}, else {@code min(n, steps · B)};</li>
 *   <li>test: consecutive batches of the test batch size, the last padded with mask 0, sums added up.</li>
 *   <li>FedProx (a task's {@code proxy_mu}): after every step, {@code new -= lr * mu * (w - wGlobal)}, with
 *       {@code w} the weights the step started from and {@code wGlobal} the model the task started from
 *       ({@link #proximalStep}). Every backend's step is plain SGD evaluated at {@code w}, so this is exactly
 *       the SGD step on {@code loss + mu/2 * ||w - wGlobal||^2}, for every backend and without changing the
 *       artifacts ({@code train.proximal_step} in the reference runtime).</li>
 * </ul>
 *
 * The permutation comes from {@link java.util.Random}, not numpy: the plan's shape is the same, the order
 * of samples differs.
 */
public final class LocalTrainer {
    private LocalTrainer() {}

    /** Asked before every step: true stops training (the result is then marked aborted). */
    public interface AbortCheck {
        boolean shouldAbort();
    }

    /** What a local run produced. */
    public static final class Outcome {
        /** The trainable weights after the last step, by name. */
        public final Map<String, Tensor> weights;
        public final double meanLoss;
        public final long samplesUsed;
        public final int stepsDone;
        public final int stepsPlanned;
        public final boolean aborted;

        Outcome(Map<String, Tensor> weights, double meanLoss, long samplesUsed, int stepsDone, int stepsPlanned,
                boolean aborted) {
            this.weights = weights;
            this.meanLoss = meanLoss;
            this.samplesUsed = samplesUsed;
            this.stepsDone = stepsDone;
            this.stepsPlanned = stepsPlanned;
            this.aborted = aborted;
        }
    }

    /** Index batches for {@code steps} steps: shuffled passes without replacement, wrapping around. */
    public static List<int[]> batchPlan(int n, int batchSize, int steps, Random rng) {
        if (n < 1 || batchSize < 1) {
            throw new IllegalArgumentException("need n >= 1 and batchSize >= 1");
        }
        List<int[]> plan = new ArrayList<>();
        int[] order = new int[n];
        while (plan.size() < steps) {
            for (int i = 0; i < n; i++) {
                order[i] = i;
            }
            for (int i = n - 1; i > 0; i--) {
                int j = rng.nextInt(i + 1);
                int t = order[i];
                order[i] = order[j];
                order[j] = t;
            }
            for (int start = 0; start < n && plan.size() < steps; start += batchSize) {
                plan.add(Arrays.copyOfRange(order, start, Math.min(n, start + batchSize)));
            }
        }
        return plan;
    }

    /** The number of steps of a task: {@code local_steps}, or {@code epochs · ceil(n / B)} when epochs > 0. */
    public static int totalSteps(int n, int batchSize, int localSteps, int epochs) {
        return epochs > 0 ? epochs * ((n + batchSize - 1) / batchSize) : localSteps;
    }

    /**
     * FedProx's correction of one SGD step: {@code after - lr * mu * (before - global)}, in float arithmetic
     * (the same operations as the reference runtime's {@code train.proximal_step}).
     *
     * <p>{@code after} is what a plain SGD step made of {@code before}; the result is the SGD step on
     * {@code loss + mu/2 * ||w - global||^2}, whose gradient {@code mu * (w - global)} pulls the weights back
     * toward the global model for {@code mu > 0}. Returns {@code after} itself when {@code mu == 0}; never
     * writes into its arguments (a new tensor otherwise).
     */
    public static Tensor proximalStep(Tensor after, Tensor before, Tensor global, float lr, float mu) {
        if (mu == 0f) {
            return after;
        }
        float[] a = after.data();
        float[] b = before.data();
        float[] g = global.data();
        if (b.length != a.length || g.length != a.length) {
            throw new IllegalArgumentException(after.name() + ": proximal step over tensors of "
                    + a.length + ", " + b.length + " and " + g.length + " values");
        }
        float scale = lr * mu;
        float[] out = new float[a.length];
        for (int i = 0; i < a.length; i++) {
            out[i] = a[i] - scale * (b[i] - g[i]);
        }
        return new Tensor(after.name(), after.shape(), out);
    }

    /**
     * Train {@code trainable} (by name, in the model's order) with {@code backend} on {@code data}: plain
     * SGD, no proximal term. See {@link #train(Backend, int, Map, Map, Dataset, float, float, float, Map, int,
     * int, Random, AbortCheck)}.
     */
    public static Outcome train(Backend backend, int batchSize, Map<String, Tensor> frozen,
                                Map<String, Tensor> trainable, Dataset data, float lr, float wd, int localSteps,
                                int epochs, Random rng, AbortCheck abort) throws Exception {
        return train(backend, batchSize, frozen, trainable, data, lr, wd, 0f, null, localSteps, epochs, rng, abort);
    }

    /**
     * Train {@code trainable} (by name, in the model's order) with {@code backend} on {@code data}.
     *
     * @param frozen frozen tensors (empty for most models), passed to every step unchanged
     * @param batchSize the backend's fixed train batch size
     * @param proxyMu FedProx's {@code mu} (the task's {@code proxy_mu}; 0 for plain SGD): every step is
     *     followed by {@link #proximalStep} toward {@code wGlobal}
     * @param wGlobal the global model of the proximal term, by name; null for {@code trainable} itself, the
     *     model the task started from (kept by reference, not copied: one model's memory, already held)
     */
    public static Outcome train(Backend backend, int batchSize, Map<String, Tensor> frozen,
                                Map<String, Tensor> trainable, Dataset data, float lr, float wd, float proxyMu,
                                Map<String, Tensor> wGlobal, int localSteps, int epochs, Random rng,
                                AbortCheck abort) throws Exception {
        if (Float.isNaN(proxyMu) || Float.isInfinite(proxyMu)) {
            throw new IllegalArgumentException("proxy_mu must be finite, got " + proxyMu);
        }
        Map<String, Tensor> anchor = wGlobal == null ? trainable : wGlobal;
        if (proxyMu != 0f) {
            for (String name : trainable.keySet()) {
                if (anchor.get(name) == null) {
                    throw new IllegalArgumentException("the global model lacks tensor " + name);
                }
            }
        }
        int n = data.size();
        if (n == 0) {
            throw new IllegalArgumentException("no local training samples");
        }
        int steps = totalSteps(n, batchSize, localSteps, epochs);
        if (steps < 1) {
            throw new IllegalArgumentException("need local_steps >= 1 or epochs >= 1");
        }
        List<int[]> plan = batchPlan(n, batchSize, steps, rng);
        int d = data.sampleSize();
        float[] x = new float[batchSize * d];
        int[] y = new int[batchSize];
        float[] mask = new float[batchSize];
        Map<String, Tensor> weights = new LinkedHashMap<>(frozen);
        weights.putAll(trainable);
        Map<String, Tensor> current = new LinkedHashMap<>(trainable);
        double lossSum = 0.0;
        int done = 0;
        for (int[] idx : plan) {
            if (abort != null && abort.shouldAbort()) {
                return new Outcome(current, done == 0 ? 0.0 : lossSum / done, 0, done, plan.size(), true);
            }
            Arrays.fill(x, 0f);
            Arrays.fill(y, 0);
            Arrays.fill(mask, 0f);
            for (int r = 0; r < idx.length; r++) {
                data.copyFeatures(idx[r], x, r * d);
                y[r] = data.label(idx[r]);
                mask[r] = 1f;
            }
            StepResult out = backend.trainStep(weights, x, y, mask, lr, wd);
            for (String name : trainable.keySet()) {
                Tensor t = out.weights().get(name);
                if (t == null) {
                    throw new IllegalStateException(backend.name() + " step returned no tensor " + name);
                }
                // The backend's step is plain SGD at current: the proximal term's gradient is added after it.
                t = proximalStep(t, current.get(name), anchor.get(name), lr, proxyMu);
                current.put(name, t);
                weights.put(name, t);
            }
            lossSum += out.loss();
            done++;
        }
        long used = epochs > 0 ? n : Math.min((long) n, (long) steps * batchSize);
        return new Outcome(current, lossSum / plan.size(), used, done, plan.size(), false);
    }

    /** Test counts of {@code weights} (frozen and trainable) on all of {@code data}, in batches of {@code batchSize}. */
    public static TestCounts evaluate(Backend backend, int batchSize, Map<String, Tensor> weights, Dataset data)
            throws Exception {
        int n = data.size();
        int d = data.sampleSize();
        TestCounts total = new TestCounts(0, 0, 0, 0.0);
        float[] x = new float[batchSize * d];
        int[] y = new int[batchSize];
        float[] mask = new float[batchSize];
        for (int start = 0; start < n; start += batchSize) {
            int m = Math.min(batchSize, n - start);
            Arrays.fill(x, 0f);
            Arrays.fill(y, 0);
            Arrays.fill(mask, 0f);
            for (int r = 0; r < m; r++) {
                data.copyFeatures(start + r, x, r * d);
                y[r] = data.label(start + r);
                mask[r] = 1f;
            }
            TestCounts c = backend.testBatch(weights, x, y, mask);
            // Artifact backends return float sums; the rows are exactly the m real ones.
            total = total.plus(new TestCounts(m, c.correctTop1, c.correctTop5, c.lossSum));
        }
        return total;
    }
}
