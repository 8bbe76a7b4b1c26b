"""Ingest: updates/s and MB/s through the real HTTP upload path, durable (synced LMDB) before each answer.

A real daemon child runs one job per configuration whose round takes exactly the uploads of the run
(num_participants = uploads, overcommitment 1, long deadline). The devices are enrolled, check in
together (the daemon holds them until the pool is full), answer the initial model's test tasks, check in
again and get their training tasks; then every device uploads its weights at once through a client with
at most ``concurrency`` connections, and that is what is timed. The baseline is a bare aiohttp handler
in another process that streams the same bodies and discards them, driven by the same client. Each round
uploads to ours and then to the bare handler; the ratio is the median of the rounds' ratios, with its spread.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np

from bench.common import (
    Daemon,
    Fleet,
    Paired,
    Profile,
    Result,
    linear_job,
    linear_params,
    session,
    start_bare,
    stop,
    workdir,
)
from fedscaled.core import codec
from fedscaled.core.models import build

BODIES = 4  # distinct bodies cycled over the devices (each is a full model: memory stays bounded)


def make_bodies(num_params: int, count: int = BODIES) -> list[bytes]:
    """Distinct upload bodies (trained weights + metadata) for the linear model of ``num_params``.

    Tensors in name order, as the safetensors library (and so the reference device runtime) writes them.
    """
    specs = codec.wire_order(build("linear", (max(1, num_params // 10), 1, 1), 10).specs)
    total = codec.num_params(specs)
    base = np.random.default_rng(1).standard_normal(total, dtype=np.float32) * np.float32(0.01)
    return [codec.encode_model(base + np.float32(i * 1e-3), specs, {"samples": "50", "loss": "0.5"})
            for i in range(count)]


async def _timed_uploads(fleet: Fleet, task_ids: list[str], bodies: list[bytes], concurrency: int) -> float:
    async with session(concurrency) as s:
        up = Fleet(s, fleet.url, fleet.job)
        began = time.perf_counter()
        await asyncio.gather(*(up.upload(tok, tid, bodies[i % len(bodies)])
                               for i, (tok, tid) in enumerate(zip(fleet.tokens, task_ids, strict=True))))
        return time.perf_counter() - began


async def _interleaved(daemon: Daemon, bare_url: str, num_params: int, concurrency: int, uploads: int,
                       rounds: int, bodies: list[bytes]) -> Paired:
    """Seconds of ``rounds`` rounds of uploads to ours, each followed by the same uploads to the bare handler."""
    job = f"ingest-{num_params}-{concurrency}"
    token = daemon.submit(linear_job(job, num_params, uploads))["enrollment_token"]
    paired = Paired([], {BASELINE: []})
    async with session(uploads + 8) as s:
        fleet = Fleet(s, daemon.url, job)
        await fleet.enroll(uploads, token)
        bare = Fleet(s, bare_url, "bare")
        bare.tokens = [f"tok-{i}" for i in range(uploads)]
        # One round of the job per round; with several, a first one warms both up (the fold compiles for the
        # model's shape, the buffers are allocated) and is not counted.
        for index in range(rounds + (rounds > 1)):
            task_ids = await fleet.get_train_tasks()
            ours = await _timed_uploads(fleet, task_ids, bodies, concurrency)
            bare_seconds = await _timed_uploads(bare, [f"t-{i}" for i in range(uploads)], bodies, concurrency)
            if index > 0 or rounds == 1:
                paired.ours.append(ours)
                paired.baselines[BASELINE].append(bare_seconds)
    return paired


BASELINE = "bare aiohttp (read + discard)"
TARGET = 0.5
MIN_ROUNDS = 5


def run(profile: Profile) -> list[Result]:
    """Ingest figures for every (size, concurrency) of the profile."""
    results: list[Result] = []
    with workdir("ingest") as tmp:
        bare, bare_url = start_bare(tmp, "upload")
        daemon = Daemon(tmp)
        try:
            daemon.start()
            for p in profile.ingest_sizes:
                bodies = make_bodies(p)
                for c in profile.ingest_concurrency:
                    uploads = max(c, profile.ingest_uploads)
                    rounds = 1 if profile.name == "smoke" else max(MIN_ROUNDS, profile.repeats)
                    paired = asyncio.run(_interleaved(daemon, bare_url, p, c, uploads, rounds, bodies))
                    ratio, spread = paired.ratio(BASELINE)
                    t_ours, t_bare = paired.median(), paired.median(BASELINE)
                    nbytes = uploads * len(bodies[0])
                    params = {"P": linear_params(p), "concurrency": c, "uploads": uploads, "body_bytes": len(bodies[0]),
                              "rounds": rounds, "seconds": paired.ours, "baseline_seconds": paired.baselines[BASELINE]}
                    r = Result(f"ingest P={linear_params(p):.0e} c={c}", uploads / t_ours, "updates/s", BASELINE,
                               uploads / t_bare, ratio=ratio, ratio_spread=spread, target=f">= {TARGET}",
                               params=params,
                               notes=f"{nbytes / t_ours / 1e6:.0f} MB/s vs {nbytes / t_bare / 1e6:.0f} MB/s; "
                                     "ours is synced to LMDB and folded before each answer")
                    r.target_met = ratio >= TARGET
                    results.append(r)
                    results.append(Result(f"ingest P={linear_params(p):.0e} c={c}", nbytes / t_ours, "B/s",
                                          BASELINE, nbytes / t_bare, ratio=ratio, ratio_spread=spread, params=params))
        finally:
            daemon.stop()
            stop(bare)
    return results
