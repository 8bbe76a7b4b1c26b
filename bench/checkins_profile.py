"""Tools around the check-in benchmark (``bench/checkins.py``), not part of ``python -m bench``.

``python -m bench.checkins --sweep 1000,2000,3000`` prints p50/p99 of both servers (bare aiohttp and ours) at
each rate (where ours crosses 50 ms); ``python -m bench.checkins --profile [--rate R]`` says where the daemon's
time goes at a fixed rate: its GC time (plain and with ``gc.freeze()``), the CPU time of each piece of the
check-in path, what ends in reference cycles, cProfile, and ``perf`` when installed. The load is the
benchmark's: the same check-in requests, fleets and open-loop generator. ``python -m bench.checkins`` hands its
command line to :func:`main` here (``python -m bench.checkins_profile`` is the same); ``--wrap-daemon`` is the
profiled daemon's own entry.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import pstats
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench.checkins import (
    CAPACITY_CONNECTIONS,
    EXPECT,
    MAX_INFLIGHT,
    TIMEOUT,
    Target,
    _describe,
    _enroll,
    _log,
    _median,
    _spread,
)
from bench.common import Daemon, start_bare, stop, wait_for, workdir
from bench.openloop import closed_loop, open_loop


class GcMeter:
    """Counts the cyclic collector's runs and their CPU time per generation (a ``gc.callbacks`` entry)."""

    def __init__(self) -> None:
        self.seconds = [0.0, 0.0, 0.0]
        self.count = [0, 0, 0]
        self._began = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._began = time.thread_time()
        else:
            generation = info["generation"]
            self.seconds[generation] += time.thread_time() - self._began
            self.count[generation] += 1

    def snapshot(self) -> dict[str, Any]:
        """Totals so far, the collector's own statistics, tracked and frozen objects, and (with
        DEBUG_SAVEALL) the types of what it found in reference cycles since the last snapshot."""
        garbage = Counter(type(o).__qualname__ for o in gc.garbage)
        found = len(gc.garbage)
        gc.garbage.clear()
        return {"seconds": list(self.seconds), "count": list(self.count), "tracked": len(gc.get_objects()),
                "frozen": gc.get_freeze_count(), "cpu": time.process_time(), "stats": gc.get_stats(),
                "garbage": found, "garbage_types": garbage.most_common(12)}


# The pieces of the check-in path timed by ``--time-parts`` (module, attribute): label. Each call is wrapped in two
# reads of the thread's CPU clock (a system call each: the overhead is measured and printed); a nested piece's
# time (and its timer overhead) is inside its caller's. CPU time, not wall time: this machine is shared.
PARTS: dict[tuple[str, str], str] = {
    ("fedscaled.server.app", "error_middleware"): "middleware + handler",
    ("fedscaled.server.app", "checkin"): "  check-in handler",
    ("fedscaled.server.app", "_device"): "    auth (_device: sha256 + lookups)",
    ("fedscaled.server.app", "_json"): "    body (_json)",
    ("fedscaled.server.app", "body_deadline"): "      body_deadline (asyncio.timeout_at)",
    ("fedscaled.server.app", "json_object"): "      json_object (read + loads + tree check)",
    ("fedscaled.http_errors", "loads_bounded"): "        loads_bounded",
    ("fedscaled.server.app", "parse_status"): "    parse_status",
    ("fedscaled.jobs.engine", "Engine.checkin"): "    Engine.checkin",
    ("fedscaled.jobs.engine", "Engine._backend_for"): "      Engine._backend_for",
    ("fedscaled.jobs.runner", "JobRunner.checkin"): "      JobRunner.checkin",
    ("aiohttp.web", "json_response"): "    web.json_response",
}


CONTEXT_MANAGERS = {"body_deadline"}  # async context managers: creation, enter and exit are timed


class _TimedContext:
    """An async context manager whose enter and exit add to ``acc`` (one call per exit)."""

    def __init__(self, inner: Any, acc: list[float]) -> None:
        self.inner, self.acc = inner, acc

    async def __aenter__(self) -> Any:
        began = time.thread_time()
        try:
            return await self.inner.__aenter__()
        finally:
            self.acc[0] += time.thread_time() - began

    async def __aexit__(self, *exc: Any) -> Any:
        began = time.thread_time()
        try:
            return await self.inner.__aexit__(*exc)
        finally:
            self.acc[0] += time.thread_time() - began
            self.acc[1] += 1


def _time_parts() -> dict[str, list[float]]:
    """Wrap every piece of :data:`PARTS` with a timer; {label: [seconds, calls]}."""
    import functools
    import importlib
    import inspect

    totals: dict[str, list[float]] = {}
    for (module_name, attribute), label in PARTS.items():
        owner: Any = importlib.import_module(module_name)
        *path, name = attribute.split(".")
        for part in path:
            owner = getattr(owner, part)
        fn = getattr(owner, name)
        acc = totals[label] = [0.0, 0.0]

        def timed(fn: Any, acc: list[float], name: str) -> Any:
            if inspect.iscoroutinefunction(fn):
                @functools.wraps(fn)
                async def run_async(*args: Any, **kwargs: Any) -> Any:
                    began = time.thread_time()
                    try:
                        return await fn(*args, **kwargs)
                    finally:
                        acc[0] += time.thread_time() - began
                        acc[1] += 1
                return run_async
            if name in CONTEXT_MANAGERS:
                @functools.wraps(fn)
                def make(*args: Any, **kwargs: Any) -> _TimedContext:
                    began = time.thread_time()
                    context = _TimedContext(fn(*args, **kwargs), acc)
                    acc[0] += time.thread_time() - began
                    return context
                return make

            @functools.wraps(fn)
            def run(*args: Any, **kwargs: Any) -> Any:
                began = time.thread_time()
                try:
                    return fn(*args, **kwargs)
                finally:
                    acc[0] += time.thread_time() - began
                    acc[1] += 1
            return run

        setattr(owner, name, timed(fn, acc, name))
    return totals


def wrap_daemon(argv: list[str]) -> int:
    """Run ``fedscaled`` in this process: ``--wrap-daemon [--cprofile FILE] [--gc-freeze] [--gc-saveall]
    [--time-parts] [--gc-file FILE] -- start ...``. Once the daemon is ready, ``--gc-freeze`` freezes every
    object alive (``gc.freeze()``) and ``--gc-saveall`` keeps what the collector finds (``DEBUG_SAVEALL``) so
    that its types can be counted; on SIGUSR1 the GC totals (and part timings) are written to ``--gc-file``."""
    import cProfile

    split = argv.index("--")
    parser = argparse.ArgumentParser(prog="python -m bench.checkins_profile --wrap-daemon")
    parser.add_argument("--cprofile", type=Path, default=None)
    parser.add_argument("--gc-freeze", action="store_true")
    parser.add_argument("--gc-file", type=Path, default=None)
    parser.add_argument("--gc-saveall", action="store_true")
    parser.add_argument("--time-parts", action="store_true")
    opts = parser.parse_args(argv[:split])
    daemon_args = argv[split + 1:]
    meter = GcMeter()
    gc.callbacks.append(meter)
    parts = _time_parts() if opts.time_parts else {}
    began = time.perf_counter()
    for _ in range(10_000):
        time.thread_time()
        time.thread_time()
    timer_pair = (time.perf_counter() - began) / 10_000
    if opts.gc_file is not None:
        gc_file: Path = opts.gc_file

        def report(*_: Any) -> None:
            gc_file.with_suffix(".tmp").write_text(json.dumps({**meter.snapshot(), "parts": parts,
                                                               "timer_pair": timer_pair}))
            gc_file.with_suffix(".tmp").rename(gc_file)

        signal.signal(signal.SIGUSR1, report)
    if opts.gc_freeze or opts.gc_saveall:
        run_json = Path(daemon_args[daemon_args.index("--data-dir") + 1]) / "run.json"

        def when_ready() -> None:
            for _ in range(6000):
                if run_json.exists():
                    gc.collect()
                    if opts.gc_freeze:
                        gc.freeze()
                    if opts.gc_saveall:
                        gc.set_debug(gc.DEBUG_SAVEALL)
                    return
                time.sleep(0.05)

        threading.Thread(target=when_ready, daemon=True).start()
    from fedscaled.daemon.cli import main as daemon_main

    profiler = cProfile.Profile() if opts.cprofile is not None else None
    if profiler is not None:
        profiler.enable()
    try:
        return daemon_main(daemon_args)
    finally:
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(str(opts.cprofile))


def _wrapped(tmp: Path, name: str, *options: str) -> Daemon:
    return Daemon(tmp, name, command=[sys.executable, "-m", "bench.checkins_profile", "--wrap-daemon", "--gc-file",
                                      str(tmp / f"{name}.gc"), *options, "--"])


def _gc_window(daemon: Daemon, gc_file: Path) -> dict[str, Any]:
    """Ask a wrapped daemon for its GC totals (SIGUSR1) and read them."""
    gc_file.unlink(missing_ok=True)
    os.kill(daemon.pid, signal.SIGUSR1)
    wait_for(gc_file.exists, 10.0, "GC totals")
    answer: dict[str, Any] = json.loads(gc_file.read_text())
    return answer


def _gc_note(before: dict[str, Any], after: dict[str, Any], answers: int) -> str:
    gc_s = [a - b for a, b in zip(after["seconds"], before["seconds"], strict=True)]
    runs = [a - b for a, b in zip(after["count"], before["count"], strict=True)]
    cpu = after["cpu"] - before["cpu"]
    collected = [a["collected"] - b["collected"] for a, b in zip(after["stats"], before["stats"], strict=True)]
    note = (f"\n      GC {sum(gc_s) / cpu:.0%} of the daemon's CPU ({sum(gc_s) * 1e6 / max(1, answers):.1f} us per "
            f"answer); collections gen0/1/2 {runs[0]}/{runs[1]}/{runs[2]} taking {gc_s[0] * 1e3:.0f}/"
            f"{gc_s[1] * 1e3:.0f}/{gc_s[2] * 1e3:.0f} ms and finding {sum(collected) / max(1, answers):.1f} objects in "
            f"cycles per answer; tracked objects {after['tracked']}, frozen {after['frozen']}")
    if after["garbage"]:
        kinds = ", ".join(f"{name} {count / max(1, answers):.2f}" for name, count in after["garbage_types"])
        note += f"\n      in reference cycles, per answer: {kinds}"
    return note


def _perf_report(pid: int, seconds: float, out: Path) -> str:
    """``perf record`` the daemon for ``seconds``; its report by shared object and by symbol (top lines)."""
    data = out / "perf.data"
    subprocess.run(["perf", "record", "-F", "499", "-g", "-p", str(pid), "-o", str(data), "--", "sleep",
                    str(seconds)], capture_output=True, timeout=seconds + 60, check=False)
    lines = []
    for sort in ("dso", "sym"):
        report = subprocess.run(["perf", "report", "-i", str(data), "--no-children", "--stdio", "--sort", sort,
                                 "-g", "none", "--percent-limit", "1.5"], capture_output=True, text=True,
                                timeout=120, check=False)
        lines += [line for line in report.stdout.splitlines() if line.strip() and not line.startswith("#")][:25]
    return "\n".join(lines)


def _bare_half(bare: Target, devices: int) -> float:
    caps = [closed_loop("127.0.0.1", bare.port, bare.requests[devices], connections=CAPACITY_CONNECTIONS,
                        seconds=2.0, expect=EXPECT, server_pid=bare.pid).rate for _ in range(3)]
    _log(f"bare capacity {statistics.median(caps):.0f}/s (runs {', '.join(f'{c:.0f}' for c in caps)})")
    return 0.5 * statistics.median(caps)


def _parts_note(before: dict[str, Any], after: dict[str, Any], answers: int, cpu_per_answer: float) -> str:
    lines = [f"      {'piece of the check-in path (thread CPU time)':48} {'us/answer':>9} {'share of CPU':>12}"
             f"  (timer overhead {after['timer_pair'] * 1e6:.2f} us per timed call)"]
    for label in PARTS.values():
        spent = after["parts"][label][0] - before["parts"][label][0]
        per = spent / max(1, answers)
        lines.append(f"      {label:48} {per * 1e6:9.1f} {per / cpu_per_answer:12.0%}")
    return "\n" + "\n".join(lines)


def profile_daemon(devices: int, rate: float | None, seconds: float, top: int, repeats: int, keep: Path | None) -> None:
    """Where the daemon's time goes at ``rate`` check-ins/s (default: 50 % of the bare handler's capacity).

    1. Bare, ours, ours with ``gc.freeze()`` after startup and ours with its check-in path timed piece by
       piece, interleaved: each daemon times its own collections (``gc.callbacks``) over the window; CPU per
       answer from /proc.
    2. cProfile of a daemon's main thread (wall clock), and ``perf`` of the plain daemon when installed.
    """
    with workdir("checkins-prof") as tmp:
        bare_proc, bare_url = start_bare(tmp, "checkin")
        wrapped = {"plain": _wrapped(tmp, "plain"), "frozen": _wrapped(tmp, "frozen", "--gc-freeze"),
                   "parts": _wrapped(tmp, "parts", "--time-parts"),
                   "cycles": _wrapped(tmp, "cycles", "--gc-saveall"),
                   "cprofile": _wrapped(tmp, "cprofile", "--cprofile", str(tmp / "daemon.prof"))}
        try:
            job = f"checkins-{devices}"
            bare = Target("bare", bare_url, bare_proc.pid)
            targets: dict[str, Target] = {}
            for name, daemon in wrapped.items():
                daemon.start()
                tokens = asyncio.run(_enroll(daemon, job, devices))
                targets[name] = Target(name, daemon.url, daemon.pid)
                targets[name].add_fleet(devices, job, tokens)
                bare.add_fleet(devices, job, tokens)
            rate = rate or _bare_half(bare, devices)
            _log(f"profiling at {rate:.0f}/s, {devices} devices")
            order = [bare, targets["plain"], targets["frozen"], targets["parts"], targets["cycles"]]
            for rep in range(repeats):
                for t in order if rep % 2 == 0 else list(reversed(order)):
                    maybe = wrapped.get(t.name)
                    gc_file = tmp / f"{t.name}.gc"
                    before = _gc_window(maybe, gc_file) if maybe is not None else {}
                    stats = open_loop("127.0.0.1", t.port, t.requests[devices], rate=rate, seconds=seconds,
                                      expect=EXPECT, max_inflight=MAX_INFLIGHT, timeout=TIMEOUT, server_pid=t.pid)
                    note = ""
                    if maybe is not None:
                        after = _gc_window(maybe, gc_file)
                        note = _gc_note(before, after, stats.ok)
                        if t.name == "parts":
                            note += _parts_note(before, after, stats.ok, stats.server_cpu_per_request)
                    _log(f"open {t.name:6} {rate:.0f}/s: {_describe(stats.summary())}{note}")
            pt = targets["cprofile"]
            stats = open_loop("127.0.0.1", pt.port, pt.requests[devices], rate=rate, seconds=seconds, expect=EXPECT,
                              max_inflight=MAX_INFLIGHT, timeout=TIMEOUT, server_pid=pt.pid)
            _log(f"open cProfiled {rate:.0f}/s: {_describe(stats.summary())}")
            if shutil.which("perf"):
                report: list[str] = []
                plain = wrapped["plain"]
                joiner = _background(lambda: report.append(_perf_report(plain.pid, seconds, tmp)))
                open_loop("127.0.0.1", targets["plain"].port, targets["plain"].requests[devices], rate=rate,
                          seconds=seconds, expect=EXPECT, max_inflight=MAX_INFLIGHT, timeout=TIMEOUT)
                joiner()
                print("perf of the daemon (no cProfile), by shared object, then by symbol:\n" + "".join(report))
        finally:
            for daemon in wrapped.values():
                daemon.stop()  # SIGTERM: the daemon shuts down, and cProfile writes its file
            stop(bare_proc)
        if keep is not None:
            shutil.copy(tmp / "daemon.prof", keep)
        stats_view = pstats.Stats(str(tmp / "daemon.prof"))
        for order_by in ("tottime", "cumulative"):
            print(f"\n=== cProfile of the daemon (wall clock, main thread), top {top} by {order_by} ===")
            stats_view.sort_stats(order_by).print_stats(top)


def sweep(devices: int, rates: Sequence[float], seconds: float, repeats: int) -> None:
    """Open-loop p50/p99 of bare and ours at each rate (interleaved, repeated): where ours crosses 50 ms."""
    with workdir("checkins-sweep") as tmp:
        bare_proc, bare_url = start_bare(tmp, "checkin")
        daemon = Daemon(tmp)
        try:
            daemon.start()
            job = f"checkins-{devices}"
            tokens = asyncio.run(_enroll(daemon, job, devices))
            targets = [Target("bare", bare_url, bare_proc.pid), Target("ours", daemon.url, daemon.pid)]
            for t in targets:
                t.add_fleet(devices, job, tokens)
            runs: dict[tuple[str, float], list[dict[str, float]]] = {}
            for rep in range(repeats):
                for rate in rates:
                    for t in targets if rep % 2 == 0 else list(reversed(targets)):
                        stats = open_loop("127.0.0.1", t.port, t.requests[devices], rate=rate, seconds=seconds,
                                          expect=EXPECT, max_inflight=MAX_INFLIGHT, timeout=TIMEOUT, seed=7 + rep,
                                          server_pid=t.pid)
                        runs.setdefault((t.name, rate), []).append(stats.summary())
                        _log(f"open {t.name} {rate:.0f}/s: {_describe(stats.summary())}")
        finally:
            daemon.stop()
            stop(bare_proc)
    print(f"| rate/s | ours p50 ms | ours p99 ms (runs) | bare p50 ms | bare p99 ms (runs) | ours CPU/req us | "
          f"bare CPU/req us |  ({devices} devices, median of {repeats})")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for rate in rates:
        ours, bare = runs[("ours", rate)], runs[("bare", rate)]
        print(f"| {rate:.0f} | {_median(ours, 'p50') * 1e3:.1f} | {_median(ours, 'p99') * 1e3:.1f} "
              f"({_spread(ours, 'p99')}) | {_median(bare, 'p50') * 1e3:.1f} | {_median(bare, 'p99') * 1e3:.1f} "
              f"({_spread(bare, 'p99')}) | {_median(ours, 'server_cpu_per_request') * 1e6:.0f} | "
              f"{_median(bare, 'server_cpu_per_request') * 1e6:.0f} |")


def _background(fn: Callable[[], None]) -> Callable[[], None]:
    """Run ``fn`` in a thread now; the returned callable joins it."""
    thread = threading.Thread(target=fn, daemon=True)
    thread.start()
    return thread.join


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.checkins --profile | --sweep R1,R2 [--devices N] [--rate R] [--seconds S] [--repeats K]``
    (or ``--wrap-daemon``, the daemon's own entry when profiled)."""
    args_list = sys.argv[1:] if argv is None else argv
    if args_list[:1] == ["--wrap-daemon"]:
        return wrap_daemon(args_list[1:])
    parser = argparse.ArgumentParser(prog="python -m bench.checkins", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", action="store_true", help="profile the daemon under open-loop load")
    parser.add_argument("--sweep", default="", help="comma-separated open-loop rates: p50/p99 of bare and ours at each")
    parser.add_argument("--devices", type=int, default=1_000)
    parser.add_argument("--rate", type=float, default=None, help="check-ins/s (default: 50 %% of bare capacity)")
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--keep", type=Path, default=None, help="copy the cProfile .prof file here")
    args = parser.parse_args(args_list)
    if not (args.profile or args.sweep):
        parser.error("nothing to do: python -m bench --only checkins runs the benchmark; --profile profiles, "
                     "--sweep R1,R2,... finds where the latency grows")
    with contextlib.suppress(KeyboardInterrupt):
        if args.sweep:
            sweep(args.devices, [float(r) for r in args.sweep.split(",")], args.seconds, args.repeats)
        if args.profile:
            profile_daemon(args.devices, args.rate, args.seconds, args.top, args.repeats, args.keep)
    return 0


if __name__ == "__main__":
    sys.exit(main())
