"""Check-ins: requests/s and p50/p99 latency from many enrolled devices, with wrk.

A check-in is a long poll: an eligible device may be held up to ``checkin_wait`` while the pool fills.
To measure request throughput the job requires charging and every device reports ``charging: false``:
the daemon answers at once "wait, not_eligible" after the full request path (bearer-token auth, JSON
validation, job state, eligibility policy, answer). wrk (one thread, ``connections`` connections)
picks a random device token per request from a Lua script. The baseline is a bare aiohttp handler that
reads the body and returns the same JSON, driven by the same wrk command. Without wrk a small aiohttp
load generator is used instead (and says so: it is likely the bottleneck).
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import shutil
import subprocess
import time
from pathlib import Path

import aiohttp

from bench.common import Daemon, Fleet, Profile, Result, linear_job, percentile, session, start_bare, stop, workdir

STATE = {"battery": 90, "charging": False, "idle": True, "unmetered": True, "free_storage_mb": 1000,
         "num_samples": 50, "backends": ["jax"]}

LUA = """
local tokens = {}
for line in io.lines("%(tokens)s") do tokens[#tokens + 1] = line end
local body = '%(body)s'
local path = '%(path)s'
local headers = {["Content-Type"] = "application/json"}
math.randomseed(%(seed)d)
request = function()
  headers["Authorization"] = "Bearer " .. tokens[math.random(#tokens)]
  return wrk.format("POST", path, headers, body)
end
"""

_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}


def _seconds(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if not match:
        raise ValueError(f"cannot read wrk duration {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def parse_wrk(output: str) -> dict[str, float]:
    """Requests/s, p50 and p99 latency (seconds) and error count from ``wrk --latency`` output."""
    rps = re.search(r"Requests/sec:\s+([\d.]+)", output)
    p50 = re.search(r"^\s+50%\s+(\S+)", output, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", output, re.M)
    if not (rps and p50 and p99):
        raise RuntimeError(f"unexpected wrk output:\n{output}")
    errors = sum(int(m) for m in re.findall(r"(?:connect|read|write|timeout) (\d+)", output))
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    return {"rps": float(rps.group(1)), "p50": _seconds(p50.group(1)), "p99": _seconds(p99.group(1)),
            "errors": float(errors + (int(non2xx.group(1)) if non2xx else 0))}


def run_wrk(url: str, path: str, tokens_file: Path, connections: int, seconds: float, script: Path) -> dict[str, float]:
    """One wrk run against ``url + path``."""
    script.write_text(LUA % {"tokens": tokens_file, "body": json.dumps(STATE), "path": path, "seed": 7})
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--latency", "--timeout", "10s",
           "-s", str(script), url + path]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"wrk failed ({out.returncode}): {out.stderr[-2000:]}")
    return parse_wrk(out.stdout)


async def _aiohttp_load(url: str, path: str, tokens: list[str], connections: int, seconds: float) -> dict[str, float]:
    latencies: list[float] = []
    errors = 0
    rng = random.Random(7)
    body = json.dumps(STATE).encode()
    async with session(connections) as s:
        end = time.perf_counter() + seconds

        async def worker() -> None:
            nonlocal errors
            for _ in range(1_000_000):  # bounded; the clock ends it
                if time.perf_counter() >= end:
                    return
                headers = {"Authorization": f"Bearer {rng.choice(tokens)}", "Content-Type": "application/json"}
                began = time.perf_counter()
                try:
                    async with s.post(url + path, data=body, headers=headers) as response:
                        await response.read()
                        if response.status != 200:
                            errors += 1
                except aiohttp.ClientError:
                    errors += 1
                latencies.append(time.perf_counter() - began)

        began = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(connections)))
        elapsed = time.perf_counter() - began
    return {"rps": len(latencies) / elapsed, "p50": percentile(latencies, 50), "p99": percentile(latencies, 99),
            "errors": float(errors)}


def load(url: str, path: str, tokens: list[str], tokens_file: Path, connections: int, seconds: float,
         script: Path) -> dict[str, float]:
    """wrk when installed, else the aiohttp load generator."""
    if shutil.which("wrk"):
        return run_wrk(url, path, tokens_file, connections, seconds, script)
    return asyncio.run(_aiohttp_load(url, path, tokens, connections, seconds))


async def _enroll(daemon: Daemon, job: str, devices: int) -> list[str]:
    token = daemon.submit(linear_job(job, 100, 1, require_charging=True, checkin_wait=20))["enrollment_token"]
    async with session(64) as s:
        fleet = Fleet(s, daemon.url, job)
        await fleet.enroll(devices, token, concurrency=64)
        # One check-in to confirm the answer is the immediate 'not eligible' wait.
        status, answer = await fleet._call("POST", f"/v1/jobs/{job}/checkin", fleet.tokens[0], json_body=STATE)
        if status != 200 or answer.get("reason") != "not_eligible":
            raise RuntimeError(f"check-in answered {status}: {answer!r}")
        return fleet.tokens


def run(profile: Profile) -> list[Result]:
    """Check-in throughput and latency for every fleet size of the profile."""
    results: list[Result] = []
    generator = "wrk -t1" if shutil.which("wrk") else "aiohttp load generator (wrk not installed)"
    c = profile.checkin_connections
    with workdir("checkins") as tmp:
        bare, bare_url = start_bare(tmp, "checkin")
        daemon = Daemon(tmp)
        try:
            daemon.start()
            for devices in profile.checkin_devices:
                job = f"checkins-{devices}"
                began = time.perf_counter()
                tokens = asyncio.run(_enroll(daemon, job, devices))
                enroll_seconds = time.perf_counter() - began
                tokens_file = tmp / f"tokens-{devices}.txt"
                tokens_file.write_text("\n".join(tokens) + "\n")
                path = f"/v1/jobs/{job}/checkin"
                runs = [load(daemon.url, path, tokens, tokens_file, c, profile.checkin_seconds, tmp / "ours.lua")
                        for _ in range(max(1, profile.repeats - 1))]
                ours = max(runs, key=lambda r: r["rps"])
                bruns = [load(bare_url, path, tokens, tokens_file, c, profile.checkin_seconds, tmp / "bare.lua")
                         for _ in range(max(1, profile.repeats - 1))]
                theirs = max(bruns, key=lambda r: r["rps"])
                params = {"devices": devices, "connections": c, "seconds": profile.checkin_seconds,
                          "generator": generator, "errors": ours["errors"], "baseline_errors": theirs["errors"],
                          "enroll_per_second": devices / enroll_seconds}
                label = f"devices={devices} c={c}"
                r = Result(f"check-ins {label}", ours["rps"], "req/s", "bare aiohttp (same JSON)", theirs["rps"],
                           target=">= 0.4", params=params,
                           notes="ineligible devices: immediate not_eligible answer after auth + validation + policy")
                r.target_met = r.ratio >= 0.4
                results.append(r)
                results.append(Result(f"check-in p50 latency {label}", ours["p50"], "s", "bare aiohttp (same JSON)",
                                      theirs["p50"], lower_is_better=True, params=params))
                r = Result(f"check-in p99 latency {label}", ours["p99"], "s", "bare aiohttp (same JSON)",
                           theirs["p99"], lower_is_better=True, target="< 50 ms" if c >= 1000 else "",
                           params=params)
                r.target_met = ours["p99"] < 0.05 if c >= 1000 else None
                results.append(r)
        finally:
            daemon.stop()
            stop(bare)
    return results
