// Compile-only stub: signatures the adapters call, never shipped (see compile-only/README.md).
package android.os;

public final class PowerManager {
    public static final int THERMAL_STATUS_NONE = 0;
    public static final int THERMAL_STATUS_LIGHT = 1;
    public static final int THERMAL_STATUS_MODERATE = 2;
    public static final int THERMAL_STATUS_SEVERE = 3;
    public static final int THERMAL_STATUS_CRITICAL = 4;
    public static final int THERMAL_STATUS_EMERGENCY = 5;
    public static final int THERMAL_STATUS_SHUTDOWN = 6;

    public boolean isInteractive() {
        throw new RuntimeException("compile-only stub");
    }

    public int getCurrentThermalStatus() {
        throw new RuntimeException("compile-only stub");
    }
}
