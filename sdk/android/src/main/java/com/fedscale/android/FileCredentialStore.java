package com.fedscale.android;

import java.io.File;
import java.io.IOException;
import java.nio.charset.StandardCharsets;
import java.nio.file.AtomicMoveNotSupportedException;
import java.nio.file.Files;
import java.nio.file.StandardCopyOption;
import java.nio.file.attribute.PosixFilePermissions;
import org.json.JSONException;
import org.json.JSONObject;

/**
 * {@link CredentialStore} in one JSON file, {@code {"<server> <job>": {"device_id", "token"}}}, written
 * atomically (temporary file, then rename) and readable by the owner only (mode 0600 where the file
 * system supports POSIX permissions; on Android, put it in the app's private files directory).
 */
public final class FileCredentialStore implements CredentialStore {
    private final File file;

    public FileCredentialStore(File file) {
        this.file = file;
    }

    /** The file holding the credentials. */
    public File file() {
        return file;
    }

    private static String key(String server, String job) {
        return stripSlash(server) + " " + job;
    }

    private static String stripSlash(String server) {
        return server.endsWith("/") ? server.substring(0, server.length() - 1) : server;
    }

    private JSONObject read() throws IOException {
        if (!file.exists()) {
            return new JSONObject();
        }
        String text = new String(Files.readAllBytes(file.toPath()), StandardCharsets.UTF_8);
        try {
            return text.trim().isEmpty() ? new JSONObject() : new JSONObject(text);
        } catch (JSONException e) {
            throw new IOException("credential file " + file + " is corrupt: " + e.getMessage(), e);
        }
    }

    @Override
    public synchronized Credentials load(String server, String job) throws IOException {
        JSONObject entry = read().optJSONObject(key(server, job));
        if (entry == null) {
            return null;
        }
        String id = entry.optString("device_id", "");
        String token = entry.optString("token", "");
        return id.isEmpty() || token.isEmpty() ? null : new Credentials(id, token);
    }

    @Override
    public synchronized void save(String server, String job, Credentials credentials) throws IOException {
        JSONObject all = read();
        try {
            all.put(key(server, job), new JSONObject().put("device_id", credentials.deviceId)
                    .put("token", credentials.token));
        } catch (JSONException e) {
            throw new IOException(e);
        }
        write(all);
    }

    @Override
    public synchronized void clear(String server, String job) throws IOException {
        JSONObject all = read();
        if (all.remove(key(server, job)) != null) {
            write(all);
        }
    }

    private void write(JSONObject all) throws IOException {
        File dir = file.getAbsoluteFile().getParentFile();
        if (dir != null && !dir.isDirectory() && !dir.mkdirs()) {
            throw new IOException("cannot create " + dir);
        }
        File tmp = new File(dir, file.getName() + ".tmp");
        Files.write(tmp.toPath(), new byte[0]);
        restrict(tmp);
        Files.write(tmp.toPath(), all.toString().getBytes(StandardCharsets.UTF_8));
        try {
            Files.move(tmp.toPath(), file.toPath(), StandardCopyOption.REPLACE_EXISTING,
                    StandardCopyOption.ATOMIC_MOVE);
        } catch (AtomicMoveNotSupportedException e) {
            Files.move(tmp.toPath(), file.toPath(), StandardCopyOption.REPLACE_EXISTING);
        }
        restrict(file);
    }

    /** Owner read/write only: POSIX 0600 when supported, else java.io.File's owner-only flags. */
    private static void restrict(File f) {
        try {
            Files.setPosixFilePermissions(f.toPath(), PosixFilePermissions.fromString("rw-------"));
        } catch (UnsupportedOperationException | IOException e) {
            f.setReadable(false, false);
            f.setReadable(true, true);
            f.setWritable(false, false);
            f.setWritable(true, true);
        }
    }
}
