package com.fedscale.android.adapters;

import com.fedscale.android.Tensor;
import java.util.Arrays;
import java.util.Map;

/** The value of one program input, by its name, from a step's arguments; sizes checked before any native call. */
final class Inputs {
    private Inputs() {}

    /** A float32 input: a weight by name, or {@code x}, {@code mask}, {@code lr}, {@code wd}. */
    static float[] floats(ArtifactManifest.Io io, Map<String, Tensor> weights, float[] x, float[] mask, float lr,
                          float wd) {
        float[] value;
        switch (io.name) {
            case "x":
                value = x;
                break;
            case "mask":
                value = mask;
                break;
            case "lr":
                value = new float[] {lr};
                break;
            case "wd":
                value = new float[] {wd};
                break;
            default:
                Tensor t = weights.get(io.name);
                if (t == null) {
                    throw new IllegalArgumentException("no weight '" + io.name + "' given (the program needs it)");
                }
                if (!Arrays.equals(t.shape(), io.shape)) {
                    throw new IllegalArgumentException(io.name + ": shape " + Arrays.toString(t.shape())
                            + ", the program expects " + Arrays.toString(io.shape));
                }
                value = t.data();
        }
        return checked(io, value, value == null ? -1 : value.length);
    }

    /** The int32 input {@code y}. */
    static int[] ints(ArtifactManifest.Io io, int[] y) {
        if (!io.name.equals("y")) {
            throw new IllegalArgumentException("unexpected int32 input " + io.name);
        }
        return checked(io, y, y == null ? -1 : y.length);
    }

    private static <T> T checked(ArtifactManifest.Io io, T value, int length) {
        if (value == null) {
            throw new IllegalArgumentException("input " + io.name + " is null");
        }
        if (length != io.size()) {
            throw new IllegalArgumentException("input " + io.name + ": " + length + " values, the program expects "
                    + io.size() + " " + Arrays.toString(io.shape));
        }
        return value;
    }

    /** Number of real rows: entries of {@code mask} that are not 0. */
    static long realRows(float[] mask) {
        long n = 0;
        for (float m : mask) {
            if (m != 0f) {
                n++;
            }
        }
        return n;
    }
}
