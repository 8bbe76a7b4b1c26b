"""Entry point of the single ``fedscaled`` binary (PyInstaller, see ``build.spec``).

One file holds the three programs of the package. Which one runs is decided by the name the binary
was invoked under, then by its first argument:

- ``fedscalectl ...`` (a symlink to the binary) or ``fedscaled ctl ...``: the control CLI;
- ``fedscaled-device ...`` (a symlink) or ``fedscaled device ...``: the reference device runtime;
- anything else, e.g. ``fedscaled start ...``: the daemon.

The programs are imported only once chosen, so ``fedscalectl`` does not pay for loading jax.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence

CTL_NAMES = ("fedscalectl", "ctl")
DEVICE_NAMES = ("fedscaled-device", "device")

BINARY_HELP = """\

This binary also contains the control CLI and the device runtime:
  fedscaled ctl COMMAND ...      same as fedscalectl (or symlink the binary as fedscalectl)
  fedscaled device COMMAND ...   same as fedscaled-device (or symlink it as fedscaled-device)
"""


def _ctl_main(argv: list[str]) -> int:
    from fedscaled.ctl.cli import main

    return main(argv)


def _device_main(argv: list[str]) -> int:
    from fedscaled.device.cli import main

    return main(argv)


def _daemon_main(argv: list[str]) -> int:
    from fedscaled.daemon.cli import main

    return main(argv)


def program_name(argv0: str) -> str:
    """The program a path invokes: its base name without a Windows-style ``.exe`` suffix."""
    name = os.path.basename(argv0)
    return name[:-4] if name.lower().endswith(".exe") else name


def choose(argv: Sequence[str]) -> tuple[str, list[str]]:
    """Which program ``argv`` (including ``argv[0]``) asks for, and the arguments to hand it.

    Returns ``("ctl" | "device" | "daemon", args)``.
    """
    name = program_name(argv[0]) if argv else "fedscaled"
    rest = list(argv[1:])
    if name.startswith("fedscalectl"):
        return "ctl", rest
    if name.startswith("fedscaled-device"):
        return "device", rest
    if rest and rest[0] in CTL_NAMES:
        return "ctl", rest[1:]
    if rest and rest[0] in DEVICE_NAMES:
        return "device", rest[1:]
    return "daemon", rest


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatch to the chosen program and return its exit code."""
    program, args = choose(list(sys.argv if argv is None else argv))
    runners: dict[str, Callable[[list[str]], int]] = {
        "ctl": _ctl_main, "device": _device_main, "daemon": _daemon_main,
    }
    wants_help = program == "daemon" and (not args or args[0] in ("-h", "--help"))
    try:
        return runners[program](args)
    finally:
        # argparse exits (SystemExit) after printing --help; add the binary's extra commands either way.
        if wants_help:
            print(BINARY_HELP, end="")


if __name__ == "__main__":
    sys.exit(main())
