"""``fedscaled-device``: simulate a fleet of devices against a daemon, or fine-tune on devices.

Exit codes: 0 the job finished (simulate) or fine-tuning ran; 1 the job ended otherwise (failed,
stopped, not found) or the daemon could not be reached; 2 usage errors; 4 ``--max-seconds`` passed
before the job ended.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from fedscaled.device.client import ProtocolError, ServerUnavailable, Stopped
from fedscaled.device.simulator import SIM_BACKENDS, FineTuneConfig, SimConfig, fine_tune_fleet, simulate

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_TIMEOUT = 0, 1, 2, 4


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not a fraction in [0, 1]")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def _add_fleet_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server", required=True, help="daemon base URL, e.g. http://127.0.0.1:29500")
    p.add_argument("--ca-file", type=Path, metavar="PEM",
                   help="for an https:// --server: trust the CA certificate(s) in this file (default: the "
                        "system's CAs)")
    p.add_argument("--job", required=True, help="job name (the {job} of /v1/jobs/{job})")
    p.add_argument("--token", required=True,
                   help="the job's enrollment token (shown by 'fedscalectl status JOB --json')")
    p.add_argument("--devices", type=_positive_int, default=10, help="number of simulated devices (10)")
    p.add_argument("--dataset", choices=("digits", "synthetic"), default="digits",
                   help="local data: scikit-learn digits (model input must hold 8x8x1, 10 classes) "
                        "or generated separable data of the model's shape (digits)")
    p.add_argument("--alpha", type=float, default=0.5,
                   help="Dirichlet concentration of the label split across devices; smaller is more "
                        "non-IID (0.5)")
    p.add_argument("--seed", type=int, default=0, help="seed of data split, device behaviour, training (0)")
    p.add_argument("--input-shape", type=int, nargs="+", metavar="DIM",
                   help="expected model input shape, e.g. 8 8 1; checked against the job's model "
                        "(default: take it from GET /v1/jobs/{job}/model)")
    p.add_argument("--num-classes", type=int,
                   help="expected class count; checked against the job's model (default: from the job)")
    p.add_argument("--samples-per-device", type=_positive_int, default=50,
                   help="training samples per device for --dataset synthetic (50)")
    p.add_argument("--max-seconds", type=float, default=600.0,
                   help="stop after this many seconds even if the job is not over (600)")
    p.add_argument("--concurrency", type=int, default=0,
                   help="HTTP connection limit of the shared session; check-ins are long polls, so "
                        "fewer connections than devices makes devices queue (0: one per device)")
    p.add_argument("--checkin-timeout", type=float, default=60.0,
                   help="client timeout of a check-in, at least the job's checkin_wait + 15 s (60)")
    p.add_argument("--backoff-base", type=float, default=1.0,
                   help="first retry delay after a network error or 5xx, doubling (1)")
    p.add_argument("--backoff-cap", type=float, default=60.0, help="longest retry delay (60)")
    p.add_argument("--per-device-cache", action="store_true",
                   help="give every device its own model cache (default: one shared cache; devices "
                        "still revalidate with If-None-Match)")
    p.add_argument("--credentials", type=Path,
                   help="JSON file of device ids and tokens: read to resume enrollments, written "
                        "(mode 0600) at the end")
    p.add_argument("--backend", choices=SIM_BACKENDS, default="jax",
                   help="engine the devices train and test with: jax (the reference trainer), tflite (LiteRT "
                        "running the job's .tflite artifact), mnn (MNN running its .mnn artifact), or mixed "
                        "(devices take tflite, mnn and jax in turn) (jax)")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    p.add_argument("-v", "--verbose", action="count", default=0, help="log more (-v info, -vv debug)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``fedscaled-device``."""
    parser = argparse.ArgumentParser(
        prog="fedscaled-device",
        description="Reference device runtime: simulate many devices talking protocol v1 to a "
                    "fedscaled daemon over HTTP, or fine-tune the global model on-device.",
        epilog="exit codes: 0 job finished / fine-tune done, 1 job failed or stopped or daemon "
               "unreachable, 2 usage error, 4 --max-seconds passed first")
    sub = parser.add_subparsers(dest="command", required=True)
    sim = sub.add_parser(
        "simulate", help="run N devices until the job is over",
        description="Run N devices concurrently in one process, each with its own data shard; they "
                    "enroll, check in, train or test, and upload until the job is over or "
                    "--max-seconds pass. Prints a one-line summary.")
    _add_fleet_options(sim)
    sim.add_argument("--dropout", type=_fraction, default=0.0,
                     help="probability that a device vanishes with a training task: it trains but "
                          "never uploads, and is gone until the task's deadline (0.0)")
    sim.add_argument("--hostile", type=_fraction, default=0.0,
                     help="fraction of devices that poison their uploads (sign-flipped, scaled weights and an "
                          "inflated sample count), to try the job's aggregator (0.0)")
    sim.add_argument("--slow", type=_fraction, default=0.0,
                     help="probability that a device is slow: it sleeps before uploading (0.0)")
    sim.add_argument("--slow-devices", type=_fraction, default=0.0,
                     help="fraction of devices that are slow phones: every training task of theirs takes "
                          "--slow-seconds longer (a fixed, seeded set, as Oort's selection can learn) (0.0)")
    sim.add_argument("--slow-seconds", type=float, nargs=2, default=(5.0, 15.0), metavar=("MIN", "MAX"),
                     help="how long a slow device sleeps, uniform in [MIN, MAX] (5 15)")
    sim.add_argument("--offline", type=_fraction, default=0.0,
                     help="fraction of check-ins at which a device reports itself unplugged and busy "
                          "(ineligible) (0.0)")
    ft = sub.add_parser(
        "fine-tune", help="personalize the latest global model on each device, upload nothing",
        description="Each device downloads the latest global model, trains it on 80%% of its own "
                    "training shard and reports accuracy on the other 20%% before and after.")
    _add_fleet_options(ft)
    ft.add_argument("--lr", type=float, default=0.05, help="learning rate (0.05)")
    ft.add_argument("--local-steps", type=_positive_int, default=20, help="SGD steps (20)")
    ft.add_argument("--batch-size", type=_positive_int, default=16, help="batch size (16)")
    ft.add_argument("--epochs", type=int, default=0, help="full passes instead of steps when > 0 (0)")
    return parser


def _sim_config(args: argparse.Namespace, **extra: object) -> SimConfig:
    return SimConfig(
        server=args.server, job=args.job, enrollment_token=args.token, devices=args.devices,
        dataset=args.dataset, alpha=args.alpha, seed=args.seed,
        input_shape=tuple(args.input_shape) if args.input_shape else None,
        num_classes=args.num_classes, samples_per_device=args.samples_per_device,
        max_seconds=args.max_seconds, concurrency=args.concurrency,
        checkin_timeout=args.checkin_timeout, backoff_base=args.backoff_base,
        backoff_cap=args.backoff_cap, shared_cache=not args.per_device_cache,
        credentials=args.credentials, backend=args.backend, ca_file=args.ca_file, **extra)  # type: ignore[arg-type]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``fedscaled-device``; returns the exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=[logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)],
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "simulate":
            cfg = _sim_config(args, dropout=args.dropout, hostile=args.hostile, slow=args.slow,
                              slow_devices=args.slow_devices,
                              slow_seconds=tuple(args.slow_seconds), offline=args.offline)
            summary = asyncio.run(simulate(cfg))
            print(json.dumps(summary.to_json()) if args.json else f"fedscaled-device: {summary.line()}")
            if summary.done_state == "finished":
                return EXIT_OK
            return EXIT_TIMEOUT if summary.done_state is None else EXIT_FAILED
        ft_cfg = FineTuneConfig(_sim_config(args), learning_rate=args.lr, local_steps=args.local_steps,
                                batch_size=args.batch_size, epochs=args.epochs)
        results = asyncio.run(fine_tune_fleet(ft_cfg))
        n = sum(r.samples for r in results) or 1
        before = sum(r.accuracy_before for r in results) / max(1, len(results))
        after = sum(r.accuracy_after for r in results) / max(1, len(results))
        report = {"devices": len(results), "model_version": results[0].model_version if results else None,
                  "mean_accuracy_before": before, "mean_accuracy_after": after, "samples": n,
                  "backends": sorted({r.backend for r in results})}
        print(json.dumps(report) if args.json else
              f"fedscaled-device: fine-tuned {len(results)} devices on model "
              f"{report['model_version']}: local accuracy {before:.3f} -> {after:.3f}")
        return EXIT_OK
    except ValueError as exc:
        print(f"fedscaled-device: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except Stopped:
        print("fedscaled-device: --max-seconds passed before the devices were ready", file=sys.stderr)
        return EXIT_TIMEOUT
    except (ProtocolError, ServerUnavailable) as exc:
        print(f"fedscaled-device: {exc}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
