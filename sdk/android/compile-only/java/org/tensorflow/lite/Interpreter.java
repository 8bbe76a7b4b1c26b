// Compile-only stub: signatures the adapters call, never shipped (see compile-only/README.md).
// In LiteRT the signature methods are declared by InterpreterApi and implemented in InterpreterImpl, which
// Interpreter extends; a call through an Interpreter reference compiles the same way against either.
package org.tensorflow.lite;

import java.nio.ByteBuffer;
import java.util.Map;

public final class Interpreter implements AutoCloseable {
    public static class Options {
        public Options() {
            throw new RuntimeException("compile-only stub");
        }

        public Options setNumThreads(int numThreads) {
            throw new RuntimeException("compile-only stub");
        }
    }

    public Interpreter(ByteBuffer byteBuffer, Options options) {
        throw new RuntimeException("compile-only stub");
    }

    public void runSignature(Map<String, Object> inputs, Map<String, Object> outputs, String signatureKey) {
        throw new RuntimeException("compile-only stub");
    }

    public String[] getSignatureKeys() {
        throw new RuntimeException("compile-only stub");
    }

    public String[] getSignatureInputs(String signatureKey) {
        throw new RuntimeException("compile-only stub");
    }

    public String[] getSignatureOutputs(String signatureKey) {
        throw new RuntimeException("compile-only stub");
    }

    public Tensor getInputTensorFromSignature(String inputName, String signatureKey) {
        throw new RuntimeException("compile-only stub");
    }

    public Tensor getOutputTensorFromSignature(String outputName, String signatureKey) {
        throw new RuntimeException("compile-only stub");
    }

    @Override
    public void close() {
        throw new RuntimeException("compile-only stub");
    }
}
