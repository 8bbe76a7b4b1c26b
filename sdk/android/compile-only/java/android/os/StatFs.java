// Compile-only stub: signatures the adapters call, never shipped (see compile-only/README.md).
package android.os;

public class StatFs {
    public StatFs(String path) {
        throw new RuntimeException("compile-only stub");
    }

    public long getAvailableBytes() {
        throw new RuntimeException("compile-only stub");
    }
}
