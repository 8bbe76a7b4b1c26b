// Compile-only stub: signatures the adapters call, never shipped (see compile-only/README.md).
// The real enum has more constants (UINT8, INT64, STRING, ...); only those the adapters name are declared.
package org.tensorflow.lite;

public enum DataType {
    FLOAT32,
    INT32
}
