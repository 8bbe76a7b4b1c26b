// Compile-only stub: signatures the adapters call, never shipped (see compile-only/README.md).
package android.content;

import java.io.File;

public abstract class Context {
    public static final String BATTERY_SERVICE = "batterymanager";
    public static final String CONNECTIVITY_SERVICE = "connectivity";
    public static final String POWER_SERVICE = "power";

    public abstract Object getSystemService(String name);

    public abstract Context getApplicationContext();

    public abstract File getFilesDir();
}
