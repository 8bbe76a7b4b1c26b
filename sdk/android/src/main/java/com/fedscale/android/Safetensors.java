package com.fedscale.android;

import java.nio.ByteBuffer;
import java.nio.ByteOrder;
import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.Collection;
import java.util.Collections;
import java.util.Iterator;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import org.json.JSONArray;
import org.json.JSONException;
import org.json.JSONObject;

/**
 * The <a href="https://github.com/huggingface/safetensors">safetensors</a> file format, float32 only: the
 * wire format of models, uploads and frozen tensors (docs/protocol.md).
 *
 * <p>Layout: an unsigned 64-bit little-endian header length {@code N}, {@code N} bytes of UTF-8 JSON
 * (padded with spaces to a multiple of 8, as the reference library writes it) mapping each tensor name to
 * {@code {"dtype": "F32", "shape": [...], "data_offsets": [begin, end]}} plus an optional
 * {@code "__metadata__"} object of string values, then the tensor bytes (little-endian float32, offsets
 * relative to the end of the header). {@link #decode} checks everything the reference library checks:
 * header bounds, JSON, dtype, that offsets are contiguous, start at 0, end at the end of the buffer and
 * match each shape's size. Every violation is a {@link FormatException} naming the problem.
 */
public final class Safetensors {
    /** Largest header accepted (the reference library's limit). */
    public static final long MAX_HEADER_BYTES = 100L * 1024 * 1024;
    /** Header key of the string-to-string metadata map. */
    public static final String METADATA_KEY = "__metadata__";

    private Safetensors() {}

    /** A malformed or unsupported safetensors buffer. */
    public static final class FormatException extends IllegalArgumentException {
        private static final long serialVersionUID = 1L;

        public FormatException(String message) {
            super("safetensors: " + message);
        }
    }

    /** What a file holds: tensors in file (offset) order, and the header's metadata. */
    public static final class Contents {
        private final List<Tensor> tensors;
        private final Map<String, String> metadata;

        Contents(List<Tensor> tensors, Map<String, String> metadata) {
            this.tensors = Collections.unmodifiableList(tensors);
            this.metadata = Collections.unmodifiableMap(metadata);
        }

        /** Tensors in the order of their data in the file. */
        public List<Tensor> tensors() {
            return tensors;
        }

        /** Header metadata ({@code __metadata__}); empty when the file has none. */
        public Map<String, String> metadata() {
            return metadata;
        }

        /** Tensors by name, in file order. */
        public Map<String, Tensor> byName() {
            Map<String, Tensor> out = new LinkedHashMap<>();
            for (Tensor t : tensors) {
                out.put(t.name(), t);
            }
            return out;
        }
    }

    /** {@link #encode(Collection, Map)} of a map's values, in the map's iteration order. */
    public static byte[] encode(Map<String, Tensor> tensors, Map<String, String> metadata) {
        List<Tensor> list = new ArrayList<>();
        for (Map.Entry<String, Tensor> e : tensors.entrySet()) {
            list.add(e.getValue().name().equals(e.getKey()) ? e.getValue() : e.getValue().renamed(e.getKey()));
        }
        return encode(list, metadata);
    }

    /**
     * A safetensors file holding {@code tensors} (data laid out in the given order) and {@code metadata}
     * (may be null or empty: then no {@code __metadata__} key is written).
     */
    public static byte[] encode(Collection<Tensor> tensors, Map<String, String> metadata) {
        StringBuilder header = new StringBuilder("{");
        boolean first = true;
        if (metadata != null && !metadata.isEmpty()) {
            header.append(quote(METADATA_KEY)).append(":{");
            boolean firstMeta = true;
            for (Map.Entry<String, String> e : metadata.entrySet()) {
                if (e.getKey() == null || e.getValue() == null) {
                    throw new IllegalArgumentException("metadata keys and values must not be null");
                }
                if (!firstMeta) {
                    header.append(',');
                }
                header.append(quote(e.getKey())).append(':').append(quote(e.getValue()));
                firstMeta = false;
            }
            header.append('}');
            first = false;
        }
        long offset = 0;
        java.util.Set<String> seen = new java.util.HashSet<>();
        for (Tensor t : tensors) {
            if (t.name().equals(METADATA_KEY) || !seen.add(t.name())) {
                throw new IllegalArgumentException("duplicate or reserved tensor name " + t.name());
            }
            long end = offset + 4L * t.size();
            if (!first) {
                header.append(',');
            }
            header.append(quote(t.name())).append(":{\"dtype\":\"F32\",\"shape\":[");
            int[] shape = t.shape();
            for (int i = 0; i < shape.length; i++) {
                if (i > 0) {
                    header.append(',');
                }
                header.append(shape[i]);
            }
            header.append("],\"data_offsets\":[").append(offset).append(',').append(end).append("]}");
            offset = end;
            first = false;
        }
        header.append('}');
        byte[] headerBytes = header.toString().getBytes(StandardCharsets.UTF_8);
        int padded = (headerBytes.length + 7) / 8 * 8;
        long total = 8L + padded + offset;
        if (total > Integer.MAX_VALUE - 8) {
            throw new IllegalArgumentException("tensors too large for one buffer: " + total + " bytes");
        }
        ByteBuffer buf = ByteBuffer.allocate((int) total).order(ByteOrder.LITTLE_ENDIAN);
        buf.putLong(padded);
        buf.put(headerBytes);
        for (int i = headerBytes.length; i < padded; i++) {
            buf.put((byte) ' ');
        }
        for (Tensor t : tensors) {
            buf.asFloatBuffer().put(t.data());
            buf.position(buf.position() + 4 * t.size());
        }
        return buf.array();
    }

    /** The tensors and metadata of a safetensors buffer; throws {@link FormatException} when malformed. */
    public static Contents decode(byte[] bytes) {
        if (bytes == null || bytes.length < 8) {
            throw new FormatException("buffer of " + (bytes == null ? 0 : bytes.length)
                    + " bytes is shorter than the 8-byte header length");
        }
        ByteBuffer buf = ByteBuffer.wrap(bytes).order(ByteOrder.LITTLE_ENDIAN);
        long headerLen = buf.getLong(0);
        if (headerLen < 2 || headerLen > MAX_HEADER_BYTES) {
            throw new FormatException("header length " + Long.toUnsignedString(headerLen) + " out of range");
        }
        if (8 + headerLen > bytes.length) {
            throw new FormatException("header length " + headerLen + " exceeds the buffer (" + bytes.length + " bytes)");
        }
        String headerText = new String(bytes, 8, (int) headerLen, StandardCharsets.UTF_8);
        JSONObject header;
        try {
            header = new JSONObject(headerText.trim());
        } catch (JSONException e) {
            throw new FormatException("header is not a JSON object: " + e.getMessage());
        }
        long dataStart = 8 + headerLen;
        long dataLen = bytes.length - dataStart;
        Map<String, String> metadata = new LinkedHashMap<>();
        List<Object[]> entries = new ArrayList<>(); // {name, shape, begin, end}
        Iterator<String> keys = header.keys();
        while (keys.hasNext()) {
            String name = keys.next();
            Object value = header.opt(name);
            if (METADATA_KEY.equals(name)) {
                if (!(value instanceof JSONObject)) {
                    throw new FormatException("__metadata__ must be an object of strings");
                }
                JSONObject meta = (JSONObject) value;
                Iterator<String> metaKeys = meta.keys();
                while (metaKeys.hasNext()) {
                    String k = metaKeys.next();
                    Object v = meta.opt(k);
                    if (!(v instanceof String)) {
                        throw new FormatException("__metadata__ value of " + k + " is not a string");
                    }
                    metadata.put(k, (String) v);
                }
                continue;
            }
            if (!(value instanceof JSONObject)) {
                throw new FormatException("entry " + name + " is not an object");
            }
            JSONObject info = (JSONObject) value;
            String dtype = info.optString("dtype", null);
            if (dtype == null) {
                throw new FormatException("tensor " + name + " has no dtype");
            }
            if (!"F32".equals(dtype)) {
                throw new FormatException("tensor " + name + " has dtype " + dtype + "; only F32 is supported");
            }
            int[] shape = intArray(name, "shape", info.opt("shape"), Integer.MAX_VALUE);
            long[] offsets = longPair(name, info.opt("data_offsets"));
            long size = 1;
            for (int d : shape) {
                size *= d;
                if (size > Integer.MAX_VALUE) {
                    throw new FormatException("tensor " + name + " is too large");
                }
            }
            if (offsets[1] < offsets[0]) {
                throw new FormatException("tensor " + name + " has data_offsets " + offsets[0] + " > " + offsets[1]);
            }
            if (offsets[1] - offsets[0] != 4 * size) {
                throw new FormatException("tensor " + name + " of shape " + Arrays.toString(shape) + " needs "
                        + 4 * size + " bytes but data_offsets span " + (offsets[1] - offsets[0]));
            }
            entries.add(new Object[] {name, shape, offsets[0], offsets[1]});
        }
        entries.sort((a, b) -> (Long) a[2] != (long) (Long) b[2] ? Long.compare((Long) a[2], (Long) b[2])
                : Long.compare((Long) a[3], (Long) b[3]));
        long expected = 0;
        for (Object[] e : entries) {
            if ((Long) e[2] != expected) {
                throw new FormatException("tensor " + e[0] + " starts at " + e[2] + ", expected " + expected
                        + " (offsets must be contiguous)");
            }
            expected = (Long) e[3];
        }
        if (expected != dataLen) {
            throw new FormatException("tensor data covers " + expected + " bytes but the buffer holds " + dataLen);
        }
        List<Tensor> tensors = new ArrayList<>();
        for (Object[] e : entries) {
            int begin = (int) (dataStart + (Long) e[2]);
            int count = (int) (((Long) e[3] - (Long) e[2]) / 4);
            float[] data = new float[count];
            ByteBuffer slice = ByteBuffer.wrap(bytes, begin, count * 4).slice().order(ByteOrder.LITTLE_ENDIAN);
            slice.asFloatBuffer().get(data);
            tensors.add(new Tensor((String) e[0], (int[]) e[1], data));
        }
        return new Contents(tensors, metadata);
    }

    /** A JSON string literal; unlike org.json's quote, '/' is left as is (as every other writer does). */
    static String quote(String s) {
        StringBuilder b = new StringBuilder(s.length() + 2).append('"');
        for (int i = 0; i < s.length(); i++) {
            char c = s.charAt(i);
            switch (c) {
                case '"': b.append("\\\""); break;
                case '\\': b.append("\\\\"); break;
                case '\n': b.append("\\n"); break;
                case '\r': b.append("\\r"); break;
                case '\t': b.append("\\t"); break;
                default:
                    if (c < 0x20) {
                        b.append(String.format("\\u%04x", (int) c));
                    } else {
                        b.append(c);
                    }
            }
        }
        return b.append('"').toString();
    }

    private static int[] intArray(String name, String field, Object value, long max) {
        if (!(value instanceof JSONArray)) {
            throw new FormatException("tensor " + name + " has no " + field + " list");
        }
        JSONArray arr = (JSONArray) value;
        int[] out = new int[arr.length()];
        for (int i = 0; i < out.length; i++) {
            long v = integral(name, field, arr.opt(i));
            if (v < 0 || v > max) {
                throw new FormatException("tensor " + name + " has " + field + " entry " + v + " out of range");
            }
            out[i] = (int) v;
        }
        return out;
    }

    private static long[] longPair(String name, Object value) {
        if (!(value instanceof JSONArray) || ((JSONArray) value).length() != 2) {
            throw new FormatException("tensor " + name + " needs data_offsets [begin, end]");
        }
        JSONArray arr = (JSONArray) value;
        long a = integral(name, "data_offsets", arr.opt(0));
        long b = integral(name, "data_offsets", arr.opt(1));
        if (a < 0 || b < 0) {
            throw new FormatException("tensor " + name + " has negative data_offsets");
        }
        return new long[] {a, b};
    }

    private static long integral(String name, String field, Object v) {
        if (v instanceof Integer || v instanceof Long) {
            return ((Number) v).longValue();
        }
        if (v instanceof Number) {
            double d = ((Number) v).doubleValue();
            if (d == Math.rint(d) && Math.abs(d) < 9.0e15) {
                return (long) d;
            }
        }
        throw new FormatException("tensor " + name + " has a non-integer " + field + " entry " + v);
    }
}
