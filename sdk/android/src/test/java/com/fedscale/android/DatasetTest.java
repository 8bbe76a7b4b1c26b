package com.fedscale.android;

import static org.junit.Assert.assertArrayEquals;
import static org.junit.Assert.assertEquals;
import static org.junit.Assert.assertTrue;
import static org.junit.Assert.fail;

import java.io.File;
import java.io.IOException;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.util.ArrayList;
import java.util.HashSet;
import java.util.List;
import java.util.Random;
import java.util.Set;
import org.junit.Test;

public class DatasetTest {
    @Test
    public void binaryAndCsvRoundTrip() throws Exception {
        InMemoryDataset d = new InMemoryDataset(new float[] {1, 2, 3, 4, 5, 6.25f}, new int[] {0, 2}, 3);
        File dir = TestEnv.tempDir("ds");
        File bin = new File(dir, "d.fsd");
        File csv = new File(dir, "d.csv");
        d.save(bin);
        d.saveCsv(csv);
        for (InMemoryDataset back : new InMemoryDataset[] {InMemoryDataset.load(bin), InMemoryDataset.loadCsv(csv)}) {
            assertEquals(2, back.size());
            assertEquals(3, back.sampleSize());
            float[] row = new float[3];
            back.copyFeatures(1, row, 0);
            assertArrayEquals(new float[] {4, 5, 6.25f}, row, 0f);
            assertEquals(2, back.label(1));
        }
        Files.write(csv.toPath(), "1,2,3\n0,1\n".getBytes(StandardCharsets.UTF_8));
        try {
            InMemoryDataset.loadCsv(csv);
            fail("ragged CSV accepted");
        } catch (IOException e) {
            assertTrue(e.getMessage(), e.getMessage().contains("expected 2"));
        }
        byte[] bytes = d.toBytes();
        bytes[0] = 'X';
        try {
            InMemoryDataset.fromBytes(bytes);
            fail("bad magic accepted");
        } catch (IOException e) {
            assertTrue(e.getMessage().contains("magic"));
        }
        TestEnv.deleteTree(dir);
    }

    @Test
    public void digitsFixturesLoad() throws Exception {
        File dir = new File(TestEnv.fixtures(), "digits");
        int total = 0;
        for (int i = 0; i < 20; i++) {
            InMemoryDataset train = InMemoryDataset.load(new File(dir, String.format("device_%02d_train.fsd", i)));
            assertEquals(64, train.sampleSize());
            assertTrue(train.size() >= 2);
            total += train.size();
        }
        assertEquals(1438, total);
    }

    @Test
    public void batchPlanIsShuffledPassesWithoutReplacement() {
        List<int[]> plan = LocalTrainer.batchPlan(10, 4, 7, new Random(3));
        assertEquals(7, plan.size());
        int[] sizes = new int[plan.size()];
        for (int i = 0; i < plan.size(); i++) {
            sizes[i] = plan.get(i).length;
        }
        assertArrayEquals(new int[] {4, 4, 2, 4, 4, 2, 4}, sizes);
        for (int pass = 0; pass < 2; pass++) {
            Set<Integer> seen = new HashSet<>();
            for (int b = 3 * pass; b < 3 * pass + 3; b++) {
                for (int i : plan.get(b)) {
                    assertTrue("sample drawn twice in a pass", seen.add(i));
                }
            }
            assertEquals(10, seen.size());
        }
        // Fewer samples than a batch: every step trains on all of them.
        List<int[]> small = LocalTrainer.batchPlan(3, 16, 2, new Random(1));
        assertEquals(3, small.get(0).length);
        assertEquals(3, small.get(1).length);
        assertEquals(5 * 3, LocalTrainer.totalSteps(10, 4, 99, 5));
        assertEquals(99, LocalTrainer.totalSteps(10, 4, 99, 0));
        List<Integer> firstPass = new ArrayList<>();
        for (int b = 0; b < 3; b++) {
            for (int i : plan.get(b)) {
                firstPass.add(i);
            }
        }
        assertTrue("not shuffled", !firstPass.equals(List.of(0, 1, 2, 3, 4, 5, 6, 7, 8, 9)));
    }
}
