// Compile-only stub: signatures the adapters call, never shipped (see compile-only/README.md).
package android.os;

public class BatteryManager {
    public static final int BATTERY_PROPERTY_CAPACITY = 4;

    public int getIntProperty(int id) {
        throw new RuntimeException("compile-only stub");
    }

    public boolean isCharging() {
        throw new RuntimeException("compile-only stub");
    }
}
