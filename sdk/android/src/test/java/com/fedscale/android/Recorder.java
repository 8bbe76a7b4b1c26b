package com.fedscale.android;

import java.util.ArrayList;
import java.util.Collections;
import java.util.List;
import java.util.concurrent.CountDownLatch;
import org.json.JSONObject;

/** A {@link Client.Listener} that records every callback for assertions. */
class Recorder implements Client.Listener {
    final List<String> events = Collections.synchronizedList(new ArrayList<>());
    final List<TaskReport> reports = Collections.synchronizedList(new ArrayList<>());
    final List<Exception> errors = Collections.synchronizedList(new ArrayList<>());
    final List<Exception> fatal = Collections.synchronizedList(new ArrayList<>());
    final List<double[]> waits = Collections.synchronizedList(new ArrayList<>()); // {nanoTime, seconds}
    final List<String> enrolled = Collections.synchronizedList(new ArrayList<>());
    final CountDownLatch over = new CountDownLatch(1);
    final CountDownLatch ended = new CountDownLatch(1);
    final CountDownLatch firstWait = new CountDownLatch(1);
    volatile String jobOver;

    @Override
    public void onEnrolled(String deviceId, boolean reused) {
        enrolled.add(deviceId + (reused ? " reused" : " new"));
        events.add("enrolled " + reused);
    }

    @Override
    public void onTaskStarted(String kind, JSONObject task) {
        events.add("started " + kind + " " + task.optString("task_id"));
    }

    @Override
    public void onTaskFinished(TaskReport report) {
        reports.add(report);
        events.add("finished " + report.kind + " " + report.taskId);
    }

    @Override
    public void onTaskAborted(JSONObject task, String reason) {
        events.add("aborted " + reason);
    }

    @Override
    public void onWait(String reason, double seconds) {
        waits.add(new double[] {System.nanoTime(), seconds});
        events.add("wait " + reason);
        firstWait.countDown();
    }

    @Override
    public void onError(Exception error, boolean isFatal) {
        (isFatal ? fatal : errors).add(error);
        events.add((isFatal ? "FATAL " : "error ") + error);
    }

    @Override
    public void onJobOver(String state) {
        jobOver = state;
        events.add("over " + state);
        over.countDown();
    }

    @Override
    public void onStopped() {
        events.add("stopped");
        ended.countDown();
    }

    List<TaskReport> reports(String kind) {
        List<TaskReport> out = new ArrayList<>();
        synchronized (reports) {
            for (TaskReport r : reports) {
                if (r.kind.equals(kind)) {
                    out.add(r);
                }
            }
        }
        return out;
    }
}
