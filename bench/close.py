"""Round close: from the last accepted update to the new model being downloadable.

A real daemon child runs rounds of a few devices. All but one upload, then the last one; the clock
starts when the last upload's 200 arrives and stops when ``GET models/{version}`` first answers 200
(polled every 2 ms; timed to the response status, not the body transfer). The floor, measured in this
process on the same model size, is what closing must do at least: the weighted mean
(``fedavg_result``), the safetensors encoding and one synced LMDB commit of the model.
The daemon's own ``fedscaled_round_close_seconds`` histogram is read from /metrics beside it.
"""

from __future__ import annotations

import asyncio
import re
import statistics
import tempfile
import time
from pathlib import Path

import aiohttp
import numpy as np

from bench.common import Daemon, Fleet, Profile, Result, linear_job, linear_params, session, workdir
from bench.ingest import make_bodies
from fedscaled.core import aggregate, codec
from fedscaled.core.models import build
from fedscaled.store.lmdb_store import Store, WriteBatch, key

DEVICES = 4
POLL = 0.002


async def _wait_model(s: aiohttp.ClientSession, url: str, token: str, timeout: float = 120.0) -> float:
    """perf_counter when the model first answers 200."""
    headers = {"Authorization": f"Bearer {token}"}
    for _ in range(int(timeout / POLL)):
        async with s.get(url, headers=headers) as response:
            now = time.perf_counter()
            ok = response.status == 200
            await response.read()
        if ok:
            return now
        await asyncio.sleep(POLL)
    raise RuntimeError(f"{url} not downloadable after {timeout} s")


async def _rounds(daemon: Daemon, num_params: int, rounds: int) -> list[float]:
    job = f"close-{num_params}"
    token = daemon.submit(linear_job(job, num_params, DEVICES, rounds=rounds + 1))["enrollment_token"]
    bodies = make_bodies(num_params)
    times = []
    async with session(DEVICES + 8) as s:
        fleet = Fleet(s, daemon.url, job)
        await fleet.enroll(DEVICES, token)
        for r in range(1, rounds + 1):
            task_ids = await fleet.get_train_tasks()
            pairs = list(zip(fleet.tokens, task_ids, strict=True))
            await asyncio.gather(*(fleet.upload(tok, tid, bodies[i % len(bodies)])
                                   for i, (tok, tid) in enumerate(pairs[:-1])))
            await fleet.upload(pairs[-1][0], pairs[-1][1], bodies[0])
            last = time.perf_counter()
            ready = await _wait_model(s, f"{daemon.url}/v1/jobs/{job}/models/{r}", fleet.tokens[0])
            times.append(ready - last)
    return times


def floor_seconds(num_params: int, repeats: int) -> float:
    """Best time of fedavg_result + encode_model + one synced LMDB commit of the model, in process."""
    specs = build("linear", (max(1, num_params // 10), 1, 1), 10).specs
    total = codec.num_params(specs)
    flat = np.random.default_rng(0).standard_normal(total, dtype=np.float32)
    best = float("inf")
    with tempfile.TemporaryDirectory(prefix="fsb-floor-") as tmp:
        store = Store(Path(tmp))
        try:
            for version in range(max(2, repeats)):
                state = aggregate.fedavg_fold(aggregate.fedavg_init(total), flat, 3.0)
                state.acc.block_until_ready()
                began = time.perf_counter()
                new = np.asarray(aggregate.fedavg_result(state))
                data = codec.encode_model(new, specs)
                store.commit_sync(WriteBatch().put("models", key("floor", version), data))
                best = min(best, time.perf_counter() - began)
        finally:
            store.close()
    return best


def _metric_close(text: str) -> tuple[float, float]:
    total = re.search(r"^fedscaled_round_close_seconds_sum\S*\s+(\S+)", text, re.M)
    count = re.search(r"^fedscaled_round_close_seconds_count\S*\s+(\S+)", text, re.M)
    return (float(total.group(1)) if total else float("nan"), float(count.group(1)) if count else 0.0)


async def _metrics(url: str) -> str:
    async with session(2) as s, s.get(url + "/metrics") as response:
        return await response.text()


def run(profile: Profile) -> list[Result]:
    """Round-close time per model size, against the in-process floor."""
    results: list[Result] = []
    with workdir("close") as tmp:
        daemon = Daemon(tmp)
        try:
            daemon.start()
            for p in profile.close_sizes:
                before = _metric_close(asyncio.run(_metrics(daemon.url)))
                times = asyncio.run(_rounds(daemon, p, profile.close_rounds))
                after = _metric_close(asyncio.run(_metrics(daemon.url)))
                rounds = after[1] - before[1]
                hist = (after[0] - before[0]) / rounds if rounds else float("nan")
                floor = floor_seconds(p, profile.repeats)
                ours = statistics.median(times)
                results.append(Result(f"round close P={linear_params(p):.0e}", ours, "s",
                                      "floor: mean + encode + synced commit", floor, lower_is_better=True,
                                      params={"P": linear_params(p), "devices": DEVICES, "rounds": len(times),
                                              "all_seconds": times, "metric_close_seconds_mean": hist},
                                      notes=f"median of {len(times)} rounds; daemon's own histogram mean "
                                            f"{hist * 1e3:.1f} ms"))
        finally:
            daemon.stop()
    return results
