"""Prebuilt on-device artifacts shipped with the package (prebuilt/<slug>/<backend>/), see docs/mobile.md."""

from pathlib import Path

PREBUILT_DIR = Path(__file__).resolve().parent / "prebuilt"
