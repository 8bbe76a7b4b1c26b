package com.fedscale.android;

import java.io.BufferedReader;
import java.io.ByteArrayOutputStream;
import java.io.DataOutputStream;
import java.io.File;
import java.io.IOException;
import java.io.InputStream;
import java.io.OutputStream;
import java.nio.ByteBuffer;
import java.nio.ByteOrder;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.util.ArrayList;
import java.util.List;

/**
 * A {@link Dataset} held in two arrays, with loaders for two simple file formats (used by the test
 * fixtures that the Python side exports, {@code sdk/android/scripts/export_digits.py}).
 *
 * <p><b>Binary ({@code .fsd})</b>, little-endian: magic {@code "FSDS"}, int32 version (1), int32 row count
 * {@code n}, int32 features per row {@code d}, then {@code n*d} float32 features (row-major) and {@code n}
 * int32 labels.
 *
 * <p><b>CSV</b>: one sample per line, {@code label,f0,f1,...}; blank lines and lines starting with
 * {@code #} are skipped; every row must have the same number of features.
 */
public final class InMemoryDataset implements Dataset {
    /** First four bytes of the binary format. */
    public static final byte[] MAGIC = {'F', 'S', 'D', 'S'};
    /** Version written and accepted by the binary format. */
    public static final int VERSION = 1;

    private final float[] features;
    private final int[] labels;
    private final int sampleSize;

    /** {@code features} holds {@code labels.length * sampleSize} floats, row-major. */
    public InMemoryDataset(float[] features, int[] labels, int sampleSize) {
        if (sampleSize < 1) {
            throw new IllegalArgumentException("sampleSize must be >= 1, got " + sampleSize);
        }
        if ((long) labels.length * sampleSize != features.length) {
            throw new IllegalArgumentException(labels.length + " labels of " + sampleSize
                    + " features need " + (long) labels.length * sampleSize + " floats, got " + features.length);
        }
        this.features = features;
        this.labels = labels;
        this.sampleSize = sampleSize;
    }

    @Override
    public int size() {
        return labels.length;
    }

    @Override
    public int sampleSize() {
        return sampleSize;
    }

    @Override
    public void copyFeatures(int index, float[] dst, int offset) {
        System.arraycopy(features, index * sampleSize, dst, offset, sampleSize);
    }

    @Override
    public int label(int index) {
        return labels[index];
    }

    /** Read the binary format from a file. */
    public static InMemoryDataset load(File file) throws IOException {
        return fromBytes(Files.readAllBytes(file.toPath()));
    }

    /** Read the binary format from a stream (read to its end; not closed). */
    public static InMemoryDataset load(InputStream in) throws IOException {
        ByteArrayOutputStream out = new ByteArrayOutputStream();
        byte[] chunk = new byte[65536];
        for (int r; (r = in.read(chunk)) > 0; ) {
            out.write(chunk, 0, r);
        }
        return fromBytes(out.toByteArray());
    }

    /** Parse the binary format. */
    public static InMemoryDataset fromBytes(byte[] bytes) throws IOException {
        if (bytes.length < 16) {
            throw new IOException("dataset file too short (" + bytes.length + " bytes)");
        }
        ByteBuffer buf = ByteBuffer.wrap(bytes).order(ByteOrder.LITTLE_ENDIAN);
        for (byte b : MAGIC) {
            if (buf.get() != b) {
                throw new IOException("not a dataset file (bad magic)");
            }
        }
        int version = buf.getInt();
        int n = buf.getInt();
        int d = buf.getInt();
        if (version != VERSION) {
            throw new IOException("dataset version " + version + " unsupported (expected " + VERSION + ")");
        }
        if (n < 0 || d < 1 || 16L + 4L * n * d + 4L * n != bytes.length) {
            throw new IOException("dataset header (n=" + n + ", d=" + d + ") does not match its "
                    + bytes.length + " bytes");
        }
        float[] x = new float[n * d];
        buf.asFloatBuffer().get(x);
        buf.position(buf.position() + 4 * x.length);
        int[] y = new int[n];
        buf.asIntBuffer().get(y);
        return new InMemoryDataset(x, y, d);
    }

    /** This dataset in the binary format. */
    public byte[] toBytes() {
        ByteBuffer buf = ByteBuffer.allocate(16 + 4 * features.length + 4 * labels.length)
                .order(ByteOrder.LITTLE_ENDIAN);
        buf.put(MAGIC).putInt(VERSION).putInt(labels.length).putInt(sampleSize);
        buf.asFloatBuffer().put(features);
        buf.position(buf.position() + 4 * features.length);
        buf.asIntBuffer().put(labels);
        return buf.array();
    }

    /** Write the binary format. */
    public void save(File file) throws IOException {
        Files.write(file.toPath(), toBytes());
    }

    /** Read the CSV format ({@code label,f0,f1,...} per line). */
    public static InMemoryDataset loadCsv(File file) throws IOException {
        List<float[]> rows = new ArrayList<>();
        List<Integer> labels = new ArrayList<>();
        int d = -1;
        int lineNo = 0;
        try (BufferedReader r = Files.newBufferedReader(file.toPath(), StandardCharsets.UTF_8)) {
            for (String line; (line = r.readLine()) != null; ) {
                lineNo++;
                line = line.trim();
                if (line.isEmpty() || line.startsWith("#")) {
                    continue;
                }
                String[] parts = line.split(",");
                if (d < 0) {
                    d = parts.length - 1;
                    if (d < 1) {
                        throw new IOException(file + ":" + lineNo + ": a row needs a label and features");
                    }
                } else if (parts.length - 1 != d) {
                    throw new IOException(file + ":" + lineNo + ": " + (parts.length - 1)
                            + " features, expected " + d);
                }
                try {
                    labels.add(Integer.parseInt(parts[0].trim()));
                    float[] row = new float[d];
                    for (int i = 0; i < d; i++) {
                        row[i] = Float.parseFloat(parts[i + 1].trim());
                    }
                    rows.add(row);
                } catch (NumberFormatException e) {
                    throw new IOException(file + ":" + lineNo + ": " + e.getMessage(), e);
                }
            }
        }
        if (d < 0) {
            throw new IOException(file + ": no samples");
        }
        float[] x = new float[rows.size() * d];
        int[] y = new int[rows.size()];
        for (int i = 0; i < y.length; i++) {
            System.arraycopy(rows.get(i), 0, x, i * d, d);
            y[i] = labels.get(i);
        }
        return new InMemoryDataset(x, y, d);
    }

    /** Write the CSV format. */
    public void saveCsv(File file) throws IOException {
        try (OutputStream os = Files.newOutputStream(file.toPath());
             DataOutputStream out = new DataOutputStream(os)) {
            StringBuilder b = new StringBuilder();
            for (int i = 0; i < labels.length; i++) {
                b.setLength(0);
                b.append(labels[i]);
                for (int j = 0; j < sampleSize; j++) {
                    b.append(',').append(features[i * sampleSize + j]);
                }
                b.append('\n');
                out.write(b.toString().getBytes(StandardCharsets.UTF_8));
            }
        }
    }
}
