"""Ingest: updates/s and MB/s through the real HTTP upload path, durable (synced LMDB) before each answer.

A real daemon child runs one job per configuration whose round takes exactly the uploads of the run
(num_participants = uploads, overcommitment 1, long deadline). The devices are enrolled, check in
together (the daemon holds them until the pool is full), answer the initial model's test tasks, check in
again and get their training tasks; then every device uploads its weights at once through a client with
at most ``concurrency`` connections, and that is what is timed. The baseline is a bare aiohttp handler
in another process that streams the same bodies and discards them, driven by the same client.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np

from bench.common import Daemon, Fleet, Profile, Result, linear_job, linear_params, session, start_bare, stop, workdir
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


async def _ours(daemon: Daemon, num_params: int, concurrency: int, uploads: int, repeats: int,
                bodies: list[bytes]) -> float:
    job = f"ingest-{num_params}-{concurrency}"
    token = daemon.submit(linear_job(job, num_params, uploads))["enrollment_token"]
    best = float("inf")
    async with session(uploads + 8) as s:
        fleet = Fleet(s, daemon.url, job)
        await fleet.enroll(uploads, token)
        for _ in range(repeats):  # one round per repeat
            task_ids = await fleet.get_train_tasks()
            best = min(best, await _timed_uploads(fleet, task_ids, bodies, concurrency))
    return best


async def _bare(url: str, concurrency: int, uploads: int, repeats: int, bodies: list[bytes]) -> float:
    best = float("inf")
    async with session(8) as s:
        fleet = Fleet(s, url, "bare")
        fleet.tokens = [f"tok-{i}" for i in range(uploads)]
        for _ in range(repeats):
            best = min(best, await _timed_uploads(fleet, [f"t-{i}" for i in range(uploads)], bodies, concurrency))
    return best


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
                    t_ours = asyncio.run(_ours(daemon, p, c, uploads, profile.repeats, bodies))
                    t_bare = asyncio.run(_bare(bare_url, c, uploads, profile.repeats, bodies))
                    nbytes = uploads * len(bodies[0])
                    params = {"P": linear_params(p), "concurrency": c, "uploads": uploads, "body_bytes": len(bodies[0]),
                              "seconds": t_ours, "baseline_seconds": t_bare}
                    r = Result(f"ingest P={linear_params(p):.0e} c={c}", uploads / t_ours, "updates/s",
                               "bare aiohttp (read + discard)", uploads / t_bare, target=">= 0.5", params=params,
                               notes=f"{nbytes / t_ours / 1e6:.0f} MB/s vs {nbytes / t_bare / 1e6:.0f} MB/s; "
                                     "ours is synced to LMDB and folded before each answer")
                    r.target_met = r.ratio >= 0.5
                    results.append(r)
                    results.append(Result(f"ingest P={linear_params(p):.0e} c={c}", nbytes / t_ours, "B/s",
                                          "bare aiohttp (read + discard)", nbytes / t_bare, params=params))
        finally:
            daemon.stop()
            stop(bare)
    return results
