package com.fedscale.android;

/** A {@link DeviceState} a test sets field by field (defaults: a phone on the charger, Wi-Fi, idle, cool). */
final class ScriptedState implements DeviceState {
    volatile int battery = 100;
    volatile boolean charging = true;
    volatile boolean idle = true;
    volatile boolean unmetered = true;
    volatile long freeMb = 4096;
    volatile Thermal thermal = Thermal.NONE;

    ScriptedState set(int battery, boolean charging, boolean idle, boolean unmetered, long freeMb, Thermal thermal) {
        this.battery = battery;
        this.charging = charging;
        this.idle = idle;
        this.unmetered = unmetered;
        this.freeMb = freeMb;
        this.thermal = thermal;
        return this;
    }

    @Override
    public int batteryPercent() {
        return battery;
    }

    @Override
    public boolean isCharging() {
        return charging;
    }

    @Override
    public boolean isIdle() {
        return idle;
    }

    @Override
    public boolean isUnmetered() {
        return unmetered;
    }

    @Override
    public long freeStorageMb() {
        return freeMb;
    }

    @Override
    public Thermal thermal() {
        return thermal;
    }
}
