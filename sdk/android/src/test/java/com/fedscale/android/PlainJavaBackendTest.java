package com.fedscale.android;

import static org.junit.Assert.assertEquals;
import static org.junit.Assert.assertTrue;
import static org.junit.Assert.fail;

import java.io.File;
import java.nio.file.Files;
import java.util.ArrayList;
import java.util.Collections;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.Random;
import org.junit.Test;

/** The plain-Java step against the JAX step (fixtures by scripts/export_step_fixture.py). */
public class PlainJavaBackendTest {
    static final double TOLERANCE = 1e-5;

    private static final class Fixture {
        ModelSpec spec;
        Map<String, Tensor> tensors;
        List<String> names;
        int batch;
    }

    private static Fixture fixture(String model) throws Exception {
        Safetensors.Contents c = Safetensors.decode(Files.readAllBytes(
                new File(TestEnv.fixtures(), "step_" + model + ".safetensors").toPath()));
        Fixture f = new Fixture();
        f.tensors = c.byName();
        String[] dims = c.metadata().get("input_shape").split(" ");
        int[] shape = new int[dims.length];
        for (int i = 0; i < dims.length; i++) {
            shape[i] = Integer.parseInt(dims[i]);
        }
        f.names = List.of(c.metadata().get("tensors").split(","));
        List<ModelSpec.TensorInfo> infos = new ArrayList<>();
        for (String n : f.names) {
            infos.add(new ModelSpec.TensorInfo(n, f.tensors.get(n).shape()));
        }
        f.spec = new ModelSpec(model, shape, Integer.parseInt(c.metadata().get("num_classes")), 1.0, infos,
                Collections.emptyList());
        f.batch = f.tensors.get("mask").size();
        return f;
    }

    private static int[] labels(Tensor y) {
        int[] out = new int[y.size()];
        for (int i = 0; i < out.length; i++) {
            out[i] = (int) y.data()[i];
        }
        return out;
    }

    private static double stepMaxDiff(String model) throws Exception {
        Fixture f = fixture(model);
        PlainJavaBackend backend = new PlainJavaBackend(f.batch, f.batch);
        backend.load(f.spec, null, null);
        Map<String, Tensor> weights = new LinkedHashMap<>();
        for (String n : f.names) {
            weights.put(n, f.tensors.get(n));
        }
        StepResult r = backend.trainStep(weights, f.tensors.get("x").data(), labels(f.tensors.get("y")),
                f.tensors.get("mask").data(), f.tensors.get("lr").data()[0], f.tensors.get("wd").data()[0]);
        double max = Math.abs(r.loss() - f.tensors.get("loss").data()[0]);
        assertTrue(model + " loss " + r.loss() + " vs JAX " + f.tensors.get("loss").data()[0], max <= TOLERANCE);
        for (String n : f.names) {
            float[] want = f.tensors.get("new:" + n).data();
            float[] got = r.weights().get(n).data();
            assertEquals(want.length, got.length);
            double changed = 0;
            for (int i = 0; i < want.length; i++) {
                double d = Math.abs(want[i] - got[i]);
                assertTrue(model + " " + n + "[" + i + "]: " + got[i] + " vs JAX " + want[i], d <= TOLERANCE);
                max = Math.max(max, d);
                changed = Math.max(changed, Math.abs(want[i] - f.tensors.get(n).data()[i]));
            }
            assertTrue(n + " did not move", changed > 1e-6);
        }
        TestCounts counts = backend.testBatch(weights, f.tensors.get("x").data(), labels(f.tensors.get("y")),
                f.tensors.get("mask").data());
        assertEquals(f.tensors.get("correct_top1").data()[0], counts.correctTop1, 0.0);
        assertEquals(f.tensors.get("correct_top5").data()[0], counts.correctTop5, 0.0);
        assertEquals(f.tensors.get("loss_sum").data()[0], counts.lossSum, 1e-4);
        double realRows = 0;
        for (float m : f.tensors.get("mask").data()) {
            realRows += m;
        }
        assertEquals(realRows, counts.samples, 0.0);
        System.out.printf("one-step max |java - jax| for %s: %.3g (loss %.6f)%n", model, max, r.loss());
        return max;
    }

    @Test
    public void linearStepMatchesJax() throws Exception {
        stepMaxDiff("linear");
    }

    @Test
    public void mlpStepMatchesJax() throws Exception {
        stepMaxDiff("mlp");
    }

    @Test
    public void paddingRowsChangeNothing() throws Exception {
        Fixture f = fixture("mlp");
        PlainJavaBackend backend = new PlainJavaBackend();
        backend.load(f.spec, null, null);
        Map<String, Tensor> weights = new LinkedHashMap<>();
        for (String n : f.names) {
            weights.put(n, f.tensors.get(n));
        }
        float[] x = f.tensors.get("x").data().clone();
        int[] y = labels(f.tensors.get("y"));
        float[] mask = f.tensors.get("mask").data();
        StepResult a = backend.trainStep(weights, x, y, mask, 0.1f, 0f);
        for (int r = 0; r < mask.length; r++) {
            if (mask[r] == 0f) {
                for (int i = 0; i < 64; i++) {
                    x[r * 64 + i] = 0.9f; // garbage in padding rows
                }
                y[r] = 7;
            }
        }
        StepResult b = backend.trainStep(weights, x, y, mask, 0.1f, 0f);
        assertEquals(a.loss(), b.loss(), 0f);
        for (String n : f.names) {
            float[] u = a.weights().get(n).data();
            float[] v = b.weights().get(n).data();
            for (int i = 0; i < u.length; i++) {
                assertEquals(u[i], v[i], 0f);
            }
        }
    }

    @Test
    public void refusesOtherModelsAndBadBatches() throws Exception {
        PlainJavaBackend backend = new PlainJavaBackend(4, 4);
        try {
            backend.load(new ModelSpec("cnn", new int[] {8, 8, 1}, 10, 1.0, Collections.emptyList(),
                    Collections.emptyList()), null, null);
            fail("cnn accepted");
        } catch (IllegalArgumentException e) {
            assertTrue(e.getMessage().contains("linear and mlp"));
        }
        Fixture f = fixture("linear");
        backend.load(f.spec, null, null);
        try {
            backend.trainStep(f.tensors, new float[3 * 16], new int[3], new float[3], 0.1f, 0f);
            fail("wrong batch size accepted");
        } catch (IllegalArgumentException e) {
            assertTrue(e.getMessage().contains("batch size is 4"));
        }
    }

    @Test
    public void localTrainingLearnsASeparableProblem() throws Exception {
        // Two well separated classes in 2-D: a few dozen steps of the linear model separate them.
        Random rng = new Random(5);
        int n = 64;
        float[] x = new float[n * 4];
        int[] y = new int[n];
        for (int i = 0; i < n; i++) {
            y[i] = i % 2;
            for (int j = 0; j < 4; j++) {
                x[i * 4 + j] = (float) ((y[i] == 0 ? 0.2 : 0.8) + 0.05 * rng.nextGaussian());
            }
        }
        InMemoryDataset data = new InMemoryDataset(x, y, 4);
        ModelSpec spec = new ModelSpec("mlp", new int[] {2, 2, 1}, 2, 1.0, List.of(
                new ModelSpec.TensorInfo("dense_0/kernel", new int[] {4, 64}),
                new ModelSpec.TensorInfo("dense_0/bias", new int[] {64}),
                new ModelSpec.TensorInfo("dense_1/kernel", new int[] {64, 2}),
                new ModelSpec.TensorInfo("dense_1/bias", new int[] {2})), Collections.emptyList());
        PlainJavaBackend backend = new PlainJavaBackend(8, 16);
        backend.load(spec, null, null);
        Map<String, Tensor> w = new LinkedHashMap<>();
        for (ModelSpec.TensorInfo t : spec.tensors) {
            int size = 1;
            for (int d : t.shape) {
                size *= d;
            }
            float[] v = new float[size];
            for (int i = 0; i < size; i++) {
                v[i] = t.shape.length == 2 ? (float) (0.3 * rng.nextGaussian()) : 0f;
            }
            w.put(t.name, new Tensor(t.name, t.shape, v));
        }
        double before = LocalTrainer.evaluate(backend, 16, w, data).lossSum;
        LocalTrainer.Outcome out = LocalTrainer.train(backend, 8, Collections.emptyMap(), w, data, 0.5f, 0f, 0, 5,
                new Random(1), null);
        assertEquals(n, out.samplesUsed); // epochs > 0: every sample
        assertEquals(5 * 8, out.stepsDone);
        TestCounts after = LocalTrainer.evaluate(backend, 16, out.weights, data);
        assertEquals(n, after.samples);
        assertEquals(n, after.correctTop1);
        assertTrue(after.lossSum < before);
        // An abort before the third step stops there.
        int[] calls = {0};
        LocalTrainer.Outcome aborted = LocalTrainer.train(backend, 8, Collections.emptyMap(), w, data, 0.5f, 0f, 10, 0,
                new Random(1), () -> ++calls[0] > 2);
        assertTrue(aborted.aborted);
        assertEquals(2, aborted.stepsDone);
    }
}
