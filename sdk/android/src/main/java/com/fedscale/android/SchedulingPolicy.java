package com.fedscale.android;

/**
 * When this phone may train: plain logic over a {@link DeviceState}, so that it can be tested with
 * scripted states.
 *
 * <p>The rules are the job's state policy (docs/config.md, "Device eligibility": {@code require_charging},
 * {@code require_idle}, {@code require_unmetered}, {@code min_battery}, with the daemon's defaults
 * {@link #JOB_DEFAULTS}) plus two that only the phone can judge ({@code max_thermal},
 * {@code min_free_storage_mb}); the app's {@link Overrides} (conf.json's {@code "policy"}) replace any of them.
 *
 * <p>The {@link Client} checks {@link #decide} before every check-in and still checks in when it says no
 * (the daemon is told the true state and decides eligibility itself), but never trains or tests while
 * the local policy forbids it. Between train steps it asks {@link #shouldAbort}: a task in progress stops
 * as soon as the state turns bad, and the device then tells the daemon nothing (the round's deadline
 * covers the missing upload).
 */
public final class SchedulingPolicy {
    /** The outcome of {@link #decide}: allowed, or the first rule that failed. */
    public static final class Decision {
        public final boolean allowed;
        /** Why not ({@code "not charging"} …); {@code "ok"} when allowed. */
        public final String reason;

        private Decision(boolean allowed, String reason) {
            this.allowed = allowed;
            this.reason = reason;
        }

        static Decision ok() {
            return new Decision(true, "ok");
        }

        static Decision no(String reason) {
            return new Decision(false, reason);
        }

        @Override
        public String toString() {
            return allowed ? "allowed" : "not allowed: " + reason;
        }
    }

    /** App overrides; a null field keeps the job's (or the default) value. */
    public static final class Overrides {
        public final Boolean requireCharging;
        public final Boolean requireIdle;
        public final Boolean requireUnmetered;
        public final Integer minBattery;
        public final DeviceState.Thermal maxThermal;
        public final Long minFreeStorageMb;

        public Overrides(Boolean requireCharging, Boolean requireIdle, Boolean requireUnmetered, Integer minBattery,
                         DeviceState.Thermal maxThermal, Long minFreeStorageMb) {
            if (minBattery != null && (minBattery < 0 || minBattery > 100)) {
                throw new IllegalArgumentException("min_battery must be in [0, 100], got " + minBattery);
            }
            if (minFreeStorageMb != null && minFreeStorageMb < 0) {
                throw new IllegalArgumentException("min_free_storage_mb must be >= 0, got " + minFreeStorageMb);
            }
            this.requireCharging = requireCharging;
            this.requireIdle = requireIdle;
            this.requireUnmetered = requireUnmetered;
            this.minBattery = minBattery;
            this.maxThermal = maxThermal;
            this.minFreeStorageMb = minFreeStorageMb;
        }

        /** No overrides. */
        public static Overrides none() {
            return new Overrides(null, null, null, null, null, null);
        }
    }

    /** The daemon's job defaults (docs/config.md) and the SDK's thermal and storage floors. */
    public static final SchedulingPolicy JOB_DEFAULTS =
            new SchedulingPolicy(true, false, true, 20, DeviceState.Thermal.MODERATE, 100);

    public final boolean requireCharging;
    public final boolean requireIdle;
    public final boolean requireUnmetered;
    public final int minBattery;
    /** Hottest thermal status at which training may run (inclusive). */
    public final DeviceState.Thermal maxThermal;
    public final long minFreeStorageMb;

    public SchedulingPolicy(boolean requireCharging, boolean requireIdle, boolean requireUnmetered, int minBattery,
                            DeviceState.Thermal maxThermal, long minFreeStorageMb) {
        this.requireCharging = requireCharging;
        this.requireIdle = requireIdle;
        this.requireUnmetered = requireUnmetered;
        this.minBattery = minBattery;
        this.maxThermal = maxThermal;
        this.minFreeStorageMb = minFreeStorageMb;
    }

    /** The job defaults with the app's overrides applied. */
    public static SchedulingPolicy withOverrides(Overrides o) {
        return JOB_DEFAULTS.override(o);
    }

    /** This policy with the non-null fields of {@code o} replacing its own. */
    public SchedulingPolicy override(Overrides o) {
        if (o == null) {
            return this;
        }
        return new SchedulingPolicy(
                o.requireCharging != null ? o.requireCharging : requireCharging,
                o.requireIdle != null ? o.requireIdle : requireIdle,
                o.requireUnmetered != null ? o.requireUnmetered : requireUnmetered,
                o.minBattery != null ? o.minBattery : minBattery,
                o.maxThermal != null ? o.maxThermal : maxThermal,
                o.minFreeStorageMb != null ? o.minFreeStorageMb : minFreeStorageMb);
    }

    /** Whether the phone may train now, and if not the first failing rule (in the daemon's order). */
    public Decision decide(DeviceState s) {
        if (requireCharging && !s.isCharging()) {
            return Decision.no("not charging");
        }
        if (requireUnmetered && !s.isUnmetered()) {
            return Decision.no("metered network");
        }
        if (requireIdle && !s.isIdle()) {
            return Decision.no("not idle");
        }
        if (s.batteryPercent() < minBattery) {
            return Decision.no("battery below " + minBattery + "%");
        }
        if (s.thermal().ordinal() > maxThermal.ordinal()) {
            return Decision.no("thermal status " + s.thermal() + " above " + maxThermal);
        }
        if (s.freeStorageMb() < minFreeStorageMb) {
            return Decision.no("free storage below " + minFreeStorageMb + " MiB");
        }
        return Decision.ok();
    }

    /** Whether a task in progress must stop now (the same rules as {@link #decide}). */
    public boolean shouldAbort(DeviceState s) {
        return !decide(s).allowed;
    }

    @Override
    public String toString() {
        return "SchedulingPolicy{require_charging=" + requireCharging + ", require_idle=" + requireIdle
                + ", require_unmetered=" + requireUnmetered + ", min_battery=" + minBattery + ", max_thermal="
                + maxThermal + ", min_free_storage_mb=" + minFreeStorageMb + "}";
    }
}
