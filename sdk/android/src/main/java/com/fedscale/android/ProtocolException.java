package com.fedscale.android;

import org.json.JSONObject;

/**
 * An error answer of the daemon: HTTP status plus the machine-readable code of its body
 * {@code {"error": {"code", "message", "details"}}} (docs/errors.md), e.g. {@code 401 unauthorized},
 * {@code 409 wrong_round}, {@code 410 task_expired}. Answers without such a body get the code
 * {@code http_<status>}. Codes the SDK itself raises use status 0 (e.g. {@code hash_mismatch}).
 */
public class ProtocolException extends Exception {
    private static final long serialVersionUID = 1L;

    private final int status;
    private final String code;
    private final String serverMessage;
    private final transient JSONObject details;

    public ProtocolException(int status, String code, String message, JSONObject details) {
        super(status + " " + code + ": " + message);
        this.status = status;
        this.code = code;
        this.serverMessage = message;
        this.details = details == null ? new JSONObject() : details;
    }

    public ProtocolException(int status, String code, String message) {
        this(status, code, message, null);
    }

    /** HTTP status (0 for errors found on the device). */
    public int status() {
        return status;
    }

    /** Machine-readable error code. */
    public String code() {
        return code;
    }

    /** The daemon's human-readable message. */
    public String serverMessage() {
        return serverMessage;
    }

    /** The error's {@code details} object (empty when absent). */
    public JSONObject details() {
        return details;
    }

    /** The exception for an error answer's status and body. */
    public static ProtocolException fromResponse(int status, byte[] body) {
        String text = body == null ? "" : new String(body, java.nio.charset.StandardCharsets.UTF_8);
        try {
            JSONObject err = new JSONObject(text).getJSONObject("error");
            return new ProtocolException(status, err.getString("code"), err.optString("message", ""),
                    err.optJSONObject("details"));
        } catch (org.json.JSONException e) {
            return new ProtocolException(status, "http_" + status, text.length() > 200 ? text.substring(0, 200) : text);
        }
    }
}
