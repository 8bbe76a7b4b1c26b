"""``fedscalectl``: submit, stop, follow and inspect jobs of the local daemon."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fedscaled import __version__
from fedscaled.ctl.client import ControlClient
from fedscaled.ctl.protocol import SYSTEM_SOCKET, default_socket
from fedscaled.errors import EXIT_NOT_RUNNING, EXIT_OK, EXIT_USAGE, FedError

EPILOG = """\
exit codes:
  0  ok
  1  the daemon reported a failure (message on stderr)
  2  usage error or invalid job file
  3  the daemon is not running (no socket, or connection refused)

The socket is --socket, else $FEDSCALED_SOCKET, else the daemon's default
(~/.local/state/fedscaled/control.sock, or /run/fedscaled/control.sock for the systemd service).
"""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (also used to render docs/cli.md)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--socket", type=Path, metavar="PATH", default=argparse.SUPPRESS,
                        help="the daemon's control socket (env FEDSCALED_SOCKET)")
    parser = argparse.ArgumentParser(prog="fedscalectl", parents=[common], epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     description="Control the local fedscaled daemon over its Unix socket.")
    parser.add_argument("--version", action="version", version=f"fedscalectl {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    submit = sub.add_parser("submit", parents=[common], help="submit a job file (FedScale YAML format)")
    submit.add_argument("file", type=Path, metavar="FILE")
    submit.add_argument("--replace", action="store_true", help="replace an ended job of the same name")
    submit.add_argument("--json", action="store_true", help="print the new job's status as JSON")
    stop = sub.add_parser("stop", parents=[common], help="stop a job (devices are told the job is over)")
    stop.add_argument("job", metavar="JOB")
    for name, helptext in (("status", "show all jobs, one line each, or one job in detail"),
                           ("list", "alias of status")):
        status = sub.add_parser(name, parents=[common], help=helptext)
        status.add_argument("job", nargs="?", metavar="JOB")
        status.add_argument("--json", action="store_true", help="print JSON instead of a table")
    logs = sub.add_parser("logs", parents=[common], help="print a job's log")
    logs.add_argument("job", metavar="JOB")
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing new lines until the job ends")
    logs.add_argument("--since", type=int, default=0, metavar="N", help="only lines after sequence number N")
    logs.add_argument("--json", action="store_true", help="print events as JSON lines")
    devices = sub.add_parser("devices", parents=[common], help="list a job's devices and their state")
    devices.add_argument("job", metavar="JOB")
    devices.add_argument("--json", action="store_true", help="print JSON instead of a table")
    revoke = sub.add_parser("revoke", parents=[common],
                            help="revoke a device: its token stops working and it leaves the selection pool")
    revoke.add_argument("job", metavar="JOB")
    revoke.add_argument("device", metavar="DEVICE")
    report = sub.add_parser("report", parents=[common],
                            help="write a job's metrics as CSV and (with matplotlib) a PNG of accuracy and loss")
    report.add_argument("job", metavar="JOB")
    report.add_argument("--out", type=Path, required=True, metavar="DIR", help="folder for metrics.csv and report.png")
    model = sub.add_parser("model", parents=[common], help="write a job's model (a version, or the latest) to a file")
    model.add_argument("job", metavar="JOB")
    model.add_argument("--version", type=int, metavar="N", help="model version (default: the latest)")
    model.add_argument("--out", type=Path, required=True, metavar="FILE", help="where to write it")
    model.add_argument("--format", choices=("safetensors", "npz"), default="safetensors",
                       help="safetensors (the wire format, default) or numpy's npz")
    rotate = sub.add_parser("rotate-token", parents=[common],
                            help="give a job a new enrollment token (the old one stops enrolling devices)")
    rotate.add_argument("job", metavar="JOB")
    rotate.add_argument("--json", action="store_true", help="print the job's status as JSON")
    return parser


def resolve_socket(explicit: Path | None) -> Path:
    """The control socket to use: flag, environment, then the defaults that exist."""
    if explicit is not None:
        return explicit
    env = os.environ.get("FEDSCALED_SOCKET")
    if env:
        return Path(env)
    user_default = default_socket()
    if not user_default.exists() and SYSTEM_SOCKET.exists():
        return SYSTEM_SOCKET
    return user_default


def _accuracy(job: dict[str, Any]) -> str:
    for entry in reversed(job["metrics"]):
        if entry.get("test_accuracy") is not None:
            return f"{100 * entry['test_accuracy']:.1f}%"
    return "-"


def _print_table(jobs: Sequence[dict[str, Any]]) -> None:
    rows = [("NAME", "STATE", "ROUND", "MODEL", "PARTICIPANTS", "ACCURACY", "CREATED")]
    for job in jobs:
        created = time.strftime("%Y-%m-%d %H:%M", time.localtime(job["created_at"]))
        rows.append((job["name"], job["state"], f"{job['round']}/{job['rounds']}", job["model"],
                     str(job["num_participants"]), _accuracy(job), created))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


def _print_job(job: dict[str, Any]) -> None:
    fields = ("name", "state", "mode", "round", "rounds", "model_version", "model", "input_shape",
              "num_classes", "num_participants", "enrolled_devices", "enrollment_token", "reason")
    for field in fields:
        value = job[field]
        if field == "round":
            value = f"{job['round']}/{job['rounds']}"
        elif field == "rounds":
            continue
        print(f"{field + ':':18} {value}")
    print(f"{'created:':18} {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(job['created_at']))}")
    if job["ignored_keys"]:
        print(f"{'ignored keys:':18} {', '.join(job['ignored_keys'])}")
    print(f"{'strategy:':18} {job.get('strategy', 'fed-avg')}")
    privacy = job.get("privacy")
    if privacy:
        epsilon = "unbounded" if privacy["epsilon"] is None else f"{privacy['epsilon']:.3f}"
        print(f"{'privacy spent:':18} epsilon {epsilon} at delta {privacy['delta']:g} over {privacy['rounds']} noised "
              f"rounds (noise multiplier {privacy['noise_multiplier']:g}, clip norm {privacy['clip_norm']:g})")
    live = job.get("live")
    if live:
        print(f"{'waiting devices:':18} {live['waiting']} (eligible to train {live['eligible']['train']}, "
              f"to test {live['eligible']['test']})")
        for kind in ("train", "test"):
            for reason, count in sorted(live["ineligible"][kind].items()):
                print(f"{'':18} {count} may not {kind}: {reason}")
        buffered = live.get("async")
        if buffered:
            print(f"{'async:':18} model v{buffered['model_version']}, {buffered['training']}/"
                  f"{buffered['max_concurrency']} training, buffer {buffered['buffered']}/{buffered['buffer_size']}"
                  + (f", evaluating v{buffered['testing']}" if buffered["testing"] is not None else ""))
        phase = live["phase"]
        if phase:
            print(f"{'phase:':18} round {phase['round']} {phase['kind']}: {phase['chosen']} chosen, "
                  f"{phase['answered']} answered, {phase['accepted']}/{phase['target']} counted, "
                  f"{phase['in_flight']} arriving, deadline in {phase['deadline_in']:g} s")
    if job["metrics"]:
        print("round  participants  train_loss  test_accuracy  test_loss")
        for m in job["metrics"][-10:]:
            acc = f"{m['test_accuracy']:.4f}" if m.get("test_accuracy") is not None else "-"
            tl = f"{m['test_loss']:.4f}" if m.get("test_loss") is not None else "-"
            loss = f"{m['train_loss']:.4f}" if m.get("train_loss") is not None else "-"
            print(f"{m['round']:<6} {m['participants']:<13} {loss:<11} {acc:<14} {tl}")


def _when(stamp: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stamp)) if stamp is not None else "-"


def _print_devices(devices: Sequence[dict[str, Any]]) -> None:
    rows = [("DEVICE", "ENROLLED", "LAST SEEN", "TASKS DONE", "STATE")]
    for device in devices:
        rows.append((device["device_id"], _when(device["enrolled_at"]), _when(device["last_seen"]),
                     str(device["tasks_done"]), device["state"]))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


def _format_event(event: dict[str, Any]) -> str:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(event["ts"]))
    return f"{stamp} {event['level']} {event['message']}"


def run(args: argparse.Namespace) -> int:
    """Execute a parsed command; raises FedError on failure."""
    if args.command == "submit":
        try:
            text = args.file.read_text(encoding="utf-8")
        except FileNotFoundError:
            print(f"fedscalectl: job file {args.file} not found", file=sys.stderr)
            return EXIT_USAGE
        except (OSError, UnicodeDecodeError) as exc:
            print(f"fedscalectl: cannot read job file {args.file}: {exc}", file=sys.stderr)
            return EXIT_USAGE
    client = ControlClient(resolve_socket(getattr(args, "socket", None)))
    client.check_version()
    if args.command == "submit":
        job = client.call("POST", "/v1/jobs", {"text": text, "replace": args.replace,
                                               "source": str(args.file)})
        if args.json:
            print(json.dumps(job, indent=2))
        else:
            print(f"submitted job {job['name']} ({job['rounds']} rounds, model {job['model']}); "
                  f"enrollment token: {job['enrollment_token']}")
            if job["ignored_keys"]:
                print(f"ignored keys: {', '.join(job['ignored_keys'])}")
    elif args.command == "stop":
        job = client.call("POST", f"/v1/jobs/{args.job}/stop")
        print(f"job {job['name']} {job['state']} at round {job['round']}/{job['rounds']}")
    elif args.command in ("status", "list"):
        if args.job:
            job = client.call("GET", f"/v1/jobs/{args.job}")
            print(json.dumps(job, indent=2)) if args.json else _print_job(job)
        else:
            jobs = client.call("GET", "/v1/jobs")["jobs"]
            print(json.dumps(jobs, indent=2)) if args.json else _print_table(jobs)
    elif args.command == "devices":
        devices = client.call("GET", f"/v1/jobs/{args.job}/devices")["devices"]
        print(json.dumps(devices, indent=2)) if args.json else _print_devices(devices)
    elif args.command == "revoke":
        answer = client.call("POST", f"/v1/jobs/{args.job}/devices/{quote(args.device, safe='')}/revoke")
        already = " (it already was)" if answer["already_revoked"] else ""
        print(f"device {answer['device_id']} of job {answer['job']} revoked{already}")
    elif args.command == "rotate-token":
        job = client.call("POST", f"/v1/jobs/{args.job}/rotate-token")
        if args.json:
            print(json.dumps(job, indent=2))
        else:
            print(f"new enrollment token of job {job['name']}: {job['enrollment_token']}")
            print("the old token enrolls no more devices; devices already enrolled keep working")
    elif args.command == "report":
        from fedscaled.ctl import report as reporting

        job = client.call("GET", f"/v1/jobs/{args.job}")
        args.out.mkdir(parents=True, exist_ok=True)
        rows = reporting.write_csv(job, args.out / "metrics.csv")
        print(f"{rows} rounds written to {args.out / 'metrics.csv'}")
        if reporting.write_png(job, args.out / "report.png"):
            print(f"plot written to {args.out / 'report.png'}")
        else:
            print("no plot: matplotlib is not installed (pip install 'fedscaled[report]')", file=sys.stderr)
    elif args.command == "model":
        query = f"?version={args.version}" if args.version is not None else ""
        data, headers = client.fetch(f"/v1/jobs/{args.job}/model{query}")
        if args.format == "npz":
            import io

            import numpy as np
            from safetensors.numpy import load

            buffer = io.BytesIO()
            arrays: dict[str, Any] = dict(load(data))
            np.savez(buffer, **arrays)
            data = buffer.getvalue()
        args.out.write_bytes(data)
        print(f"model version {headers.get('x-model-version', '?')} of job {args.job} written to {args.out} "
              f"({len(data)} bytes, {args.format})")
    elif args.command == "logs":
        query = f"since={args.since}" + ("&follow=1" if args.follow else "")
        for event in client.stream(f"/v1/jobs/{args.job}/logs?{query}"):
            print(json.dumps(event) if args.json else _format_event(event), flush=True)
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``fedscalectl``."""
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except FedError as exc:
        print(f"fedscalectl: {exc.message}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return EXIT_OK
    except BrokenPipeError:
        return EXIT_OK
    except ConnectionResetError:
        print("fedscalectl: the daemon closed the connection (is it shutting down?)", file=sys.stderr)
        return EXIT_NOT_RUNNING


if __name__ == "__main__":
    sys.exit(main())
