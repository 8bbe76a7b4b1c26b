package com.fedscale.android;

import static org.junit.Assert.assertEquals;
import static org.junit.Assert.assertFalse;
import static org.junit.Assert.assertTrue;

import org.junit.Test;

/** The policy's decisions for scripted device states. */
public class SchedulingPolicyTest {
    private static final DeviceState.Thermal COOL = DeviceState.Thermal.NONE;

    @Test
    public void jobDefaultsNeedChargerWifiAndBattery() {
        SchedulingPolicy p = SchedulingPolicy.JOB_DEFAULTS;
        ScriptedState s = new ScriptedState();
        assertTrue(p.decide(s).allowed);
        assertEquals("not charging", p.decide(s.set(90, false, true, true, 4096, COOL)).reason);
        assertEquals("metered network", p.decide(s.set(90, true, true, false, 4096, COOL)).reason);
        assertTrue("idle not required by default", p.decide(s.set(90, true, false, true, 4096, COOL)).allowed);
        assertEquals("battery below 20%", p.decide(s.set(19, true, true, true, 4096, COOL)).reason);
        assertTrue(p.decide(s.set(20, true, true, true, 4096, COOL)).allowed);
        assertTrue(p.decide(s.set(100, true, true, true, 4096, DeviceState.Thermal.MODERATE)).allowed);
        assertFalse(p.decide(s.set(100, true, true, true, 4096, DeviceState.Thermal.SEVERE)).allowed);
        assertTrue(p.decide(s.set(100, true, true, true, 4096, DeviceState.Thermal.SEVERE)).reason.contains("thermal"));
        assertEquals("free storage below 100 MiB", p.decide(s.set(100, true, true, true, 99, COOL)).reason);
        // The daemon's rule order: charging is reported first when several fail.
        assertEquals("not charging", p.decide(s.set(5, false, false, false, 0, DeviceState.Thermal.CRITICAL)).reason);
    }

    @Test
    public void appOverridesReplaceDefaults() {
        SchedulingPolicy p = SchedulingPolicy.withOverrides(new SchedulingPolicy.Overrides(false, true, null, 50,
                DeviceState.Thermal.LIGHT, 0L));
        ScriptedState s = new ScriptedState();
        assertTrue(p.decide(s.set(60, false, true, true, 0, COOL)).allowed);
        assertEquals("not idle", p.decide(s.set(60, false, false, true, 0, COOL)).reason);
        assertEquals("metered network", p.decide(s.set(60, false, true, false, 0, COOL)).reason);
        assertEquals("battery below 50%", p.decide(s.set(49, false, true, true, 0, COOL)).reason);
        assertFalse(p.decide(s.set(60, false, true, true, 0, DeviceState.Thermal.MODERATE)).allowed);
        SchedulingPolicy any = SchedulingPolicy.withOverrides(new SchedulingPolicy.Overrides(false, false, false, 0,
                DeviceState.Thermal.SHUTDOWN, 0L));
        assertTrue(any.decide(s.set(0, false, false, false, 0, DeviceState.Thermal.SHUTDOWN)).allowed);
    }

    @Test
    public void abortsWhenTheStateTurnsBadMidTask() {
        SchedulingPolicy p = SchedulingPolicy.JOB_DEFAULTS;
        ScriptedState s = new ScriptedState();
        assertFalse(p.shouldAbort(s));
        s.charging = false; // unplugged
        assertTrue(p.shouldAbort(s));
        s.charging = true;
        s.thermal = DeviceState.Thermal.CRITICAL;
        assertTrue(p.shouldAbort(s));
        s.thermal = COOL;
        s.battery = 10;
        assertTrue(p.shouldAbort(s));
    }
}
