package com.fedscale.android;

import static org.junit.Assert.assertArrayEquals;
import static org.junit.Assert.assertEquals;
import static org.junit.Assert.assertTrue;
import static org.junit.Assert.fail;

import java.io.File;
import java.nio.ByteBuffer;
import java.nio.ByteOrder;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.util.Arrays;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.concurrent.TimeUnit;
import org.junit.Test;

public class SafetensorsTest {
    private static byte[] raw(String header, int dataBytes) {
        byte[] h = header.getBytes(StandardCharsets.UTF_8);
        ByteBuffer b = ByteBuffer.allocate(8 + h.length + dataBytes).order(ByteOrder.LITTLE_ENDIAN);
        b.putLong(h.length).put(h);
        return b.array();
    }

    private static void assertRejected(byte[] bytes, String fragment) {
        try {
            Safetensors.decode(bytes);
            fail("accepted a malformed buffer (" + fragment + ")");
        } catch (Safetensors.FormatException e) {
            assertTrue(e.getMessage() + " should mention " + fragment, e.getMessage().contains(fragment));
        }
    }

    @Test
    public void roundTripKeepsOrderShapesValuesAndMetadata() {
        Tensor a = new Tensor("dense_0/kernel", new int[] {2, 3}, new float[] {1, -2, 3.5f, Float.MIN_VALUE, 0, -0f});
        Tensor b = new Tensor("dense_0/bias", new int[] {3}, new float[] {7, 8, 9});
        Tensor s = new Tensor("scalar", new int[] {}, new float[] {42});
        Tensor e = new Tensor("empty", new int[] {0, 4}, new float[0]);
        Map<String, String> meta = new LinkedHashMap<>();
        meta.put("samples", "12");
        meta.put("loss", "0.25");
        byte[] bytes = Safetensors.encode(Arrays.asList(a, b, s, e), meta);
        assertEquals(0, (bytes.length - 8 - 4 * 10) % 8); // header padded to 8 bytes
        Safetensors.Contents c = Safetensors.decode(bytes);
        List<Tensor> t = c.tensors();
        assertEquals(4, t.size());
        assertEquals("dense_0/kernel", t.get(0).name());
        assertArrayEquals(new int[] {2, 3}, t.get(0).shape());
        assertArrayEquals(a.data(), t.get(0).data(), 0f);
        assertEquals(Float.floatToRawIntBits(-0f), Float.floatToRawIntBits(t.get(0).data()[5]));
        assertEquals("dense_0/bias", t.get(1).name());
        assertArrayEquals(new int[] {}, c.byName().get("scalar").shape());
        assertEquals(42f, c.byName().get("scalar").data()[0], 0f);
        assertArrayEquals(new int[] {0, 4}, c.byName().get("empty").shape());
        assertEquals(meta, c.metadata());
    }

    @Test
    public void rejectsMalformedBuffers() {
        assertRejected(new byte[3], "shorter");
        ByteBuffer huge = ByteBuffer.allocate(16).order(ByteOrder.LITTLE_ENDIAN).putLong(1L << 40);
        assertRejected(huge.array(), "out of range");
        ByteBuffer past = ByteBuffer.allocate(16).order(ByteOrder.LITTLE_ENDIAN).putLong(100);
        assertRejected(past.array(), "exceeds the buffer");
        assertRejected(raw("not json", 0), "JSON");
        assertRejected(raw("{\"a\":{\"dtype\":\"F16\",\"shape\":[1],\"data_offsets\":[0,2]}}", 2), "only F32");
        assertRejected(raw("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,4]}}", 4), "needs 8 bytes");
        assertRejected(raw("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}", 8), "contiguous");
        assertRejected(raw("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}", 8), "buffer holds 8");
        assertRejected(raw("{\"a\":{\"dtype\":\"F32\",\"shape\":[-1],\"data_offsets\":[0,4]}}", 4), "out of range");
        assertRejected(raw("{\"a\":{\"dtype\":\"F32\",\"shape\":[1.5],\"data_offsets\":[0,4]}}", 4), "non-integer");
        assertRejected(raw("{\"a\":{\"dtype\":\"F32\",\"shape\":[1]}}", 4), "data_offsets");
        assertRejected(raw("{\"__metadata__\":{\"k\":1}}", 0), "not a string");
        assertRejected(raw("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},"
                + "\"b\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}", 8), "contiguous");
    }

    @Test
    public void readsWhatPythonWrote() throws Exception {
        File f = new File(TestEnv.fixtures(), "codec.safetensors");
        Safetensors.Contents c = Safetensors.decode(Files.readAllBytes(f.toPath()));
        Map<String, Tensor> t = c.byName();
        assertEquals("12", c.metadata().get("samples"));
        assertEquals("ünïcode \"quoted\"", c.metadata().get("note"));
        assertEquals(3.5f, t.get("scalar").data()[0], 0f);
        assertArrayEquals(new int[] {0, 3}, t.get("empty").shape());
        assertArrayEquals(new int[] {2, 3, 4}, t.get("cube").shape());
        for (int i = 0; i < 24; i++) {
            assertEquals((float) i / 7.0f, t.get("cube").data()[i], 0f);
        }
        assertArrayEquals(new float[] {1e-30f, -0f, 3.4e38f, -1.5f}, t.get("a/b.c").data(), 0f);
    }

    @Test
    public void pythonReadsWhatJavaWrote() throws Exception {
        File dir = TestEnv.tempDir("codec");
        File f = new File(dir, "java.safetensors");
        Map<String, String> meta = new LinkedHashMap<>();
        meta.put("samples", "7");
        meta.put("loss", "0.5");
        meta.put("note", "ünïcode \"q\" / \\ \n");
        float[] cube = new float[24];
        for (int i = 0; i < cube.length; i++) {
            cube[i] = i / 7.0f;
        }
        Files.write(f.toPath(), Safetensors.encode(Arrays.asList(
                new Tensor("dense_0/kernel", new int[] {2, 3, 4}, cube),
                new Tensor("scalar", new int[] {}, new float[] {-2.5f}),
                new Tensor("empty", new int[] {0}, new float[0])), meta));
        String check = "import sys, numpy as np\n"
                + "from safetensors.numpy import load_file\n"
                + "from safetensors import safe_open\n"
                + "t = load_file(sys.argv[1])\n"
                + "assert t['dense_0/kernel'].shape == (2, 3, 4), t['dense_0/kernel'].shape\n"
                + "assert t['dense_0/kernel'].dtype == np.float32\n"
                + "assert np.array_equal(t['dense_0/kernel'].ravel(), np.arange(24, dtype=np.float32) / np.float32(7))\n"
                + "assert t['scalar'].shape == () and float(t['scalar']) == -2.5\n"
                + "assert t['empty'].shape == (0,)\n"
                + "with safe_open(sys.argv[1], 'np') as fh:\n"
                + "    m = fh.metadata()\n"
                + "assert m == {'samples': '7', 'loss': '0.5', 'note': 'ünïcode \"q\" / \\\\ \\n'}, m\n"
                + "print('python read OK')\n";
        ProcessBuilder pb = new ProcessBuilder(TestEnv.python(), "-c", check, f.getPath()).redirectErrorStream(true);
        Process p = pb.start();
        String out = new String(p.getInputStream().readAllBytes(), StandardCharsets.UTF_8);
        assertTrue("python timed out", p.waitFor(60, TimeUnit.SECONDS));
        assertEquals(out, 0, p.exitValue());
        assertTrue(out, out.contains("python read OK"));
        TestEnv.deleteTree(dir);
    }
}
