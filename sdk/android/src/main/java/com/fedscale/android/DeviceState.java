package com.fedscale.android;

/**
 * What the phone is doing right now: read before every check-in and during training. The Android
 * implementation ({@code com.fedscale.android.adapters.AndroidDeviceState}) reads BatteryManager,
 * ConnectivityManager, PowerManager and StatFs; tests script it.
 */
public interface DeviceState {
    /** Thermal status, as Android's {@code PowerManager.THERMAL_STATUS_*} levels. */
    enum Thermal { NONE, LIGHT, MODERATE, SEVERE, CRITICAL, EMERGENCY, SHUTDOWN }

    /** Battery level, 0..100. */
    int batteryPercent();

    /** Plugged in (AC, USB or wireless). */
    boolean isCharging();

    /** Screen off / device idle (not interactive). */
    boolean isIdle();

    /** On Wi-Fi or another network the user does not pay for by the byte. */
    boolean isUnmetered();

    /** Free storage in MiB where the SDK keeps its cache. */
    long freeStorageMb();

    /** Current thermal status. */
    Thermal thermal();
}
