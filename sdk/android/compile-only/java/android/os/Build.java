// Compile-only stub: signatures the adapters call, never shipped (see compile-only/README.md).
package android.os;

public class Build {
    public static class VERSION {
        /** Not a compile-time constant on Android either: read at run time. */
        public static final int SDK_INT = stub();

        private static int stub() {
            throw new RuntimeException("compile-only stub");
        }
    }

    public static class VERSION_CODES {
        public static final int Q = 29;
    }
}
