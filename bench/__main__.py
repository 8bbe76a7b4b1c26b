"""``python -m bench [--smoke | --quick] [--only kernel,ingest,...]``: run the benchmarks, print the table and
write bench/results/latest.json. See docs/performance.md."""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from bench import checkins, close, disk, ingest, kernel, memory, mobile, scale, startup
from bench.common import PROFILES, RESULTS, Profile, Result, kill_all, table, write_results

BENCHMARKS: dict[str, Callable[[Profile], list[Result]]] = {
    "kernel": kernel.run,
    "ingest": ingest.run,
    "memory": memory.run,
    "checkins": checkins.run,
    "close": close.run,
    "startup": startup.run,
    "mobile": mobile.run,
    "disk": disk.run,
    "scale": scale.run,
}


def main(argv: list[str] | None = None) -> int:
    """Run the selected benchmarks; 0 when every one ran, 1 when any failed (targets are not asserted)."""
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--smoke", action="store_true", help="every benchmark once at the tiniest size (CI, < 60 s)")
    size.add_argument("--quick", action="store_true", help="fewer sizes and repeats (a few minutes)")
    parser.add_argument("--only", default="", help=f"comma-separated subset of: {', '.join(BENCHMARKS)}")
    parser.add_argument("--out", type=Path, default=None,
                        help="results file (default bench/results/latest.json; smoke runs write smoke.json)")
    args = parser.parse_args(argv)
    profile = PROFILES["smoke" if args.smoke else "quick" if args.quick else "full"]
    chosen = [name.strip() for name in args.only.split(",") if name.strip()] or list(BENCHMARKS)
    unknown = [name for name in chosen if name not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(unknown)}")
    out = args.out or RESULTS / ("smoke.json" if args.smoke else "latest.json")
    # Children (daemons, bare servers) run python -m bench.*: make the repository importable for them.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parent.parent),
                                                             os.environ.get("PYTHONPATH", "")]))
    results: list[Result] = []
    failed: list[str] = []
    timings: dict[str, float] = {}
    began = time.perf_counter()
    try:
        for name in chosen:
            started = time.perf_counter()
            print(f"[bench] {name} ({profile.name}) ...", file=sys.stderr, flush=True)
            try:
                results += BENCHMARKS[name](profile)
            except Exception:
                failed.append(name)
                traceback.print_exc()
            finally:
                kill_all()
            timings[name] = round(time.perf_counter() - started, 1)
            print(f"[bench] {name}: {timings[name]} s", file=sys.stderr, flush=True)
    finally:
        kill_all()
    total = round(time.perf_counter() - began, 1)
    meta = {"profile": profile.name, "machine": platform.machine(), "cpus": os.cpu_count(),
            "python": platform.python_version(), "benchmark_seconds": timings, "total_seconds": total,
            "when": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    write_results(results, out, meta)
    print(table(results))
    print(f"\n{len(results)} figures in {total} s ({profile.name}); written to {out}")
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
