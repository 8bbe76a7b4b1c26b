package com.fedscale.android;

import java.io.IOException;

/** Connection errors or 5xx/429 answers persisted through every retry of one request. */
public final class ServerUnavailableException extends IOException {
    private static final long serialVersionUID = 1L;

    public ServerUnavailableException(String message, Throwable cause) {
        super(message, cause);
    }
}
