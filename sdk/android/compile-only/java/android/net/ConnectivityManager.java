// Compile-only stub: signatures the adapters call, never shipped (see compile-only/README.md).
package android.net;

public class ConnectivityManager {
    public Network getActiveNetwork() {
        throw new RuntimeException("compile-only stub");
    }

    public NetworkCapabilities getNetworkCapabilities(Network network) {
        throw new RuntimeException("compile-only stub");
    }
}
