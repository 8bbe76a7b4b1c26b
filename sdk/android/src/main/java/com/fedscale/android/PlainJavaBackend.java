package com.fedscale.android;

import java.util.Arrays;
import java.util.LinkedHashMap;
import java.util.Map;
import org.json.JSONObject;

/**
 * The plain-Java trainer (backend name {@code "java"}): the dense zoo models {@code linear}
 * (Flatten → Dense) and {@code mlp} (Flatten → Dense 64 → ReLU → Dense), with no native library and no
 * artifact. It computes exactly the JAX step of {@code fedscaled/core/steps.py}:
 *
 * <ul>
 *   <li>{@code logits = x·W + b} (mlp: {@code h = relu(x·W0 + b0)}, {@code logits = h·W1 + b1}); kernels are
 *       {@code (in, out)}, row-major;</li>
 *   <li>loss: softmax cross-entropy (stable log-softmax: {@code l - max - log Σ exp(l - max)}) averaged
 *       over the rows whose mask is 1 (divided by {@code max(Σ mask, 1)});</li>
 *   <li>update: {@code w ← w − lr·(g + wd·w)} (SGD with L2 weight decay as in torch.optim.SGD);</li>
 *   <li>test: a row is top-k correct when fewer than k classes have a strictly higher logit than its
 *       label, {@code k = min(5, classes)}.</li>
 * </ul>
 *
 * <p><b>Arithmetic.</b> Every matrix product and reduction accumulates in {@code double} and is rounded
 * to float32 where JAX holds a float32 value (pre-activations and logits, then bias added in float32;
 * gradients rounded to float32 before the update); the update itself is evaluated in float32 arithmetic
 * as JAX does. Results match JAX's float32 step to within a few float32 ulps (checked to 1e-5 per weight
 * against fixtures written by {@code sdk/android/scripts/export_step_fixture.py}).
 *
 * <p>Batch sizes: a job's {@code batch_size} and {@code test_bsz} (the {@link Client} sets them from the
 * task with {@link #setBatchSizes}); 0 accepts any number of rows. Not thread-safe.
 */
public final class PlainJavaBackend implements Backend {
    /** The backend name announced at check-in. */
    public static final String NAME = "java";
    /** Hidden units of the zoo's {@code mlp} (fedscaled/core/models.py, MLP_HIDDEN). */
    public static final int MLP_HIDDEN = 64;

    private String model;
    private int inDim;
    private int classes;
    private int hidden;
    private int trainBatch;
    private int testBatch;

    /** A backend accepting batches of any size until {@link #setBatchSizes} fixes them. */
    public PlainJavaBackend() {}

    /** A backend with fixed train and test batch sizes. */
    public PlainJavaBackend(int trainBatch, int testBatch) {
        setBatchSizes(trainBatch, testBatch);
    }

    /** Fix the batch sizes of the train and test steps (0: any). */
    public void setBatchSizes(int train, int test) {
        if (train < 0 || test < 0) {
            throw new IllegalArgumentException("batch sizes must be >= 0");
        }
        this.trainBatch = train;
        this.testBatch = test;
    }

    /** Whether this backend can train a zoo model of this name. */
    public static boolean supports(String model) {
        return "linear".equals(model) || "mlp".equals(model);
    }

    @Override
    public String name() {
        return NAME;
    }

    @Override
    public void load(ModelSpec spec, JSONObject manifest, Map<String, byte[]> files) {
        if (!supports(spec.model)) {
            throw new IllegalArgumentException("the java backend trains linear and mlp, not " + spec.model);
        }
        if (!spec.frozenTensors.isEmpty()) {
            throw new IllegalArgumentException("model " + spec.model + " has frozen tensors; the java backend has none");
        }
        int d = spec.sampleSize();
        int c = spec.numClasses;
        int[][] expected = "mlp".equals(spec.model)
                ? new int[][] {{d, MLP_HIDDEN}, {MLP_HIDDEN}, {MLP_HIDDEN, c}, {c}}
                : new int[][] {{d, c}, {c}};
        String[] names = "mlp".equals(spec.model)
                ? new String[] {"dense_0/kernel", "dense_0/bias", "dense_1/kernel", "dense_1/bias"}
                : new String[] {"dense_0/kernel", "dense_0/bias"};
        if (spec.tensors.size() != names.length) {
            throw new IllegalArgumentException("model " + spec.model + " should have " + names.length
                    + " tensors, the job lists " + spec.tensors.size());
        }
        for (int i = 0; i < names.length; i++) {
            ModelSpec.TensorInfo t = spec.tensors.get(i);
            if (!t.name.equals(names[i]) || !Arrays.equals(t.shape, expected[i])) {
                throw new IllegalArgumentException("model " + spec.model + ": expected tensor " + names[i]
                        + Arrays.toString(expected[i]) + ", the job lists " + t.name + Arrays.toString(t.shape));
            }
        }
        this.model = spec.model;
        this.inDim = d;
        this.classes = c;
        this.hidden = "mlp".equals(spec.model) ? MLP_HIDDEN : 0;
    }

    @Override
    public int trainBatchSize() {
        return trainBatch;
    }

    @Override
    public int testBatchSize() {
        return testBatch;
    }

    @Override
    public StepResult trainStep(Map<String, Tensor> weights, float[] x, int[] y, float[] mask, float lr, float wd) {
        int rows = checkBatch(x, y, mask, trainBatch, true);
        Forward f = forward(weights, x, rows);
        float count = 0f;
        for (float m : mask) {
            count += m;
        }
        double denom = Math.max(count, 1.0f);
        double lossSum = 0.0;
        // dlogits = mask/denom * (softmax - onehot), per row.
        double[] dLogits = new double[rows * classes];
        for (int r = 0; r < rows; r++) {
            double[] p = new double[classes];
            double ce = softmax(f.logits, r, y[r], p);
            lossSum += ce * mask[r];
            double scale = mask[r] / denom;
            for (int c = 0; c < classes; c++) {
                dLogits[r * classes + c] = scale * (p[c] - (c == y[r] ? 1.0 : 0.0));
            }
        }
        float loss = (float) (lossSum / denom);
        Map<String, Tensor> out = new LinkedHashMap<>();
        if (hidden == 0) {
            Tensor w = need(weights, "dense_0/kernel");
            Tensor b = need(weights, "dense_0/bias");
            out.put(w.name(), update(w, kernelGrad(x, rows, inDim, dLogits, classes), lr, wd));
            out.put(b.name(), update(b, biasGrad(dLogits, rows, classes), lr, wd));
        } else {
            Tensor w0 = need(weights, "dense_0/kernel");
            Tensor b0 = need(weights, "dense_0/bias");
            Tensor w1 = need(weights, "dense_1/kernel");
            Tensor b1 = need(weights, "dense_1/bias");
            float[] k1 = w1.data();
            // dh = dlogits · W1ᵀ, masked by the ReLU (pre-activation > 0).
            double[] dPre = new double[rows * hidden];
            for (int r = 0; r < rows; r++) {
                for (int j = 0; j < hidden; j++) {
                    if (f.pre[r * hidden + j] > 0f) {
                        double s = 0.0;
                        for (int c = 0; c < classes; c++) {
                            s += dLogits[r * classes + c] * k1[j * classes + c];
                        }
                        dPre[r * hidden + j] = (float) s; // JAX holds this cotangent in float32
                    }
                }
            }
            out.put(w0.name(), update(w0, kernelGrad(x, rows, inDim, dPre, hidden), lr, wd));
            out.put(b0.name(), update(b0, biasGrad(dPre, rows, hidden), lr, wd));
            out.put(w1.name(), update(w1, kernelGrad(f.hidden, rows, hidden, dLogits, classes), lr, wd));
            out.put(b1.name(), update(b1, biasGrad(dLogits, rows, classes), lr, wd));
        }
        return new StepResult(out, loss);
    }

    @Override
    public TestCounts testBatch(Map<String, Tensor> weights, float[] x, int[] y, float[] mask) {
        int rows = checkBatch(x, y, mask, testBatch, false);
        Forward f = forward(weights, x, rows);
        int k = Math.min(5, classes);
        long samples = 0;
        long top1 = 0;
        long top5 = 0;
        double lossSum = 0.0;
        double[] p = new double[classes];
        for (int r = 0; r < rows; r++) {
            if (mask[r] == 0f) {
                continue;
            }
            samples++;
            lossSum += softmax(f.logits, r, y[r], p) * mask[r];
            float target = f.logits[r * classes + y[r]];
            int higher = 0;
            for (int c = 0; c < classes; c++) {
                if (f.logits[r * classes + c] > target) {
                    higher++;
                }
            }
            if (higher < 1) {
                top1++;
            }
            if (higher < k) {
                top5++;
            }
        }
        return new TestCounts(samples, top1, top5, lossSum);
    }

    /** Logits of {@code rows} samples ({@code rows * classes} floats, row-major): the infer program. */
    public float[] logits(Map<String, Tensor> weights, float[] x, int rows) {
        requireLoaded();
        if (x.length != rows * inDim) {
            throw new IllegalArgumentException("x holds " + x.length + " floats, " + rows + " rows need " + rows * inDim);
        }
        return forward(weights, x, rows).logits;
    }

    @Override
    public void close() {}

    // ------------------------------------------------------------------ internals

    private static final class Forward {
        float[] pre; // mlp: hidden pre-activations (rows * hidden)
        float[] hidden; // mlp: relu(pre)
        float[] logits; // rows * classes
    }

    private Forward forward(Map<String, Tensor> weights, float[] x, int rows) {
        Forward f = new Forward();
        if (hidden == 0) {
            f.logits = dense(x, rows, inDim, need(weights, "dense_0/kernel"), need(weights, "dense_0/bias"), classes);
        } else {
            f.pre = dense(x, rows, inDim, need(weights, "dense_0/kernel"), need(weights, "dense_0/bias"), hidden);
            f.hidden = new float[f.pre.length];
            for (int i = 0; i < f.pre.length; i++) {
                f.hidden[i] = Math.max(f.pre[i], 0f);
            }
            f.logits = dense(f.hidden, rows, hidden, need(weights, "dense_1/kernel"),
                    need(weights, "dense_1/bias"), classes);
        }
        return f;
    }

    /** float32(x·W) + b in float32, with the product accumulated in double. */
    private static float[] dense(float[] x, int rows, int in, Tensor kernel, Tensor bias, int out) {
        float[] w = kernel.data();
        float[] b = bias.data();
        if (w.length != in * out || b.length != out) {
            throw new IllegalArgumentException("tensors " + kernel.name() + " and " + bias.name() + " hold "
                    + w.length + " and " + b.length + " values; the model needs " + in * out + " and " + out);
        }
        float[] y = new float[rows * out];
        double[] acc = new double[out];
        for (int r = 0; r < rows; r++) {
            Arrays.fill(acc, 0.0);
            for (int i = 0; i < in; i++) {
                double xi = x[r * in + i];
                if (xi == 0.0) {
                    continue;
                }
                int base = i * out;
                for (int o = 0; o < out; o++) {
                    acc[o] += xi * w[base + o];
                }
            }
            for (int o = 0; o < out; o++) {
                y[r * out + o] = (float) acc[o] + b[o];
            }
        }
        return y;
    }

    /** Cross-entropy of row {@code r} for label {@code label}; fills {@code p} with the softmax. */
    private double softmax(float[] logits, int r, int label, double[] p) {
        int base = r * classes;
        double max = Double.NEGATIVE_INFINITY;
        for (int c = 0; c < classes; c++) {
            max = Math.max(max, logits[base + c]);
        }
        double sum = 0.0;
        for (int c = 0; c < classes; c++) {
            p[c] = Math.exp(logits[base + c] - max);
            sum += p[c];
        }
        for (int c = 0; c < classes; c++) {
            p[c] /= sum;
        }
        return -((logits[base + label] - max) - Math.log(sum));
    }

    /** aᵀ·g: {@code (in, out)} float32 gradient of a dense kernel. */
    private static float[] kernelGrad(float[] a, int rows, int in, double[] g, int out) {
        double[] acc = new double[in * out];
        for (int r = 0; r < rows; r++) {
            for (int i = 0; i < in; i++) {
                double ai = a[r * in + i];
                if (ai == 0.0) {
                    continue;
                }
                int base = i * out;
                for (int o = 0; o < out; o++) {
                    acc[base + o] += ai * g[r * out + o];
                }
            }
        }
        float[] grad = new float[in * out];
        for (int i = 0; i < grad.length; i++) {
            grad[i] = (float) acc[i];
        }
        return grad;
    }

    private static float[] biasGrad(double[] g, int rows, int out) {
        double[] acc = new double[out];
        for (int r = 0; r < rows; r++) {
            for (int o = 0; o < out; o++) {
                acc[o] += g[r * out + o];
            }
        }
        float[] grad = new float[out];
        for (int o = 0; o < out; o++) {
            grad[o] = (float) acc[o];
        }
        return grad;
    }

    /** w − lr·(g + wd·w), in float32 arithmetic. */
    private static Tensor update(Tensor w, float[] grad, float lr, float wd) {
        float[] v = w.data();
        float[] out = new float[v.length];
        for (int i = 0; i < v.length; i++) {
            out[i] = v[i] - lr * (grad[i] + wd * v[i]);
        }
        return new Tensor(w.name(), w.shape(), out);
    }

    private int checkBatch(float[] x, int[] y, float[] mask, int fixed, boolean train) {
        requireLoaded();
        int rows = y.length;
        if (fixed > 0 && rows != fixed) {
            throw new IllegalArgumentException((train ? "train" : "test") + " batch of " + rows
                    + " rows; this backend's batch size is " + fixed);
        }
        if (mask.length != rows || x.length != rows * inDim) {
            throw new IllegalArgumentException("batch of " + rows + " rows needs " + rows * inDim
                    + " features and " + rows + " mask values, got " + x.length + " and " + mask.length);
        }
        for (int r = 0; r < rows; r++) {
            if (y[r] < 0 || y[r] >= classes) {
                if (mask[r] != 0f) {
                    throw new IllegalArgumentException("label " + y[r] + " of row " + r + " is not in [0, " + classes + ")");
                }
                y[r] = 0; // padding rows contribute nothing, whatever their label
            }
        }
        return rows;
    }

    private void requireLoaded() {
        if (model == null) {
            throw new IllegalStateException("load() has not been called");
        }
    }

    private static Tensor need(Map<String, Tensor> weights, String name) {
        Tensor t = weights.get(name);
        if (t == null) {
            throw new IllegalArgumentException("weights lack tensor " + name);
        }
        return t;
    }
}
