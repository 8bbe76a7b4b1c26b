// Compile-only stub: signatures the adapters call, never shipped (see compile-only/README.md).
package org.tensorflow.lite;

public interface Tensor {
    DataType dataType();

    int[] shape();
}
