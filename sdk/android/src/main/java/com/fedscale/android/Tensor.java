package com.fedscale.android;

import java.util.Arrays;

/** A named float32 tensor: the unit of the wire format (safetensors) and of every backend. */
public final class Tensor {
    private final String name;
    private final int[] shape;
    private final float[] data;

    /** A tensor over {@code data} (row-major); its length must equal the product of {@code shape}. */
    public Tensor(String name, int[] shape, float[] data) {
        long size = 1;
        for (int d : shape) {
            if (d < 0) {
                throw new IllegalArgumentException("negative dimension in " + Arrays.toString(shape));
            }
            size *= d;
        }
        if (size != data.length) {
            throw new IllegalArgumentException(
                    name + ": shape " + Arrays.toString(shape) + " holds " + size + " values, got " + data.length);
        }
        this.name = name;
        this.shape = shape.clone();
        this.data = data;
    }

    public String name() {
        return name;
    }

    public int[] shape() {
        return shape.clone();
    }

    /** The values, row-major. Not copied: callers must not modify a tensor they did not create. */
    public float[] data() {
        return data;
    }

    public int size() {
        return data.length;
    }

    /** The same values under another name. */
    public Tensor renamed(String newName) {
        return new Tensor(newName, shape, data);
    }
}
