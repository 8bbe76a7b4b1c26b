"""Build-time-only helpers: export JAX programs to on-device formats (.tflite, .mnn)."""
