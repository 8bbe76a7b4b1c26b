package com.fedscale.android;

import static org.junit.Assert.assertArrayEquals;
import static org.junit.Assert.assertEquals;
import static org.junit.Assert.assertSame;
import static org.junit.Assert.assertTrue;
import static org.junit.Assert.fail;

import java.io.File;
import java.util.ArrayList;
import java.util.Collections;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.Random;
import org.json.JSONObject;
import org.junit.Test;

/**
 * FedProx in {@link LocalTrainer}: a task's {@code proxy_mu} adds {@code mu/2 * ||w - wGlobal||^2} to every
 * step's loss, applied as {@code new -= lr * mu * (w - wGlobal)} after the backend's plain SGD step. The
 * term's gradient {@code +mu * (w - wGlobal)} pulls the weights toward the global model (FedScale's client
 * has the sign wrong: it pushes them away).
 */
public class FedProxTest {
    /** A backend whose step is {@code w - lr * g} with a fixed gradient {@code g = 1}: hand-computable. */
    private static final class ConstantGradient implements Backend {
        final List<float[]> seen = new ArrayList<>();

        @Override
        public String name() {
            return "constant";
        }

        @Override
        public void load(ModelSpec model, JSONObject manifest, Map<String, byte[]> files) {}

        @Override
        public int trainBatchSize() {
            return 2;
        }

        @Override
        public int testBatchSize() {
            return 2;
        }

        @Override
        public StepResult trainStep(Map<String, Tensor> weights, float[] x, int[] y, float[] mask, float lr,
                                    float wd) {
            Tensor w = weights.get("w");
            seen.add(w.data().clone());
            float[] out = new float[w.size()];
            for (int i = 0; i < out.length; i++) {
                out[i] = w.data()[i] - lr * 1f;
            }
            return new StepResult(Collections.singletonMap("w", new Tensor("w", w.shape(), out)), 0.5f);
        }

        @Override
        public TestCounts testBatch(Map<String, Tensor> weights, float[] x, int[] y, float[] mask) {
            return new TestCounts(0, 0, 0, 0.0);
        }

        @Override
        public void close() {}
    }

    private static Map<String, Tensor> one(float... values) {
        return Collections.singletonMap("w", new Tensor("w", new int[] {values.length}, values));
    }

    private static InMemoryDataset tiny() {
        return new InMemoryDataset(new float[] {0f, 1f}, new int[] {0, 1}, 1);
    }

    @Test
    public void oneStepWithMuMatchesTheHandComputedValue() throws Exception {
        // w = [3, -1], wGlobal = [1, 1], lr = 0.5, mu = 0.25, gradient 1:
        // new = w - lr * (1 + mu * (w - wGlobal)) = [3 - 0.5 * (1 + 0.5), -1 - 0.5 * (1 - 0.5)] = [2.25, -1.25].
        LocalTrainer.Outcome out = LocalTrainer.train(new ConstantGradient(), 2, Collections.emptyMap(),
                one(3f, -1f), tiny(), 0.5f, 0f, 0.25f, one(1f, 1f), 1, 0, new Random(0), null);
        assertArrayEquals(new float[] {2.25f, -1.25f}, out.weights.get("w").data(), 0f);
        // mu = 0: the plain step, [2.5, -1.5].
        LocalTrainer.Outcome plain = LocalTrainer.train(new ConstantGradient(), 2, Collections.emptyMap(),
                one(3f, -1f), tiny(), 0.5f, 0f, 0f, one(1f, 1f), 1, 0, new Random(0), null);
        assertArrayEquals(new float[] {2.5f, -1.5f}, plain.weights.get("w").data(), 0f);
    }

    @Test
    public void theTermUsesTheWeightsBeforeEachStepAndDefaultsToTheStartingModel() throws Exception {
        // wGlobal null: the task's start [1]. lr = 0.5, mu = 1, gradient 1.
        // step 1: w = 1 -> 1 - 0.5 * (1 + 0) = 0.5; step 2: 0.5 - 0.5 * (1 + (0.5 - 1)) = 0.25.
        ConstantGradient backend = new ConstantGradient();
        Map<String, Tensor> start = one(1f);
        LocalTrainer.Outcome out = LocalTrainer.train(backend, 2, Collections.emptyMap(), start, tiny(), 0.5f, 0f,
                1f, null, 2, 0, new Random(0), null);
        assertArrayEquals(new float[] {0.25f}, out.weights.get("w").data(), 0f);
        assertArrayEquals(new float[] {1f}, backend.seen.get(0), 0f);
        assertArrayEquals(new float[] {0.5f}, backend.seen.get(1), 0f);
        assertArrayEquals("the starting model is left untouched", new float[] {1f}, start.get("w").data(), 0f);
    }

    @Test
    public void proximalStepIsExactAndZeroMuIsTheIdentity() {
        Tensor after = new Tensor("w", new int[] {2}, new float[] {1f, 2f});
        Tensor before = new Tensor("w", new int[] {2}, new float[] {3f, -1f});
        Tensor global = new Tensor("w", new int[] {2}, new float[] {1f, 1f});
        // 1 - 0.5 * 0.25 * (3 - 1) = 0.75; 2 - 0.5 * 0.25 * (-1 - 1) = 2.25 (the Python test's values).
        assertArrayEquals(new float[] {0.75f, 2.25f},
                LocalTrainer.proximalStep(after, before, global, 0.5f, 0.25f).data(), 0f);
        assertArrayEquals(new float[] {1f, 2f}, after.data(), 0f);
        assertSame(after, LocalTrainer.proximalStep(after, before, global, 0.5f, 0f));
    }

    private static ModelSpec mlp() {
        List<ModelSpec.TensorInfo> t = new ArrayList<>();
        t.add(new ModelSpec.TensorInfo("dense_0/kernel", new int[] {64, PlainJavaBackend.MLP_HIDDEN}));
        t.add(new ModelSpec.TensorInfo("dense_0/bias", new int[] {PlainJavaBackend.MLP_HIDDEN}));
        t.add(new ModelSpec.TensorInfo("dense_1/kernel", new int[] {PlainJavaBackend.MLP_HIDDEN, 10}));
        t.add(new ModelSpec.TensorInfo("dense_1/bias", new int[] {10}));
        return new ModelSpec("mlp", new int[] {8, 8, 1}, 10, 1.0, t, Collections.emptyList());
    }

    private static Map<String, Tensor> init(ModelSpec spec, long seed) {
        Random rng = new Random(seed);
        Map<String, Tensor> out = new LinkedHashMap<>();
        for (ModelSpec.TensorInfo t : spec.tensors) {
            int n = 1;
            for (int d : t.shape) {
                n *= d;
            }
            float[] v = new float[n];
            for (int i = 0; i < n; i++) {
                v[i] = (float) (rng.nextGaussian() * 0.1);
            }
            out.put(t.name, new Tensor(t.name, t.shape, v));
        }
        return out;
    }

    private static double distance(Map<String, Tensor> a, Map<String, Tensor> b) {
        double s = 0;
        for (String k : b.keySet()) {
            for (int i = 0; i < b.get(k).size(); i++) {
                double d = a.get(k).data()[i] - b.get(k).data()[i];
                s += d * d;
            }
        }
        return Math.sqrt(s);
    }

    private static Dataset digits() throws Exception {
        File f = new File(new File(TestEnv.fixtures(), "digits"), "device_00_train.fsd");
        if (f.isFile()) {
            return InMemoryDataset.load(f);
        }
        // Without the fixtures (a run outside jvm-test.sh): separable random data of the same shape.
        Random rng = new Random(1);
        int n = 200;
        float[] x = new float[n * 64];
        int[] y = new int[n];
        for (int r = 0; r < n; r++) {
            y[r] = rng.nextInt(10);
            for (int j = 0; j < 64; j++) {
                x[r * 64 + j] = (float) rng.nextGaussian() + (j % 10 == y[r] ? 2f : 0f);
            }
        }
        return new InMemoryDataset(x, y, 64);
    }

    @Test
    public void onARealBackendOneStepIsThePlainStepMinusTheProximalGradient() throws Exception {
        ModelSpec spec = mlp();
        PlainJavaBackend backend = new PlainJavaBackend(16, 16);
        backend.load(spec, null, null);
        Dataset data = digits();
        Map<String, Tensor> w = init(spec, 1);
        Map<String, Tensor> global = init(spec, 2);
        float lr = 0.1f;
        float mu = 0.5f;
        LocalTrainer.Outcome plain = LocalTrainer.train(backend, 16, Collections.emptyMap(), w, data, lr, 1e-4f, 0f,
                global, 1, 0, new Random(4), null);
        LocalTrainer.Outcome prox = LocalTrainer.train(backend, 16, Collections.emptyMap(), w, data, lr, 1e-4f, mu,
                global, 1, 0, new Random(4), null);
        double moved = 0;
        for (String k : w.keySet()) {
            float[] p = plain.weights.get(k).data();
            float[] q = prox.weights.get(k).data();
            for (int i = 0; i < p.length; i++) {
                double want = p[i] - (double) lr * mu * (w.get(k).data()[i] - global.get(k).data()[i]);
                assertEquals(k + "[" + i + "]", want, q[i], 1e-6);
                moved = Math.max(moved, Math.abs(q[i] - p[i]));
            }
        }
        assertTrue("proxy_mu had no effect", moved > 1e-3);
    }

    @Test
    public void weightsEndCloserToTheStartWithMuThanWithout() throws Exception {
        ModelSpec spec = mlp();
        PlainJavaBackend backend = new PlainJavaBackend(16, 16);
        backend.load(spec, null, null);
        Dataset data = digits();
        Map<String, Tensor> start = init(spec, 7);
        double[] drift = new double[3];
        float[] mus = {0f, 1f, -1f};
        for (int i = 0; i < mus.length; i++) {
            LocalTrainer.Outcome out = LocalTrainer.train(backend, 16, Collections.emptyMap(), start, data, 0.1f, 0f,
                    mus[i], null, 20, 0, new Random(2), null);
            drift[i] = distance(out.weights, start);
        }
        assertTrue("training moves the model: " + drift[0], drift[0] > 0.1);
        assertTrue("mu = 1 pulls toward the start: " + drift[1] + " vs " + drift[0], drift[1] < 0.98 * drift[0]);
        // FedScale's sign (mu = -1 here) pushes away instead.
        assertTrue("mu = -1 pushes away: " + drift[2] + " vs " + drift[0], drift[2] > 1.02 * drift[0]);
    }

    @Test
    public void taskConfigProxyMuDefaultsToZeroAndRefusesBadValues() throws Exception {
        assertEquals(0f, Client.taskProxyMu(new JSONObject()), 0f);
        assertEquals(0f, Client.taskProxyMu(null), 0f);
        assertEquals(0f, Client.taskProxyMu(new JSONObject("{\"proxy_mu\": null}")), 0f);
        assertEquals(0.01f, Client.taskProxyMu(new JSONObject("{\"proxy_mu\": 0.01}")), 0f);
        for (String bad : new String[] {"-0.1", "\"x\""}) {
            try {
                Client.taskProxyMu(new JSONObject("{\"proxy_mu\": " + bad + "}"));
                fail("accepted proxy_mu " + bad);
            } catch (IllegalArgumentException expected) {
                assertTrue(expected.getMessage().contains("proxy_mu"));
            }
        }
    }
}
