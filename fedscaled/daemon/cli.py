"""``fedscaled``: the daemon's command line."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from fedscaled import __version__
from fedscaled.errors import EXIT_USAGE, FedError, InvalidConfig

DESCRIPTION = """\
fedscaled — federated-learning aggregation daemon.

Devices (phones, the simulator) talk HTTP to --listen; operators use `fedscalectl` over the
Unix control socket. Every option can also be set as an environment variable FEDSCALED_<NAME>
(e.g. FEDSCALED_DATA_DIR) or in a YAML file given with --config (keys: data_dir, listen,
control_socket, socket_group, log_level, shutdown_timeout, max_pending_checkins, artifact_dir,
header_timeout, keepalive_timeout, body_timeout, min_body_rate, max_connections, tls_cert, tls_key).
Precedence: flags > environment > config file > defaults.
"""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (also used to render docs/cli.md)."""
    parser = argparse.ArgumentParser(prog="fedscaled", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"fedscaled {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    start = sub.add_parser("start", help="run the daemon in the foreground (Ctrl-C or SIGTERM stops it)",
                           description="Run the daemon in the foreground until SIGTERM or Ctrl-C.")
    start.add_argument("--config", type=Path, metavar="FILE", help="daemon config YAML (env FEDSCALED_CONFIG)")
    start.add_argument("--data-dir", metavar="DIR",
                       help="state directory holding the LMDB store (default: $STATE_DIRECTORY under "
                            "systemd, i.e. /var/lib/fedscaled; else ~/.local/state/fedscaled)")
    start.add_argument("--listen", metavar="HOST:PORT",
                       help="address for devices (default 0.0.0.0:29500, FedScale's port; port 0 picks a "
                            "free one, written to DATA_DIR/run.json)")
    start.add_argument("--control-socket", metavar="PATH",
                       help="Unix socket for fedscalectl (default $RUNTIME_DIRECTORY/control.sock under "
                            "systemd, else DATA_DIR/control.sock); mode 0600")
    start.add_argument("--socket-group", metavar="GROUP",
                       help="make the control socket 0660 and owned by this group")
    start.add_argument("--log-level", choices=("debug", "info", "warning", "error"),
                       help="log verbosity (default info)")
    start.add_argument("--shutdown-timeout", type=float, metavar="SECONDS",
                       help="longest wait for in-flight requests at shutdown (default 10)")
    start.add_argument("--artifact-dir", metavar="DIR",
                       help="on-device artifacts (.tflite, .mnn) built with scripts/build-artifacts.sh for jobs "
                            "whose shapes the package does not ship; searched before the prebuilt ones "
                            "(default DATA_DIR/artifacts)")
    net = start.add_argument_group("device connections (docs/config.md#daemon-configuration)")
    net.add_argument("--header-timeout", type=float, metavar="SECONDS",
                     help="a new connection must send a complete request head within this time (default 10)")
    net.add_argument("--keepalive-timeout", type=float, metavar="SECONDS",
                     help="close a connection that has no complete request this long after its previous "
                          "answer (default 15)")
    net.add_argument("--body-timeout", type=float, metavar="SECONDS",
                     help="longest silence while a request body arrives (default 30)")
    net.add_argument("--min-body-rate", type=int, metavar="BYTES_PER_S",
                     help="a body of N bytes gets BODY_TIMEOUT + N / MIN_BODY_RATE seconds in all "
                          "(default 16384)")
    net.add_argument("--max-connections", type=int, metavar="N",
                     help="open device connections at most; past it 503 overloaded (default: "
                          "max_pending_checkins + 1024, at most the open-file limit - 128)")
    net.add_argument("--tls-cert", metavar="FILE", help="serve devices HTTPS with this PEM certificate (chain)")
    net.add_argument("--tls-key", metavar="FILE", help="the PEM private key of --tls-cert")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``fedscaled``."""
    launched_at = time.monotonic()
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command != "start":
        parser.print_help()
        return EXIT_USAGE
    # Imported here so that `fedscaled --help` stays fast (jax loads with the daemon).
    from fedscaled.daemon.app import run_daemon
    from fedscaled.daemon.config import load_config

    flags = {"data_dir": args.data_dir, "listen": args.listen, "control_socket": args.control_socket,
             "socket_group": args.socket_group, "log_level": args.log_level,
             "shutdown_timeout": args.shutdown_timeout, "artifact_dir": args.artifact_dir,
             "header_timeout": args.header_timeout, "keepalive_timeout": args.keepalive_timeout,
             "body_timeout": args.body_timeout, "min_body_rate": args.min_body_rate,
             "max_connections": args.max_connections, "tls_cert": args.tls_cert, "tls_key": args.tls_key}
    try:
        config = load_config({k: v for k, v in flags.items() if v is not None}, args.config)
    except InvalidConfig as exc:
        print(f"fedscaled: {exc.message}", file=sys.stderr)
        return EXIT_USAGE
    logging.basicConfig(level=config.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        run_daemon(config, launched_at)
    except FedError as exc:
        print(f"fedscaled: {exc.message}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
