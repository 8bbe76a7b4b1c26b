"""Disk: the store's size after many rounds, with the model retention policy and with every version kept.

A daemon child runs one job of a linear model of about 1e6 parameters (4 MB per version) for R rounds,
one participant per round (overcommitment 1, min_participants 1; eval_interval larger than R, so the
only test phases are the initial model's and the last one's). One device checks in, uploads a valid body
for each training task, answers the two test tasks, and checks in again as fast as it can. This runs
twice, each time on a fresh data dir: with the defaults (``model_retention`` 10, ``checkpoint_interval``
100: the file should stop growing once the window is full, LMDB reusing the freed pages) and with
``save_checkpoint: true`` (every version kept: the baseline, which grows by one model per round).

Every ``sample_every`` rounds the benchmark reads ``data.mdb``: its size (``st_size``), the bytes the file
system allocated for it (``st_blocks * 512``: LMDB files may be sparse), and the store's own page usage
from a short read-only transaction (pages in use by every database, the high-water page ``last_pgno``;
the difference is free pages LMDB will reuse) and the number of model versions stored.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from pathlib import Path
from typing import Any

import lmdb

from bench.common import ELIGIBLE, Daemon, Fleet, Profile, Result, linear_job, linear_params, session, workdir
from bench.ingest import make_bodies
from fedscaled.store import layout
from fedscaled.store.lmdb_store import DATABASES

PARAMS = 1_000_000
ROUNDS = {"smoke": 30, "quick": 1_000, "full": 1_000}  # smoke: the window (10) fills by round 15
SAMPLE_EVERY = {"smoke": 5, "quick": 100, "full": 100}
REPEATS = {"smoke": 1, "quick": 1, "full": 2}  # of each configuration, interleaved
CONFIGS: dict[str, dict[str, Any]] = {
    "retention": {},  # the defaults: model_retention 10, checkpoint_interval 100
    "keep all": {"save_checkpoint": True},
}
TEST_RESULT = {"samples": 10, "correct_top1": 3, "correct_top5": 9, "loss_sum": 11.0}


def store_usage(store_dir: Path, job: str) -> dict[str, int]:
    """data.mdb's size and allocated bytes, LMDB's pages in use and high-water mark, model versions stored.

    Opens the environment read-only beside the daemon (LMDB allows other processes to read) for one short
    transaction, so that it pins no old pages for long."""
    data = store_dir / "data.mdb"
    st = os.stat(data)
    out = {"file_bytes": st.st_size, "allocated_bytes": st.st_blocks * 512}
    env = lmdb.open(str(store_dir), readonly=True, lock=True, max_dbs=len(DATABASES) + 2, readahead=False)
    try:
        with env.begin() as txn:
            info = env.info()
            main = env.stat()
            page = int(main["psize"])
            used = 2  # the two meta pages
            for stat in [main] + [txn.stat(env.open_db(name.encode(), txn=txn, create=False)) for name in DATABASES]:
                used += int(stat["branch_pages"]) + int(stat["leaf_pages"]) + int(stat["overflow_pages"])
            models = txn.cursor(env.open_db(layout.MODELS_DB.encode(), txn=txn, create=False))
            prefix = layout.models_prefix(job)
            frozen = layout.frozen_key(job)
            versions = 0
            if models.set_range(prefix):
                for k in models.iternext(keys=True, values=False):
                    if not bytes(k).startswith(prefix):
                        break
                    versions += bytes(k) != frozen
    finally:
        env.close()
    high = (int(info["last_pgno"]) + 1) * page
    out.update(page_size=page, used_bytes=used * page, high_water_bytes=high, free_bytes=high - used * page,
               model_versions=versions)
    return out


async def _drive(daemon: Daemon, job: str, rounds: int, sample_every: int) -> dict[str, Any]:
    """Run the job to its end with one device; samples of :func:`store_usage` and the rounds' timing."""
    store_dir = daemon.data_dir / "store"
    body = make_bodies(PARAMS, 1)[0]
    async with session(4) as s:
        status = daemon.status(job)
        fleet = Fleet(s, daemon.url, job)
        await fleet.enroll(1, status["enrollment_token"])
        token = fleet.tokens[0]
        checkin = f"/v1/jobs/{job}/checkin"
        samples: list[dict[str, int]] = []
        trained = tested = waits = 0
        began = time.perf_counter()
        while True:
            code, answer = await fleet._call("POST", checkin, token, json_body=ELIGIBLE)
            if code != 200:
                raise RuntimeError(f"check-in answered {code}: {answer!r}")
            action = answer["action"]
            if action == "train":
                # Round ``trained + 1`` opened: model versions 0..trained are written (and old ones dropped).
                if trained and trained % sample_every == 0:
                    samples.append({"round": trained, **store_usage(store_dir, job)})
                await fleet.upload(token, answer["task"]["task_id"], body)
                trained += 1
            elif action == "test":
                code, reply = await fleet._call("POST", f"/v1/jobs/{job}/tasks/{answer['task']['task_id']}/result",
                                                token, json_body=TEST_RESULT)
                if code != 200:
                    raise RuntimeError(f"test result answered {code}: {reply!r}")
                tested += 1
            elif action == "done":
                break
            elif answer.get("reason") == "not_eligible":
                raise RuntimeError(f"the device is not eligible: {answer!r}")
            else:
                waits += 1  # e.g. the round is closing: check in again at once
        seconds = time.perf_counter() - began
    final = daemon.status(job)
    if final["state"] != "finished" or trained != rounds:
        raise RuntimeError(f"job {job} ended {final['state']} after {trained} of {rounds} rounds")
    samples.append({"round": trained, **store_usage(store_dir, job)})
    return {"seconds": seconds, "rounds_per_second": trained / seconds, "rounds": trained, "tests": tested,
            "waits": waits, "samples": samples}


def _one(tmp: Path, name: str, extra: dict[str, Any], rounds: int, sample_every: int, index: int) -> dict[str, Any]:
    daemon = Daemon(tmp, f"{name.replace(' ', '-')}-{index}")
    job = "disk"
    try:
        daemon.start()
        daemon.submit(linear_job(job, PARAMS, 1, rounds=rounds, min_participants=1, test_participants=1,
                                 eval_interval=rounds + 1, **extra))
        out = asyncio.run(_drive(daemon, job, rounds, sample_every))
    finally:
        daemon.stop()
    return out


def run(profile: Profile) -> list[Result]:
    """Store size and rounds/s with the retention policy, against keeping every version."""
    rounds = ROUNDS.get(profile.name, 1_000)
    sample_every = SAMPLE_EVERY.get(profile.name, 100)
    repeats = REPEATS.get(profile.name, 1)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in CONFIGS}
    with workdir("disk") as tmp:
        for i in range(repeats):  # interleaved: retention, keep all, retention, ...
            for name, extra in CONFIGS.items():
                runs[name].append(_one(tmp, name, extra, rounds, sample_every, i))
    ours, base = runs["retention"], runs["keep all"]
    p = f"P={linear_params(PARAMS):.0e}"
    model_bytes = linear_params(PARAMS) * 4

    def last(rs: list[dict[str, Any]], key: str) -> float:
        return float(statistics.median(r["samples"][-1][key] for r in rs))

    def growth(rs: list[dict[str, Any]], key: str) -> float:
        # Over the second half of the run: zero once the retention window is full and pages are reused.
        def one(r: dict[str, Any]) -> float:
            samples = r["samples"]
            mid = min(samples, key=lambda s: abs(s["round"] - rounds // 2))
            return float(samples[-1][key] - mid[key])
        return float(statistics.median(one(r) for r in rs))

    def curve(rs: list[dict[str, Any]]) -> list[dict[str, int]]:
        return [{k: s[k] for k in ("round", "file_bytes", "allocated_bytes", "used_bytes", "free_bytes",
                                   "model_versions")} for s in rs[0]["samples"]]

    common = {"P": linear_params(PARAMS), "rounds": rounds, "repeats": repeats, "sample_every": sample_every,
              "model_bytes": model_bytes}
    results: list[Result] = []
    for key, what in (("file_bytes", "data.mdb size"), ("allocated_bytes", "data.mdb allocated"),
                      ("used_bytes", "LMDB pages in use")):
        r = Result(f"disk {what} after {rounds} rounds {p}", last(ours, key), "B",
                   "keep every version (save_checkpoint: true)", last(base, key), lower_is_better=True,
                   params={**common, "model_versions": last(ours, "model_versions"),
                           "baseline_model_versions": last(base, "model_versions"),
                           "curve": curve(ours), "baseline_curve": curve(base)},
                   notes=f"{last(ours, 'model_versions'):.0f} versions kept vs "
                         f"{last(base, 'model_versions'):.0f}; {last(ours, key) / model_bytes:.1f} vs "
                         f"{last(base, key) / model_bytes:.1f} models' worth")
        results.append(r)
    # With retention the file still grows by the checkpoints it keeps (every checkpoint_interval-th version);
    # everything else must come from reused pages: growth beyond kept versions x model size is the waste.
    kept = growth(ours, "model_versions")
    unexplained = growth(ours, "file_bytes") - kept * model_bytes
    r = Result(f"disk data.mdb growth rounds {rounds // 2}..{rounds} {p}", growth(ours, "file_bytes"), "B",
               "keep every version (save_checkpoint: true)", growth(base, "file_bytes"), lower_is_better=True,
               target="only kept checkpoints", params={**common, "versions_added": kept,
                                                       "growth_beyond_kept_versions": unexplained,
                                                       "allocated_growth": growth(ours, "allocated_bytes"),
                                                       "baseline_allocated_growth": growth(base, "allocated_bytes"),
                                                       "baseline_versions_added": growth(base, "model_versions")},
               notes=f"file growth over the second half of the run: {kept:.0f} more versions kept (checkpoints) "
                     f"= {kept * model_bytes / 1e6:.1f} MB, {unexplained / 1e6:+.1f} MB beyond them (freed pages "
                     f"of dropped versions are reused)")
    r.target_met = unexplained < model_bytes
    results.append(r)
    rates = [x["rounds_per_second"] for x in ours]
    base_rates = [x["rounds_per_second"] for x in base]
    results.append(Result(f"disk rounds/s {p}", statistics.median(rates), "rounds/s",
                          "keep every version (save_checkpoint: true)", statistics.median(base_rates),
                          params={**common, "all": rates, "baseline_all": base_rates,
                                  "tests": ours[0]["tests"], "waits": [x["waits"] for x in ours]},
                          notes=f"one device, check-in + 4 MB upload + round close per round; median of {repeats} "
                                f"interleaved runs"))
    return results
