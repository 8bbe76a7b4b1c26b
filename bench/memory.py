"""Memory: the daemon's peak RSS for one round of n participants, and its slope in bytes per participant;
and its resident memory per enrolled device.

For each n a fresh daemon child runs one training round of n uploads (bounded concurrency, the same
for every n, so that in-flight bodies weigh the same); its peak RSS (``VmHWM``) is read after the new
model is downloadable. Streaming FedAvg keeps O(model) memory, so the slope must be flat. The baseline
is Flower's ``aggregate`` over the same n updates held in memory (as Flower's server holds every
FitRes before ``aggregate_fit``), run in a child process that reports its ``ru_maxrss``. A second baseline
for the growth: the bare aiohttp server holding as many check-in requests at once as the round held (every
participant's check-in waits for the selection), its anonymous RSS growth from the smallest n to the largest.
Target: the growth < 1 x the model.

Per enrolled device: a fresh daemon child, one job without enrollment limits, a warm-up of
``ENROLL_WARMUP`` enrollments (first-use allocations, the client's connections), then N enrollments through
``POST /v1/jobs/{job}/enroll`` (bounded concurrency); the daemon's current RSS (``VmRSS`` and its
anonymous part ``RssAnon``) is read before and after, and the difference divided by N. Then every device
makes one authenticated request (a check-in answered at once: the job requires charging and the devices
are not charging), which adds what the daemon keeps per *active* device. The baseline is the target,
2 KB per device; the per-device figure is the median of ``repeats`` fresh daemons (spread in params).
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np

from bench.common import (
    ELIGIBLE,
    Daemon,
    Fleet,
    Profile,
    Result,
    bounded,
    linear_job,
    linear_params,
    rss_peak_bytes,
    session,
    start_bare,
    stop,
    workdir,
)
from bench.ingest import make_bodies

UPLOAD_CONCURRENCY = 8
GROWTH_TARGET = 1.0  # peak RSS growth from the smallest to the largest round, in models ("Performance, round two")

# Devices enrolled per measurement, by profile name (the common Profile has no field for them).
ENROLL_SIZES = {"smoke": (2_000,), "quick": (10_000, 100_000), "full": (10_000, 100_000)}
ENROLL_REPEATS = {"smoke": 1, "quick": 1, "full": 3}
ENROLL_WARMUP = 1_000
ENROLL_CONCURRENCY = 64
ENROLL_TARGET = 2048.0  # bytes per enrolled device (the target)
NOT_CHARGING = {"battery": 90, "charging": False, "idle": True, "unmetered": True, "free_storage_mb": 1000,
                "num_samples": 50, "backends": ["jax"]}


def rss_parts(pid: int) -> dict[str, int]:
    """Current resident bytes of a process: all (VmRSS), anonymous (RssAnon) and file-backed (RssFile)."""
    parts = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "RssAnon:", "RssFile:")):
            parts[line.split(":")[0]] = int(line.split()[1]) * 1024
    return parts


async def _round(daemon: Daemon, n: int, num_params: int) -> tuple[int, int]:
    """Run one round of ``n`` uploads; (peak RSS before the uploads, peak RSS after the round)."""
    job = f"memory-{n}"
    token = daemon.submit(linear_job(job, num_params, n))["enrollment_token"]
    bodies = make_bodies(num_params)
    async with session(n + 8) as s:
        fleet = Fleet(s, daemon.url, job)
        await fleet.enroll(n, token)
        task_ids = await fleet.get_train_tasks()
        before = rss_peak_bytes(daemon.pid)
        async with session(UPLOAD_CONCURRENCY) as up_session:
            up = Fleet(up_session, daemon.url, job)
            await asyncio.gather(*(up.upload(tok, tid, bodies[i % len(bodies)])
                                   for i, (tok, tid) in enumerate(zip(fleet.tokens, task_ids, strict=True))))
        for _ in range(6000):  # until the round's model is downloadable (at most ~60 s)
            status, _ = await fleet.model(1)
            if status == 200:
                break
            await asyncio.sleep(0.01)
        else:
            raise RuntimeError(f"round of {n} did not close")
    return before, rss_peak_bytes(daemon.pid)


async def _bare_held(url: str, pid: int, n: int) -> int:
    """Anonymous RSS growth of the bare aiohttp server while it holds ``n`` check-ins at once (bounded)."""
    before = rss_parts(pid).get("RssAnon", 0)
    async with session(n + 8) as s:
        async def one(i: int) -> None:
            async with s.post(f"{url}/v1/jobs/bare/held-checkin", json=ELIGIBLE,
                              headers={"Authorization": f"Bearer tok-{i:040d}"}) as response:
                await response.read()

        calls = asyncio.gather(*(one(i) for i in range(n)))
        try:
            for _ in range(3000):  # at most ~60 s for the fleet to be held
                async with s.get(f"{url}/held") as response:
                    if (await response.json())["held"] >= n:
                        break
                await asyncio.sleep(0.02)
            else:
                raise RuntimeError(f"the bare server never held {n} check-ins")
            during = rss_parts(pid).get("RssAnon", 0)
        finally:
            async with s.post(f"{url}/release") as response:
                await response.read()
            await asyncio.wait_for(calls, timeout=60)
    return during - before


def flower_rss(n: int, num_params: int) -> int | None:
    """Peak RSS of a child that holds ``n`` updates and runs Flower's ``aggregate``; None without flwr."""
    out = subprocess.run([sys.executable, "-m", "bench.memory", str(n), str(num_params)], capture_output=True,
                         text=True, timeout=600, check=False)
    if out.returncode == 3:
        return None
    if out.returncode != 0:
        raise RuntimeError(f"Flower memory child failed: {out.stderr[-2000:]}")
    return int(json.loads(out.stdout)["ru_maxrss"])


def _flower_child(n: int, num_params: int) -> int:
    try:
        from flwr.server.strategy.aggregate import aggregate
    except ImportError:
        return 3
    inputs = max(1, num_params // 10)
    base = np.random.default_rng(1).standard_normal(inputs * 10, dtype=np.float32)
    results = [([(base + np.float32(i)).reshape(inputs, 10), np.zeros(10, np.float32)], 50) for i in range(n)]
    aggregate(results)
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork + exec, so a child of a big parent would
    # report the parent's peak.
    print(json.dumps({"ru_maxrss": rss_peak_bytes(os.getpid()),
                      "ru_maxrss_raw": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
    return 0


async def _enroll(daemon: Daemon, n: int) -> dict[str, float]:
    """Enroll ``n`` devices into a fresh job of ``daemon``, then check each in once; RSS before and after."""
    job = f"enroll-{n}"
    token = daemon.submit(linear_job(job, 100, 1, require_charging=True, checkin_wait=20, enroll_rate_per_token=0,
                                     enroll_rate_per_address=0, max_devices=0))["enrollment_token"]
    async with session(ENROLL_CONCURRENCY) as s:
        warm = Fleet(s, daemon.url, job)
        await warm.enroll(ENROLL_WARMUP, token, ENROLL_CONCURRENCY)
        await _checkin_once(warm)
        before = rss_parts(daemon.pid)
        fleet = Fleet(s, daemon.url, job)
        began = time.perf_counter()
        await fleet.enroll(n, token, ENROLL_CONCURRENCY)
        enroll_s = time.perf_counter() - began
        enrolled = rss_parts(daemon.pid)
        began = time.perf_counter()
        await _checkin_once(fleet)
        checkin_s = time.perf_counter() - began
        checked = rss_parts(daemon.pid)
    out: dict[str, float] = {"enroll_seconds": enroll_s, "checkin_seconds": checkin_s}
    for part in ("VmRSS", "RssAnon", "RssFile"):
        out[f"{part}_before"] = before.get(part, 0)
        out[f"{part}_per_device"] = (enrolled.get(part, 0) - before.get(part, 0)) / n
        out[f"{part}_per_active_device"] = (checked.get(part, 0) - before.get(part, 0)) / n
    return out


async def _checkin_once(fleet: Fleet) -> None:
    """Every device of ``fleet`` checks in once (answered at once: it is not charging, the job requires it)."""
    def one(token: str) -> Callable[[], Awaitable[None]]:
        async def call() -> None:
            status, body = await fleet._call("POST", f"/v1/jobs/{fleet.job}/checkin", token, json_body=NOT_CHARGING)
            if status != 200 or body.get("action") != "wait":
                raise RuntimeError(f"check-in answered {status}: {body!r}")
        return call

    await bounded(ENROLL_CONCURRENCY, [one(t) for t in fleet.tokens])


def enrolled_device_results(profile: Profile) -> list[Result]:
    """Resident bytes per enrolled (and per active) device at each size, against the 2 KB target."""
    results: list[Result] = []
    repeats = ENROLL_REPEATS.get(profile.name, 1)
    with workdir("enroll") as tmp:
        for n in ENROLL_SIZES.get(profile.name, (10_000,)):
            runs: list[dict[str, float]] = []
            for i in range(repeats):
                daemon = Daemon(tmp, f"e{n}-{i}")
                try:
                    daemon.start()
                    runs.append(asyncio.run(_enroll(daemon, n)))
                finally:
                    daemon.stop()
            rate = statistics.median(n / r["enroll_seconds"] for r in runs)
            for key, what in (("VmRSS_per_device", "RSS per enrolled device"),
                              ("RssAnon_per_device", "anon RSS per enrolled device"),
                              ("VmRSS_per_active_device", "RSS per enrolled + checked-in device"),
                              ("RssAnon_per_active_device", "anon RSS per enrolled + checked-in device")):
                values = [r[key] for r in runs]
                value = statistics.median(values)
                r = Result(f"memory {what} N={n}", value, "B/device", "target", ENROLL_TARGET, lower_is_better=True,
                           target="< 2 KB", params={"N": n, "repeats": repeats, "all": values,
                                                    "spread": max(values) - min(values),
                                                    "enroll_per_second": rate, "warmup": ENROLL_WARMUP,
                                                    "concurrency": ENROLL_CONCURRENCY, "runs": runs},
                           notes=f"median of {repeats} fresh daemons; {rate:.0f} enrollments/s through "
                                 f"POST /v1/jobs/{{job}}/enroll")
                r.target_met = value < ENROLL_TARGET
                results.append(r)
    return results


def run(profile: Profile) -> list[Result]:
    """Peak RSS per round size and the slope, against Flower's aggregate; RSS per enrolled device."""
    return round_results(profile) + enrolled_device_results(profile)


def round_results(profile: Profile) -> list[Result]:
    """Peak RSS per round size and the slope, against Flower's aggregate."""
    p = profile.memory_params
    model_bytes = linear_params(p) * 4
    ours: dict[int, int] = {}
    theirs: dict[int, int | None] = {}
    parts: dict[int, dict[str, int]] = {}
    results: list[Result] = []
    with workdir("memory") as tmp:
        for n in profile.memory_participants:
            daemon = Daemon(tmp, f"d{n}")
            try:
                daemon.start()
                before, ours[n] = asyncio.run(_round(daemon, n, p))
                parts[n] = rss_parts(daemon.pid)
            finally:
                daemon.stop()
            theirs[n] = flower_rss(n, p)
            base = theirs[n]
            results.append(Result(f"memory peak RSS n={n} P={linear_params(p):.0e}", ours[n], "B",
                                  "Flower aggregate holding all updates", float("nan") if base is None else base,
                                  lower_is_better=True,
                                  params={"n": n, "P": linear_params(p), "rss_before": before, **parts[n],
                                          "upload_concurrency": UPLOAD_CONCURRENCY},
                                  notes="" if base is not None else "Flower baseline skipped: flwr not installed"))
    lo, hi = min(ours), max(ours)
    slope = (ours[hi] - ours[lo]) / (hi - lo)
    flo, fhi = theirs[lo], theirs[hi]
    fslope = float("nan") if flo is None or fhi is None else (fhi - flo) / (hi - lo)
    growth = ours[hi] - ours[lo]
    r = Result(f"memory slope n={lo}..{hi}", slope, "B/participant", "Flower aggregate slope", fslope,
               lower_is_better=True, target=f"growth < {GROWTH_TARGET:g} x model",
               params={"growth_bytes": growth, "model_bytes": model_bytes, "growth_in_models": growth / model_bytes},
               notes=f"RSS grew {growth / 1e6:.1f} MB from {lo} to {hi} participants "
                     f"({growth / model_bytes:.2f} x the {model_bytes / 1e6:.1f} MB model)")
    r.target_met = growth < GROWTH_TARGET * model_bytes
    results.append(r)
    # Every participant's check-in is held until the round's selection (a long poll): what does aiohttp itself
    # keep per held request? The bare server, holding as many check-ins at once as the round did.
    with workdir("memory-bare") as tmp_bare:
        bare, bare_url = start_bare(tmp_bare, "hold")
        try:
            held_growth = {m: asyncio.run(_bare_held(bare_url, bare.pid, m)) for m in (lo, hi)}
        finally:
            stop(bare)
    framework = held_growth[hi] - held_growth[lo]
    r = Result(f"memory peak RSS growth n={lo}..{hi}", growth, "B", "bare aiohttp holding as many check-ins",
               framework, lower_is_better=True, target=f"< {GROWTH_TARGET:g} x model",
               params={"model_bytes": model_bytes, "bare_anon_growth": held_growth},
               notes=f"ours {growth / (hi - lo) / 1e3:.1f} KB per participant, of which the bare handler needs "
                     f"{framework / (hi - lo) / 1e3:.1f} KB just to hold a check-in's request")
    r.target_met = growth < GROWTH_TARGET * model_bytes
    results.append(r)
    anon = parts[hi].get("RssAnon", 0) - parts[lo].get("RssAnon", 0)
    r = Result(f"memory anon RSS growth n={lo}..{hi}", anon, "B", "Flower aggregate peak growth",
               float("nan") if flo is None or fhi is None else fhi - flo, lower_is_better=True,
               target=f"< {GROWTH_TARGET:g} x model",
               params={"model_bytes": model_bytes,
                       "file_growth": parts[hi].get("RssFile", 0) - parts[lo].get("RssFile", 0)},
               notes="anonymous memory only (RssAnon at the end of the round); file-backed pages (mapped "
                     "libraries, the LMDB map) are clean and reclaimable")
    r.target_met = anon < GROWTH_TARGET * model_bytes
    results.append(r)
    return results


if __name__ == "__main__":
    sys.exit(_flower_child(int(sys.argv[1]), int(sys.argv[2])))
