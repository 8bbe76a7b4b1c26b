package com.fedscale.android;

import java.util.List;
import org.json.JSONObject;

/**
 * What the {@link Client} did with one task, given to {@link Client.Listener#onTaskFinished}: for a
 * train task the exact weights and metadata it uploaded, for a test task the counts it posted, and the
 * daemon's answer ({@code accepted}, {@code duplicate}).
 */
public final class TaskReport {
    public final String kind;
    public final String taskId;
    public final int round;
    public final int modelVersion;
    public final String backend;
    /** Train: the uploaded weights, in the model's order; null for a test task. */
    public final List<Tensor> weights;
    /** Train: the FedAvg weight uploaded as {@code samples}. */
    public final long samples;
    /** Train: the mean loss uploaded as {@code loss}. */
    public final double loss;
    /** Test: the counts posted; null for a train task. */
    public final TestCounts counts;
    public final double durationSeconds;
    /** The daemon's answer to the upload or result. */
    public final JSONObject answer;

    TaskReport(String kind, String taskId, int round, int modelVersion, String backend, List<Tensor> weights,
               long samples, double loss, TestCounts counts, double durationSeconds, JSONObject answer) {
        this.kind = kind;
        this.taskId = taskId;
        this.round = round;
        this.modelVersion = modelVersion;
        this.backend = backend;
        this.weights = weights;
        this.samples = samples;
        this.loss = loss;
        this.counts = counts;
        this.durationSeconds = durationSeconds;
        this.answer = answer;
    }

    /** Whether the daemon counted it (false for a re-sent duplicate). */
    public boolean accepted() {
        return answer != null && answer.optBoolean("accepted", false);
    }
}
