package com.fedscale.android.adapters;

import android.content.Context;
import android.net.ConnectivityManager;
import android.net.Network;
import android.net.NetworkCapabilities;
import android.os.BatteryManager;
import android.os.Build;
import android.os.PowerManager;
import android.os.StatFs;
import com.fedscale.android.DeviceState;
import java.io.File;

/**
 * {@link DeviceState} read from Android's system services at each call (no receivers, no permissions
 * beyond {@code ACCESS_NETWORK_STATE}):
 *
 * <ul>
 *   <li>battery: {@code BatteryManager.getIntProperty(BATTERY_PROPERTY_CAPACITY)} and {@code isCharging()};
 *   <li>network: {@code ConnectivityManager.getNetworkCapabilities(getActiveNetwork())} has
 *       {@code NET_CAPABILITY_NOT_METERED} (no active network counts as metered);
 *   <li>idle: {@code !PowerManager.isInteractive()} (screen off);
 *   <li>thermal: {@code PowerManager.getCurrentThermalStatus()} on API 29+, {@code NONE} before;
 *   <li>storage: {@code StatFs(dir).getAvailableBytes()} of the SDK's storage folder.
 * </ul>
 *
 * A reading the platform cannot give answers on the side that keeps the device from training
 * (battery 0, metered, not charging, no free storage), never the permissive one.
 */
public final class AndroidDeviceState implements DeviceState {
    private final Context context;
    private final File storageDir;

    /** Free storage is measured where the SDK keeps its files: {@code context.getFilesDir()}. */
    public AndroidDeviceState(Context context) {
        this(context, context.getFilesDir());
    }

    public AndroidDeviceState(Context context, File storageDir) {
        if (context == null || storageDir == null) {
            throw new IllegalArgumentException("context and storageDir are required");
        }
        this.context = context.getApplicationContext() != null ? context.getApplicationContext() : context;
        this.storageDir = storageDir;
    }

    private BatteryManager battery() {
        return (BatteryManager) context.getSystemService(Context.BATTERY_SERVICE);
    }

    private PowerManager power() {
        return (PowerManager) context.getSystemService(Context.POWER_SERVICE);
    }

    @Override
    public int batteryPercent() {
        BatteryManager bm = battery();
        if (bm == null) {
            return 0;
        }
        int capacity = bm.getIntProperty(BatteryManager.BATTERY_PROPERTY_CAPACITY);
        // getIntProperty answers Integer.MIN_VALUE (or 0 on some devices) when the property is unsupported.
        return capacity < 0 ? 0 : Math.min(capacity, 100);
    }

    @Override
    public boolean isCharging() {
        BatteryManager bm = battery();
        return bm != null && bm.isCharging();
    }

    @Override
    public boolean isIdle() {
        PowerManager pm = power();
        return pm != null && !pm.isInteractive();
    }

    @Override
    public boolean isUnmetered() {
        ConnectivityManager cm = (ConnectivityManager) context.getSystemService(Context.CONNECTIVITY_SERVICE);
        if (cm == null) {
            return false;
        }
        Network network = cm.getActiveNetwork();
        if (network == null) {
            return false;
        }
        NetworkCapabilities caps = cm.getNetworkCapabilities(network);
        return caps != null && caps.hasCapability(NetworkCapabilities.NET_CAPABILITY_NOT_METERED);
    }

    @Override
    public long freeStorageMb() {
        try {
            File dir = storageDir;
            while (dir != null && !dir.exists()) {
                dir = dir.getParentFile();
            }
            if (dir == null) {
                return 0;
            }
            return Math.max(0L, new StatFs(dir.getPath()).getAvailableBytes() / (1024L * 1024L));
        } catch (IllegalArgumentException e) { // StatFs throws it for a path it cannot stat
            return 0;
        }
    }

    @Override
    public Thermal thermal() {
        if (Build.VERSION.SDK_INT < Build.VERSION_CODES.Q) {
            return Thermal.NONE;
        }
        PowerManager pm = power();
        if (pm == null) {
            return Thermal.NONE;
        }
        switch (pm.getCurrentThermalStatus()) {
            case PowerManager.THERMAL_STATUS_NONE:
                return Thermal.NONE;
            case PowerManager.THERMAL_STATUS_LIGHT:
                return Thermal.LIGHT;
            case PowerManager.THERMAL_STATUS_MODERATE:
                return Thermal.MODERATE;
            case PowerManager.THERMAL_STATUS_SEVERE:
                return Thermal.SEVERE;
            case PowerManager.THERMAL_STATUS_CRITICAL:
                return Thermal.CRITICAL;
            case PowerManager.THERMAL_STATUS_EMERGENCY:
                return Thermal.EMERGENCY;
            case PowerManager.THERMAL_STATUS_SHUTDOWN:
                return Thermal.SHUTDOWN;
            default:
                return Thermal.SEVERE; // an unknown, newer level: assume hot
        }
    }
}
