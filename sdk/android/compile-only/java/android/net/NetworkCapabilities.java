// Compile-only stub: signatures the adapters call, never shipped (see compile-only/README.md).
package android.net;

public final class NetworkCapabilities {
    public static final int NET_CAPABILITY_NOT_METERED = 11;

    public boolean hasCapability(int capability) {
        throw new RuntimeException("compile-only stub");
    }
}
