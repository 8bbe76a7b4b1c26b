// Compile-only stub: signatures the adapters call, never shipped (see compile-only/README.md).
package android.net;

public class Network {
    private Network() {
        throw new RuntimeException("compile-only stub");
    }
}
