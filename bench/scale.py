"""Scale: how the daemon's figures grow with the fleet, from 10 to 10,000 enrolled devices; one PNG.

For each fleet size n (``Profile.scale_devices``) a fresh daemon child runs one job of a small linear model
(``PARAMS``) with ``p = min(n, MAX_PARTICIPANTS)`` participants per round, so that the aggregation work stays
fixed and only the fleet grows:

1. RSS per enrolled device: after a warm-up (``ENROLL_WARMUP`` enrollments into another job: first-use
   allocations, the client's connections), n devices enroll through ``POST /v1/jobs/{job}/enroll`` (enrollment
   rate limits off, ``ENROLL_CONCURRENCY`` at once); the daemon's ``VmRSS`` growth divided by n. Below about
   1,000 devices the growth is within the allocator's granularity (pages, pymalloc arenas): noise.
2. Check-in latency: every device checks in (at least ``LATENCY_MIN_REQUESTS`` check-ins, round-robin), closed
   loop on ``LATENCY_CONNECTIONS`` keep-alive connections, after a warm-up pass; the devices report that they
   are not charging and the job requires charging, so the daemon answers each at once ``wait/not_eligible``
   after the whole path (auth among n tokens, validation, policy, metrics). p50 and p99 (nearest rank).
3. Round time: rounds of the job, each driven by a wave of the fleet's check-ins. A check-in of an eligible
   device is a long poll held until the next selection, so a wave is sent all at once (one connection per
   device, as a phone fleet does). With n >= 2p the rounds are pipelined as in steady state: while round r
   is open (its p devices training), the other n - p devices check in and are held; once the daemon holds
   them all (its ``fedscaled_waiting_devices`` gauge), round r's p updates are uploaded (``UPLOAD_CONCURRENCY``
   at once); the round closes, the daemon selects round r + 1's p devices from the n - p waiting ones and
   answers every held check-in. The round time runs from the wave's first check-in to the later of "model
   v_r is downloadable" and "every check-in of the wave has its answer": the period of one round. With
   n <= p every device takes part in every round: the wave's check-ins open the round, each device uploads
   as soon as it has its task, and the round time runs to model v_r. The first ``WARMUP_WAVES`` waves (the
   initial model's test phase, round 1 whose aggregation compiles) are a warm-up. At most ``ROUNDS`` measured
   rounds, fewer when ``ROUND_BUDGET`` seconds are spent. (Fleets of p < n < 2p cannot refill the pipeline
   and are refused.) Beside it: the daemon's VmRSS growth per held
   check-in (the first pipelined wave, while the daemon holds it all).
4. Peak RSS: the daemon's ``VmHWM`` at the end (startup, the JAX runtime and the model included).

Every figure's baseline is its value at the smallest fleet of the same run (ratio: how the figure changed
from there; times and bytes are lower-is-better, so a ratio below 1 means it grew). The figure, one PNG of
four panels against the fleet size (log scale), goes to ``docs/img/scale.png`` (smoke runs write
``SMOKE_PLOT`` instead, so that CI does not overwrite the documented one); without matplotlib it is skipped
with a note.
"""

from __future__ import annotations

import asyncio
import gc
import math
import os
import platform
import re
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import (
    ELIGIBLE,
    REPO,
    Daemon,
    Fleet,
    Profile,
    Result,
    bounded,
    fmt,
    linear_job,
    linear_params,
    percentile,
    rss_peak_bytes,
    session,
    workdir,
)
from bench.ingest import make_bodies
from bench.memory import NOT_CHARGING, rss_parts
from bench.openloop import process_cpu_seconds

PARAMS = 100_000
MAX_PARTICIPANTS = 100
ENROLL_WARMUP = 100
ENROLL_CONCURRENCY = 64
LATENCY_CONNECTIONS = 64
LATENCY_MIN_REQUESTS = {"smoke": 200, "quick": 2_000, "full": 5_000}
UPLOAD_CONCURRENCY = 8
# Waves before the measured ones: the test phase of the initial model, then round 1 (its aggregation compiles).
WARMUP_WAVES = 2
ROUNDS = {"smoke": 1, "quick": 3, "full": 5}
# Seconds of measured rounds per fleet size, after which no further round starts (one always runs): the
# 10,000-device waves take seconds each on a shared 2-core machine, and the quick profile must stay short.
ROUND_BUDGET = {"smoke": 30.0, "quick": 30.0, "full": 120.0}
WAIT_TIMEOUT = 120.0  # every wait (pool filled, answers, model) gives up after this many seconds
POLL = 0.005
TEST_RESULT = {"samples": 10, "correct_top1": 3, "correct_top5": 9, "loss_sum": 11.0}
JOB = "scale"
PLOT = REPO / "docs" / "img" / "scale.png"
SMOKE_PLOT = Path(tempfile.gettempdir()) / "fedscaled-scale-smoke.png"
_WAITING = re.compile(r'^fedscaled_waiting_devices\{job="' + JOB + r'"\}\s+(\S+)', re.M)


@dataclass
class Pending:
    """A task a device was handed and has not yet done."""

    device: int
    kind: str
    task_id: str
    round: int


@dataclass
class Wave:
    """What one wave of check-ins measured (perf_counter times)."""

    started: float
    checkins: int
    latencies: list[float] = field(default_factory=list)
    answers: Counter[str] = field(default_factory=Counter)
    pooled_at: float = float("nan")  # the daemon held every check-in of the wave (pipelined rounds)
    uploaded_at: float = float("nan")  # the gated round's last update was accepted
    model_at: float = float("nan")  # the new model answered 200
    answered_at: float = float("nan")  # the wave's last check-in had its answer
    last_answer: float = 0.0  # the latest answer so far
    daemon_cpu: float = float("nan")  # the daemon's CPU seconds over the wave
    client_cpu: float = float("nan")  # this process's CPU seconds over the wave (the generator's share)
    rss_end: int = 0  # the daemon's VmRSS after the wave (growing from wave to wave: something is kept)

    @property
    def seconds(self) -> float:
        """First check-in to the later of the new model and the last answer."""
        return max(self.model_at, self.answered_at) - self.started


class _Driver:
    """One fleet of one job on one daemon: enrollment, the latency loop and the rounds."""

    def __init__(self, daemon: Daemon, n: int, participants: int, bodies: list[bytes]) -> None:
        self.daemon = daemon
        self.n = n
        self.p = participants
        self.bodies = bodies
        self.tokens: list[str] = []
        self.first_held: dict[str, int] = {}  # VmRSS and RssAnon while the first pipelined wave was held

    # ------------------------------------------------------------------ enrollment
    async def enroll(self) -> dict[str, float]:
        """Enroll the fleet (after a warm-up into another job); RSS before and after, and the time taken."""
        extra = {"enroll_rate_per_token": 0, "enroll_rate_per_address": 0, "max_devices": 0}
        warm_token = self.daemon.submit(linear_job("warmup", 100, 1, **extra))["enrollment_token"]
        # require_charging: the latency loop's not-charging check-ins are answered at once; the rounds' devices
        # report charging (ELIGIBLE).
        token = self.daemon.submit(linear_job(JOB, PARAMS, self.p, rounds=1_000, require_charging=True,
                                              checkin_wait=WAIT_TIMEOUT, **extra))["enrollment_token"]
        async with session(ENROLL_CONCURRENCY) as s:
            await Fleet(s, self.daemon.url, "warmup").enroll(ENROLL_WARMUP, warm_token, ENROLL_CONCURRENCY)
            before = rss_parts(self.daemon.pid)
            fleet = Fleet(s, self.daemon.url, JOB)
            began = time.perf_counter()
            await fleet.enroll(self.n, token, ENROLL_CONCURRENCY)
            seconds = time.perf_counter() - began
            after = rss_parts(self.daemon.pid)
        self.tokens = fleet.tokens
        return {"enroll_seconds": seconds, "rss_before": before["VmRSS"], "rss_after": after["VmRSS"],
                "rss_per_device": (after["VmRSS"] - before["VmRSS"]) / self.n,
                "anon_per_device": (after.get("RssAnon", 0) - before.get("RssAnon", 0)) / self.n}

    # ------------------------------------------------------------------ check-in latency
    async def latency(self, requests: int) -> list[float]:
        """Seconds of ``requests`` immediately answered check-ins, closed loop on LATENCY_CONNECTIONS."""
        async with session(LATENCY_CONNECTIONS) as s:
            fleet = Fleet(s, self.daemon.url, JOB)

            def one(token: str, out: list[float] | None) -> Callable[[], Awaitable[None]]:
                async def call() -> None:
                    began = time.perf_counter()
                    status, body = await fleet._call("POST", f"/v1/jobs/{JOB}/checkin", token,
                                                     json_body=NOT_CHARGING)
                    if out is not None:
                        out.append(time.perf_counter() - began)
                    if status != 200 or body.get("reason") != "not_eligible":
                        raise RuntimeError(f"check-in answered {status}: {body!r}")
                return call

            # Warm-up: open every connection (a connect would be charged to the first requests' latency).
            await bounded(LATENCY_CONNECTIONS, [one(self.tokens[i % self.n], None)
                                                for i in range(2 * LATENCY_CONNECTIONS)])
            latencies: list[float] = []
            await bounded(LATENCY_CONNECTIONS, [one(self.tokens[i % self.n], latencies) for i in range(requests)])
        return latencies

    # ------------------------------------------------------------------ rounds
    async def _checkin(self, fleet: Fleet, device: int, wave: Wave) -> dict[str, Any]:
        began = time.perf_counter()
        status, body = await fleet._call("POST", f"/v1/jobs/{JOB}/checkin", self.tokens[device], json_body=ELIGIBLE)
        now = time.perf_counter()
        if status != 200:
            raise RuntimeError(f"check-in answered {status}: {body!r}")
        wave.latencies.append(now - began)
        wave.last_answer = max(wave.last_answer, now)
        answer: dict[str, Any] = body
        wave.answers[f"{answer['action']}/{answer.get('reason', '')}".rstrip("/")] += 1
        return answer

    async def _do(self, fleet: Fleet, task: Pending) -> None:
        """Carry out a task: a test result, or the upload of an update."""
        if task.kind == "train":
            await fleet.upload(self.tokens[task.device], task.task_id, self.bodies[task.device % len(self.bodies)])
            return
        status, body = await fleet._call("POST", f"/v1/jobs/{JOB}/tasks/{task.task_id}/result",
                                         self.tokens[task.device], json_body=TEST_RESULT)
        if status != 200:
            raise RuntimeError(f"result answered {status}: {body!r}")

    def _job(self, fleet: Fleet, task: Pending) -> Callable[[], Awaitable[None]]:
        async def call() -> None:
            await self._do(fleet, task)
        return call

    async def _waiting(self, fleet: Fleet) -> int:
        async with fleet.session.get(self.daemon.url + "/metrics") as response:
            match = _WAITING.search(await response.text())
        return int(float(match.group(1))) if match else 0

    async def _wait_model(self, fleet: Fleet, version: int) -> float:
        """perf_counter when model ``version`` first answers 200 (timed to the status, as bench/close.py)."""
        url = f"{self.daemon.url}/v1/jobs/{JOB}/models/{version}"
        headers = {"Authorization": f"Bearer {self.tokens[0]}"}
        deadline = time.perf_counter() + WAIT_TIMEOUT
        while time.perf_counter() < deadline:
            async with fleet.session.get(url, headers=headers) as response:
                now = time.perf_counter()
                ok = response.status == 200
                await response.read()
            if ok:
                return now
            await asyncio.sleep(POLL)
        raise RuntimeError(f"model v{version} not downloadable after {WAIT_TIMEOUT:g} s")

    def _cpu(self) -> tuple[float, float]:
        """CPU seconds so far of the daemon and of this process."""
        return process_cpu_seconds(self.daemon.pid), time.process_time()

    @staticmethod
    def _task(device: int, answer: dict[str, Any]) -> Pending | None:
        if answer["action"] not in ("train", "test"):
            return None
        task = answer["task"]
        return Pending(device, str(answer["action"]), str(task["task_id"]), int(task["round"]))

    async def pipelined_wave(self, held: Fleet, up: Fleet, pending: list[Pending]) -> tuple[Wave, list[Pending]]:
        """n >= 2p: the devices without a task check in and are held; then ``pending`` is done, which ends
        the open phase, and the next round's selection answers the wave. The next round's tasks."""
        busy = {t.device for t in pending}
        idle = [d for d in range(self.n) if d not in busy]
        wave = Wave(time.perf_counter(), len(idle))
        cpu = self._cpu()
        calls = [asyncio.ensure_future(self._checkin(held, d, wave)) for d in idle]
        try:
            deadline = wave.started + WAIT_TIMEOUT
            while await self._waiting(up) < len(idle):
                early = [c for c in calls if c.done()]
                if early:  # an answer before the gate: an error, or the daemon let a held check-in go
                    raise RuntimeError(f"check-in answered before the round closed: {early[0].result()!r}")
                if time.perf_counter() > deadline:
                    raise RuntimeError(f"the daemon did not hold {len(idle)} check-ins within {WAIT_TIMEOUT:g} s")
                await asyncio.sleep(0.02)
            wave.pooled_at = time.perf_counter()
            if not self.first_held:
                self.first_held = rss_parts(self.daemon.pid)
            await bounded(UPLOAD_CONCURRENCY, [self._job(up, t) for t in pending])
            wave.uploaded_at = time.perf_counter()
            trained = [t.round for t in pending if t.kind == "train"]
            model = asyncio.ensure_future(self._wait_model(up, trained[0])) if trained else None
            answers = await asyncio.wait_for(asyncio.gather(*calls), WAIT_TIMEOUT)
            wave.answered_at = time.perf_counter()
            wave.model_at = await model if model is not None else wave.answered_at
        finally:
            for call in calls:
                call.cancel()
        wave.daemon_cpu, wave.client_cpu = (b - a for a, b in zip(cpu, self._cpu(), strict=True))
        wave.rss_end = rss_parts(self.daemon.pid)["VmRSS"]
        tasks = [t for t in (self._task(d, a) for d, a in zip(idle, answers, strict=True)) if t is not None]
        if len(tasks) != self.p:
            raise RuntimeError(f"expected {self.p} tasks from the wave, got {dict(wave.answers)}")
        return wave, tasks

    async def whole_wave(self, held: Fleet, up: Fleet) -> Wave:
        """n <= p: every device checks in, the phase opens with all of them, each does its task at once."""
        wave = Wave(time.perf_counter(), self.n)
        cpu = self._cpu()
        gate = asyncio.Semaphore(UPLOAD_CONCURRENCY)
        rounds: set[int] = set()

        async def device(d: int) -> None:
            task = self._task(d, await self._checkin(held, d, wave))
            if task is None:
                raise RuntimeError(f"device {d} got no task: {dict(wave.answers)}")
            if task.kind == "train":
                rounds.add(task.round)
            async with gate:
                await self._do(up, task)

        await asyncio.wait_for(asyncio.gather(*(device(d) for d in range(self.n))), WAIT_TIMEOUT)
        wave.uploaded_at = time.perf_counter()
        wave.answered_at = wave.last_answer
        wave.model_at = await self._wait_model(up, max(rounds)) if rounds else wave.answered_at
        wave.daemon_cpu, wave.client_cpu = (b - a for a, b in zip(cpu, self._cpu(), strict=True))
        wave.rss_end = rss_parts(self.daemon.pid)["VmRSS"]
        return wave

    async def rounds(self, most: int, budget: float) -> list[Wave]:
        """The measured waves (one per round) after the warm-up waves."""
        waves: list[Wave] = []
        # One connection per held check-in (they are all held at once); uploads and polls on their own.
        async with session(self.n + 8) as s_held, session(UPLOAD_CONCURRENCY + 2) as s_up:
            held, up = Fleet(s_held, self.daemon.url, JOB), Fleet(s_up, self.daemon.url, JOB)
            if self.n <= self.p:
                for _ in range(WARMUP_WAVES):
                    await self.whole_wave(held, up)
                began = time.perf_counter()
                while len(waves) < most and (not waves or time.perf_counter() - began < budget):
                    waves.append(await self.whole_wave(held, up))
                return waves
            # Bootstrap: the first p devices open the test phase of the initial model and keep its tasks
            # (the gate of the first warm-up wave).
            answers = await asyncio.wait_for(
                asyncio.gather(*(self._checkin(held, d, Wave(0.0, 0)) for d in range(self.p))), WAIT_TIMEOUT)
            pending = [t for t in (self._task(d, a) for d, a in enumerate(answers)) if t is not None]
            for _ in range(WARMUP_WAVES):
                _, pending = await self.pipelined_wave(held, up, pending)
            began = time.perf_counter()
            while len(waves) < most and (not waves or time.perf_counter() - began < budget):
                wave, pending = await self.pipelined_wave(held, up, pending)
                waves.append(wave)
        return waves


def _measure(tmp: Path, n: int, profile: Profile, bodies: list[bytes]) -> dict[str, Any]:
    """Every figure at fleet size ``n``, on a fresh daemon (stopped also on error)."""
    participants = min(n, MAX_PARTICIPANTS)
    if participants < n < 2 * participants:
        raise ValueError(f"scale_devices: {n} devices cannot refill rounds of {participants} (use <= "
                         f"{MAX_PARTICIPANTS} or >= {2 * MAX_PARTICIPANTS})")
    daemon = Daemon(tmp, f"n{n}")
    gc_was = gc.isenabled()
    try:
        daemon.start()
        driver = _Driver(daemon, n, participants, bodies)
        # The client's cyclic GC would pause the generator and be charged to the daemon's latency.
        gc.collect()
        gc.disable()
        out: dict[str, Any] = {"n": n, "participants": participants}
        out.update(asyncio.run(driver.enroll()))
        requests = max(n, LATENCY_MIN_REQUESTS.get(profile.name, 2_000))
        latencies = asyncio.run(driver.latency(requests))
        out.update({"checkin_requests": requests, "checkin_p50": percentile(latencies, 50),
                    "checkin_p99": percentile(latencies, 99), "checkin_max": max(latencies)})
        before_rounds = rss_parts(daemon.pid)
        began = time.perf_counter()
        waves = asyncio.run(driver.rounds(ROUNDS.get(profile.name, 3), ROUND_BUDGET.get(profile.name, 60.0)))
        out["rounds_seconds"] = time.perf_counter() - began
        held = [x for w in waves for x in w.latencies]
        pipelined = n > participants
        out.update({
            "rounds": len(waves), "round_seconds": statistics.median(w.seconds for w in waves),
            "all_round_seconds": [w.seconds for w in waves],
            "wave_checkins": waves[0].checkins, "answers": dict(sum((w.answers for w in waves), Counter())),
            "held_p50": percentile(held, 50), "held_p99": percentile(held, 99),
            # pipelined rounds, the parts of a round: the wave's first check-in to the daemon holding them all,
            # then to the open round's last update accepted, then to the wave's last answer (closing the
            # round, selecting the next one from the pool, answering every held device)
            "fill_seconds": [w.pooled_at - w.started for w in waves] if pipelined else [],
            "upload_seconds": [w.uploaded_at - w.pooled_at for w in waves] if pipelined else [],
            "answer_seconds": [w.answered_at - w.uploaded_at for w in waves] if pipelined else [],
            "daemon_cpu_per_checkin": [w.daemon_cpu / w.checkins for w in waves],
            "client_cpu_per_checkin": [w.client_cpu / w.checkins for w in waves],
            "rss_after_waves": [w.rss_end for w in waves],
            "rss_before_rounds": before_rounds["VmRSS"],
            # what the daemon keeps per held (long-polling) check-in: the first pipelined wave's growth
            "held_bytes_per_checkin": (driver.first_held["VmRSS"] - before_rounds["VmRSS"]) / (n - participants)
            if driver.first_held else float("nan"),
            "held_anon_bytes_per_checkin": (driver.first_held.get("RssAnon", 0) - before_rounds.get("RssAnon", 0))
            / (n - participants) if driver.first_held else float("nan"),
            "rss_peak": rss_peak_bytes(daemon.pid), "rss_end": rss_parts(daemon.pid)["VmRSS"]})
        return out
    finally:
        if gc_was:
            gc.enable()
        daemon.stop()


# ---------------------------------------------------------------------------------------------- results
FIGURES: tuple[tuple[str, str, str], ...] = (
    # (key in the measurement, figure name, unit)
    ("rss_per_device", "RSS growth per enrolled device", "B/device"),
    ("round_seconds", "round time (median)", "s"),
    ("checkin_p50", "check-in latency p50", "s"),
    ("checkin_p99", "check-in latency p99", "s"),
    ("rss_peak", "peak RSS", "B"),
)


def results_of(runs: Sequence[dict[str, Any]], plot_note: str, plot_path: Path | None) -> list[Result]:
    """One Result per (figure, fleet size), each against the same figure at the smallest fleet."""
    base = min(runs, key=lambda r: int(r["n"]))
    results: list[Result] = []
    for key, what, unit in FIGURES:
        for run in runs:
            n = int(run["n"])
            params = {k: v for k, v in run.items() if k not in ("answers",)}
            params.update({"answers": run["answers"], "plot": str(plot_path) if plot_path else None})
            notes = [f"fleet {n}, {run['participants']} participants per round"]
            if key == "round_seconds":
                notes.append(f"median of {run['rounds']} rounds, {run['wave_checkins']} check-ins per round; "
                             f"held check-ins answered in p50 {run['held_p50']:.3g} s, p99 {run['held_p99']:.3g} s")
            elif key.startswith("checkin"):
                notes.append(f"{run['checkin_requests']} immediate 'not eligible' answers, closed loop on "
                             f"{LATENCY_CONNECTIONS} connections")
            elif key == "rss_per_device" and n < 1_000:
                notes.append("below ~1,000 devices the growth is within allocator granularity")
            if plot_note:
                notes.append(plot_note)
            results.append(Result(f"scale {what} n={n}", float(run[key]), unit, f"same figure at n={base['n']}",
                                  float(base[key]), lower_is_better=True, params=params, notes="; ".join(notes)))
    return results


# ---------------------------------------------------------------------------------------------- the plot
def plot(runs: Sequence[dict[str, Any]], path: Path, profile: Profile) -> str:
    """Draw the four panels into ``path``; a note when matplotlib is missing (then nothing is drawn)."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display: the non-interactive backend
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError as exc:
        return f"plot skipped: matplotlib not importable ({exc})"
    ordered = sorted(runs, key=lambda r: int(r["n"]))
    xs = [int(r["n"]) for r in ordered]

    def ys(key: str, scale: float = 1.0) -> list[float]:
        return [float(r[key]) * scale for r in ordered]

    fig, axes = plt.subplots(2, 2, figsize=(10, 7), dpi=100, sharex=True)
    panels = (
        (axes[0][0], "Round time (median, s)", [("round", ys("round_seconds"), "o-")]),
        (axes[0][1], "Check-in latency (ms)", [("p50", ys("checkin_p50", 1e3), "o-"),
                                               ("p99", ys("checkin_p99", 1e3), "s-")]),
        (axes[1][0], "RSS growth per enrolled device (bytes)", [("RSS", ys("rss_per_device"), "o-")]),
        (axes[1][1], "Peak RSS (MB)", [("VmHWM", ys("rss_peak", 1e-6), "o-")]),
    )
    for ax, title, series in panels:
        for label, values, style in series:
            ax.plot(xs, values, style, label=label)
            for x, y in zip(xs, values, strict=True):
                ax.annotate(fmt(y), (x, y), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
        ax.set_title(title, fontsize=11)
        ax.set_xscale("log")
        ax.grid(True, alpha=0.3)
        highest = max((v for _, values, _ in series for v in values if math.isfinite(v)), default=1.0)
        ax.set_ylim(0, highest * 1.18 or 1.0)  # from zero (growth reads true), room for the value labels
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # only the measured sizes are labelled
        if len(series) > 1:
            ax.legend(fontsize=9)
    for ax in axes[1]:
        ax.set_xlabel("enrolled devices (log scale)")
        ax.set_xticks(xs, [f"{x:,}" for x in xs])
    p = ordered[0]["participants"], ordered[-1]["participants"]
    fig.suptitle(f"fedscaled scale curve: {p[0]}-{p[1]} participants per round, {linear_params(PARAMS):,}-param "
                 f"model\n{platform.machine()}, {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d')}, "
                 f"profile {profile.name}", fontsize=12)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return ""


def run(profile: Profile) -> list[Result]:
    """The scale curve: per fleet size, RSS per device, round time, check-in p50/p99, peak RSS; the PNG."""
    bodies = make_bodies(PARAMS)
    runs: list[dict[str, Any]] = []
    with workdir("scale") as tmp:
        for n in sorted(profile.scale_devices):
            runs.append(_measure(tmp, n, profile, bodies))
    path = SMOKE_PLOT if profile.name == "smoke" else PLOT
    note = plot(runs, path, profile)
    return results_of(runs, note, None if note else path)
