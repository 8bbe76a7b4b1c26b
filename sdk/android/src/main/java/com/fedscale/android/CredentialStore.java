package com.fedscale.android;

import java.io.IOException;

/**
 * Where a device keeps its enrollment (device id and bearer token) so that it enrolls once per job.
 * {@link FileCredentialStore} keeps it in a private file; an Android app may use EncryptedSharedPreferences
 * or the Keystore instead.
 */
public interface CredentialStore {
    /** A device's identity in one job. */
    final class Credentials {
        public final String deviceId;
        public final String token;

        public Credentials(String deviceId, String token) {
            if (deviceId == null || token == null || deviceId.isEmpty() || token.isEmpty()) {
                throw new IllegalArgumentException("device id and token must be non-empty");
            }
            this.deviceId = deviceId;
            this.token = token;
        }
    }

    /** The stored credentials of ({@code server}, {@code job}), or null when the device is not enrolled. */
    Credentials load(String server, String job) throws IOException;

    /** Store credentials (replacing any earlier ones) for ({@code server}, {@code job}). */
    void save(String server, String job, Credentials credentials) throws IOException;

    /** Forget the credentials of ({@code server}, {@code job}) (after a 401: the token is no longer valid). */
    void clear(String server, String job) throws IOException;
}
